"""Checkpoints: the published ImageNet layout and its conversion (published.py), the strict
detectron2 checkpointer (checkpointer.py) and the ImageNet classifier's checkpoints (classifier.py)."""

from .checkpointer import ScaleNetCheckpointer
from .published import (
    EXPECTED_INPUT,
    SCALENET_AUTHOR,
    CheckpointMismatchError,
    ConversionResult,
    check_published_state_dict,
    convert_published_checkpoint,
    convert_published_state_dict,
    describe_unreadable,
    first_non_finite,
    infer_allocation,
    load_published_state_dict,
    published_key_shapes,
    published_state_dict,
    to_d2_key,
)
