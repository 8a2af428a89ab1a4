"""detectron2's own tools on ScaleNet configs: `export DETECTRON2_ENV_MODULE=scalenet_d2.d2_env`.

detectron2 calls `setup_environment()` of the module that variable names when it is imported
(detectron2.utils.env). Then every `get_cfg()` has MODEL.SCALENET, the ScaleNet backbones are
registered and the built-in synthetic datasets too, so that detectron2's unmodified
tools/analyze_model.py, tools/deploy/export_model.py, tools/train_net.py and
tools/lazyconfig_train_net.py load this project's configs.
"""

__all__ = ["setup_environment"]


def setup_environment():
    # detectron2 is being imported when this runs: import what we need from it lazily, here
    from detectron2.config import defaults

    import scalenet_d2  # registers the backbones
    import scalenet_d2.data  # noqa: F401  registers the synthetic datasets

    # get_cfg() returns a copy of these defaults
    scalenet_d2.add_scalenet_config(defaults._C)
