"""detectron2's FPN on a ScaleNet body (or its ResNet twin) from the MODEL.FPN settings, as its
ResNet builders make it, with the checks of those settings against the body and the heads
that detectron2 leaves to a KeyError or an assertion inside the model."""

import re
from typing import List

from detectron2.modeling import Backbone
from detectron2.modeling.backbone import FPN

from .allocation import STAGE_NAMES

__all__ = ["fpn_from_cfg", "check_body_outputs"]

# which heads of a meta-architecture read which features (detectron2's config keys)
HEAD_FEATURE_KEYS = {
    "GeneralizedRCNN": ("RPN", "ROI_HEADS"),
    "ProposalNetwork": ("RPN",),
    "RetinaNet": ("RETINANET",),
}


def fpn_from_cfg(cfg, bottom_up: Backbone, top_block, body_features_key: str) -> FPN:
    """FPN(bottom_up, MODEL.FPN.*, top_block), after checking that MODEL.FPN.IN_FEATURES are
    consecutive stages in order of stride, that the body (whose outputs `body_features_key`
    sets) gives them, and that every feature the heads read is one the FPN gives."""
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    start = STAGE_NAMES.index(in_features[0]) if in_features and in_features[0] in STAGE_NAMES else 0
    if not in_features or in_features != list(STAGE_NAMES[start : start + len(in_features)]):
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features}: expected consecutive stages in order of stride (4, 8, 16, 32), "
            f"e.g. {list(STAGE_NAMES)} or {list(STAGE_NAMES[1:])}"
        )
    top_input = getattr(top_block, "in_feature", None)
    check_body_outputs(bottom_up, in_features + ([top_input] if top_input in STAGE_NAMES else []), body_features_key)
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    _check_head_features(cfg, list(fpn.output_shape()))
    return fpn


def check_body_outputs(bottom_up: Backbone, required: List[str], body_features_key: str) -> None:
    """The FPN's inputs `required` are among the body's outputs (which `body_features_key` sets)."""
    required, given = list(dict.fromkeys(required)), list(bottom_up.output_shape())
    missing = [name for name in required if name not in given]
    if missing:
        raise ValueError(
            f"the FPN needs {required} from the backbone body, but {body_features_key} is {given} (missing "
            f"{missing}); add them to {body_features_key}"
        )


def _check_head_features(cfg, outputs: List[str]) -> None:
    """The heads of cfg's meta-architecture that are set up for an FPN (they read some p<k>) read
    only levels it gives. A head that reads none (detectron2's default "res4") is not one this
    config builds on the FPN: e.g. only the backbone is built, for a model of one's own."""
    for head in HEAD_FEATURE_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ()):
        wanted = list(cfg.MODEL[head].IN_FEATURES)
        if not any(re.fullmatch(r"p\d+", name) for name in wanted):
            continue
        missing = [name for name in wanted if name not in outputs]
        if missing:
            raise ValueError(
                f"MODEL.{head}.IN_FEATURES {wanted}: {missing} not among the FPN's outputs {outputs} (p<k> from "
                f"res<k> of MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)}, then its top block); expected "
                f"a subset of {outputs}"
            )
