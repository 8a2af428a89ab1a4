"""ScaleNet (Li et al., CVPR 2019) backbones for detectron2.

`import scalenet_d2` registers with detectron2's BACKBONE_REGISTRY:
build_scalenet_backbone, build_scalenet_fpn_backbone, build_retinanet_scalenet_fpn_backbone,
and build_resnet_twin_fpn_backbone (detectron2's ResNet in the layout of an allocation).
Call `add_scalenet_config(cfg)` before merging a config that uses MODEL.SCALENET.
"""

__version__ = "0.1.0"  # the one place the version is defined (setup.py reads it)

from .checkpoint import (
    EXPECTED_INPUT,
    CheckpointMismatchError,
    ScaleNetCheckpointer,
    convert_published_checkpoint,
    convert_published_state_dict,
    infer_allocation,
)
from .config import add_scalenet_config
from .modeling import (
    BUNDLED_ALLOCATIONS,
    FAST_PATH_MODES,
    SCALES,
    STAGE_NAMES,
    Allocation,
    AllocationError,
    SABottleneck,
    ScaleNet,
    ScaleNetClassifier,
    StageAllocation,
    build_resnet_twin_fpn_backbone,
    build_retinanet_scalenet_fpn_backbone,
    build_scalenet_backbone,
    build_scalenet_fpn_backbone,
    load_allocation,
    resnet_twin,
    set_fast_path,
)

__all__ = [
    "__version__",
    "add_scalenet_config",
    "load_allocation",
    "Allocation",
    "StageAllocation",
    "AllocationError",
    "BUNDLED_ALLOCATIONS",
    "SCALES",
    "STAGE_NAMES",
    "SABottleneck",
    "ScaleNet",
    "ScaleNetClassifier",
    "FAST_PATH_MODES",
    "set_fast_path",
    "build_scalenet_backbone",
    "build_scalenet_fpn_backbone",
    "build_retinanet_scalenet_fpn_backbone",
    "build_resnet_twin_fpn_backbone",
    "resnet_twin",
    "ScaleNetCheckpointer",
    "CheckpointMismatchError",
    "EXPECTED_INPUT",
    "convert_published_checkpoint",
    "convert_published_state_dict",
    "infer_allocation",
]
