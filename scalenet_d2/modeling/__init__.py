"""The networks: ScaleNet (scalenet.py; its exact rewrites in fast_paths.py, CPU kernels in
cpu_kernels.py), allocation files (allocation.py), the ResNet twin, the ImageNet classifier and
export (export.py, whose operators keep shape-dependent steps under torch.export)."""

from . import export  # noqa: F401  registers the scalenet_d2:: operators used under torch.export
from .allocation import (
    BUNDLED_ALLOCATIONS,
    SCALES,
    STAGE_NAMES,
    Allocation,
    AllocationError,
    StageAllocation,
    load_allocation,
)
from .classification import ResNetTwinClassifier, ScaleNetClassifier
from .resnet_twin import build_resnet_twin_fpn_backbone, resnet_twin
from .scalenet import (
    FAST_PATH_MODES,
    SABottleneck,
    ScaleNet,
    build_retinanet_scalenet_fpn_backbone,
    build_scalenet_backbone,
    build_scalenet_fpn_backbone,
    set_fast_path,
)
