"""A ResNet twin for any allocation: detectron2's ResNet in a ScaleNet's layout."""

from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet

from .allocation import load_allocation
from .scalenet import fpn_from_cfg

__all__ = ["build_resnet_twin_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_resnet_twin_fpn_backbone(cfg, input_shape):
    """detectron2's ResNet + FPN with the layout of MODEL.SCALENET.ALLOCATION.

    Same stem width, bottleneck widths and blocks per stage as the ScaleNet, with ResNet's
    3x3 conv where ScaleNet has its scale-aggregation layer: the ResNet twin of allocations
    that detectron2's ResNet depths (18/34/50/101/152) cannot express, such as the built-in
    demo's one-block-per-stage scalenet_tiny. (scalenet50's twin is detectron2's ResNet-50.)
    Blocks, stem and FPN are detectron2's own; MODEL.RESNETS.NORM and STRIDE_IN_1X1 apply.
    """
    alloc = load_allocation(cfg.MODEL.SCALENET.ALLOCATION)
    norm = cfg.MODEL.RESNETS.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=alloc.stem_channels, norm=norm)
    stages, in_channels = [], alloc.stem_channels
    for i, stage in enumerate(alloc.stages):
        n = len(stage.blocks)
        stages.append(
            ResNet.make_stage(
                BottleneckBlock,
                n,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=in_channels,
                bottleneck_channels=stage.planes,
                out_channels=4 * stage.planes,
                norm=norm,
                stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
            )
        )
        in_channels = 4 * stage.planes
    bottom_up = ResNet(
        stem, stages, out_features=cfg.MODEL.RESNETS.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )
    return fpn_from_cfg(cfg, bottom_up, LastLevelMaxPool())
