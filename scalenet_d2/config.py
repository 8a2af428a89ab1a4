"""detectron2 config keys of the ScaleNet backbones."""

from detectron2.config import CfgNode as CN

__all__ = ["add_scalenet_config"]


def add_scalenet_config(cfg):
    """Add MODEL.SCALENET to `cfg` (in place; keys already present are left as they are).

    MODEL.SCALENET.ALLOCATION: a bundled allocation (scalenet50, scalenet50_light,
        scalenet101, scalenet152, scalenet_tiny), the path of an allocation file, in the
        project format or the published row format, or an over-complete seed for data-driven
        neuron allocation: "seed:<depth or allocation>[@<multiplier>]", e.g. "seed:50" (every
        scale at the stage's ResNet width) or "seed:scalenet_tiny@2". It fixes the depth, so there is no DEPTH.
    MODEL.SCALENET.GAMMA_L1: 0 (default) or the network-slimming L1 penalty on the SA branch
        norms' scales (gamma), as tools/train_classifier.py --gamma-l1: loss + GAMMA_L1 x sum |gamma|.
        Needs trainable norm scales: MODEL.SCALENET.NORM BN, SyncBN or GN, and MODEL.BACKBONE.FREEZE_AT <= 1.
    MODEL.SCALENET.OUT_FEATURES: which of res2..res5 the body returns (as RESNETS.OUT_FEATURES).
    MODEL.SCALENET.NORM: FrozenBN (default), BN, SyncBN, GN, or any norm detectron2's get_norm takes.
    MODEL.SCALENET.FAST_PATH: which forward runs (docs/fast_paths.md): "auto" (default: the exact
        rewrites on CPU but for small inputs, the plain forward on CUDA until measured faster there), "on" (the exact
        rewrites on every device) or "off" (the plain forward, as the paper writes it).
    MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS: False (default): loading weights that leave a backbone
        body tensor (ScaleNet's, or the ResNet twin's) unloaded or unused is an error; True
        logs it instead, for deliberate partial loads.

    MODEL.BACKBONE.FREEZE_AT keeps its detectron2 meaning: 0 nothing, 1 the stem,
    k >= 2 the stem and res2..res{k}.
    """
    defaults = {
        "ALLOCATION": "scalenet50",
        "OUT_FEATURES": ["res4"],
        "NORM": "FrozenBN",
        "FAST_PATH": "auto",
        "ALLOW_PARTIAL_WEIGHTS": False,
        "GAMMA_L1": 0.0,
    }
    if "SCALENET" not in cfg.MODEL:
        cfg.MODEL.SCALENET = CN()
    for key, value in defaults.items():
        if key not in cfg.MODEL.SCALENET:
            setattr(cfg.MODEL.SCALENET, key, value)
    return cfg
