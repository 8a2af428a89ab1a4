"""A ResNet twin for any allocation: detectron2's ResNet in a ScaleNet's layout."""

from typing import Sequence, Union

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet

from .allocation import STAGE_NAMES, Allocation, load_allocation
from .fpn import fpn_from_cfg

__all__ = ["resnet_twin", "build_resnet_twin_fpn_backbone"]


def resnet_twin(
    allocation: Union[Allocation, str],
    norm="FrozenBN",
    out_features: Sequence[str] = STAGE_NAMES,
    freeze_at: int = 0,
    stride_in_1x1: bool = False,
    in_channels: int = 3,
) -> ResNet:
    """detectron2's ResNet with the layout of `allocation`.

    Same stem width, bottleneck widths and blocks per stage as the ScaleNet, with ResNet's
    3x3 conv where ScaleNet has its scale-aggregation layer: the ResNet twin of allocations
    that detectron2's ResNet depths (18/34/50/101/152) cannot express, such as the built-in
    demo's one-block-per-stage scalenet_tiny. (scalenet50's twin is detectron2's ResNet-50.)
    Blocks and stem are detectron2's own.
    """
    alloc = load_allocation(allocation)
    stem = BasicStem(in_channels=in_channels, out_channels=alloc.stem_channels, norm=norm)
    stages, stage_in = [], alloc.stem_channels
    for i, stage in enumerate(alloc.stages):
        n = len(stage.blocks)
        stages.append(
            ResNet.make_stage(
                BottleneckBlock,
                n,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=stage_in,
                bottleneck_channels=stage.planes,
                out_channels=4 * stage.planes,
                norm=norm,
                stride_in_1x1=stride_in_1x1,
            )
        )
        stage_in = 4 * stage.planes
    return ResNet(stem, stages, out_features=list(out_features), freeze_at=freeze_at)


@BACKBONE_REGISTRY.register()
def build_resnet_twin_fpn_backbone(cfg, input_shape):
    """FPN on `resnet_twin` of MODEL.SCALENET.ALLOCATION, with MODEL.RESNETS.NORM,
    STRIDE_IN_1X1 and OUT_FEATURES and MODEL.BACKBONE.FREEZE_AT, as build_resnet_fpn_backbone."""
    bottom_up = resnet_twin(
        cfg.MODEL.SCALENET.ALLOCATION,
        norm=cfg.MODEL.RESNETS.NORM,
        out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
        in_channels=input_shape.channels,
    )
    return fpn_from_cfg(cfg, bottom_up, LastLevelMaxPool(), "MODEL.RESNETS.OUT_FEATURES")
