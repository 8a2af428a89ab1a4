"""COCO evaluation that works with and without detectron2's compiled ops."""

from detectron2.evaluation import COCOEvaluator


def has_compiled_ops() -> bool:
    """True when detectron2 was built with its C++ ops (not scalenet_d2's CPU fallback)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "SCALENET_D2_FALLBACK", False)


def build_coco_evaluator(dataset_name, output_dir=None, **kwargs):
    """detectron2's COCOEvaluator, using its fast C++ evaluator only where it was compiled.

    Without compiled ops (the CPU fallback) it evaluates with pycocotools' COCOeval, the
    official implementation, which gives the same AP figures, only slower.
    """
    kwargs.setdefault("use_fast_impl", has_compiled_ops())
    return COCOEvaluator(dataset_name, output_dir=output_dir, **kwargs)
