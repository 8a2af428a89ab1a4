"""Stand-in for ``detectron2._C`` in scalenet_d2's CPU fallback install of detectron2.

The fallback installs detectron2 v0.6's Python sources (from PyPI's ``pb1-detectron2==0.6``
sdist) without compiling its C++/CUDA operators: Faster R-CNN with FPN, RetinaNet, training,
checkpointing and COCO evaluation with pycocotools do not need them. Modules such as
``layers/deform_conv.py`` import ``_C`` at import time, so this module lets those imports
succeed and turns any *use* of a compiled operator into an error that names it.

This file is written by scalenet_d2 (tools/detectron2_fallback), not by detectron2.
"""

SCALENET_D2_FALLBACK = True

_HOW_TO_GET_IT = (
    "Build detectron2 from source with its compiled ops "
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html), "
    "then reinstall scalenet_d2 next to it."
)


class MissingCompiledOpError(AttributeError):
    """A compiled detectron2 operator was used in an install that has none.

    It is an AttributeError so that ``hasattr(_C, op)`` and ``getattr(_C, op, default)``
    answer "not available" instead of raising.
    """


# detectron2.utils.collect_env calls these three when `import detectron2._C` succeeds:
# answer honestly that nothing was compiled.
def get_compiler_version():
    return "none: installed without compiled ops (scalenet_d2 CPU fallback)"


def get_cuda_version():
    return "none: installed without compiled ops (scalenet_d2 CPU fallback)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise MissingCompiledOpError(
        f"detectron2 compiled operator '{name}' is unavailable: this detectron2 is the CPU "
        f"fallback installed by scalenet_d2 without C++/CUDA ops (deformable conv, rotated "
        f"boxes and ROIAlignRotated, the fast COCO evaluator). {_HOW_TO_GET_IT}"
    )
