"""Config files shipped in the package (the repository's configs/, which
scalenet_d2/model_zoo/configs links to and a wheel holds a copy of)."""

from pathlib import Path

__all__ = ["get_config_file", "get_config"]

CONFIGS = Path(__file__).resolve().parent / "configs"


def get_config_file(config_path: str) -> str:
    """The real path of a config shipped with scalenet_d2.

    Args:
        config_path: relative to the repository's configs/ folder, e.g.
            "COCO-Detection/faster_rcnn_S50_FPN_1x.yaml" or "COCO-Detection/faster_rcnn_S50_FPN_1x.py".
    """
    root = CONFIGS.resolve()
    path = (root / config_path).resolve()
    if root not in path.parents or not path.is_file() or path.suffix not in (".yaml", ".py"):
        raise RuntimeError(
            f"{config_path!r} is not a config of scalenet_d2's model zoo: expected a .yaml or .py file under "
            f"{root}, e.g. 'COCO-Detection/faster_rcnn_S50_FPN_1x.yaml'"
        )
    return str(path)


def get_config(config_path: str):
    """A config of scalenet_d2's model zoo: a detectron2 CfgNode with MODEL.SCALENET added and
    `_BASE_` resolved for a .yaml file, the LazyConfig (an omegaconf DictConfig) for a .py file.
    MODEL.WEIGHTS / train.init_checkpoint stay as the config names them (ImageNet weights that
    you convert, see docs/model.md); no trained detectors are published yet."""
    config_file = get_config_file(config_path)
    if config_file.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(config_file)
    from detectron2.config import get_cfg

    from ..config import add_scalenet_config

    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.merge_from_file(config_file)
    return cfg
