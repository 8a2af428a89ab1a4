"""Exporting a ScaleNet body for every input size: torch.export with dynamic height and width,
and ONNX with dynamic axes.

The body's shape-dependent steps (the -inf padding of short dimensions, nearest or bilinear
resizing) are operators of their own under torch.export (registered here, called by layers.py,
scalenet.py and fast_paths.py), and scripted parts under the tracing ONNX exporter, so neither
freezes the choices made for the example input. torch.compile takes the pooled-branch operator
too (with its backward), so that one graph serves every input size. (Tracing, as detectron2's export_model.py
does, needs nothing from here.)
"""

import io
from typing import Optional, Sequence, Tuple

import torch
import torch.fx.experimental._config as symbolic_shapes_config
import torch.nn.functional as F
from torch.export import Dim, ExportedProgram

from ..atomic import bytes_writer, write_atomically
from .layers import max_pool_clamped, resize_like

__all__ = [
    "export_body",
    "export_body_onnx",
    "MAX_SIDE",
    "max_pool_clamped_op",
    "pooled_branch_op",
    "pooled_branch_backward_op",
]

MAX_SIDE = 8192  # the largest height or width an exported body accepts


# Under torch.export the shape-dependent steps are these operators, whose output shape
# (register_fake) is plain arithmetic on the input's, so that an exported program keeps the
# choices of layers.py for every input size instead of freezing those of the example input. A
# pooled branch is one operator (pool, conv, resize back): its pooled map, often 1x1, stays
# inside it, where the export cannot freeze that map's memory layout either.
# Both answer in their input's memory format (NCHW or channels_last), the real kernel and the
# fake alike, so that the strides an exported program expects are the ones it gets.
def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # NCHW asked first: for it the answer needs no reasoning about symbolic sizes
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("scalenet_d2::max_pool_clamped", mutates_args=())
def max_pool_clamped_op(x: torch.Tensor, factor: int) -> torch.Tensor:
    return max_pool_clamped(x, factor).contiguous(memory_format=_memory_format(x))


@max_pool_clamped_op.register_fake
def _(x, factor):
    height, width = x.shape[-2], x.shape[-1]
    shape = (x.shape[0], x.shape[1], torch.sym_max(1, height // factor), torch.sym_max(1, width // factor))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


@torch.library.custom_op("scalenet_d2::pooled_branch", mutates_args=())
def pooled_branch_op(
    y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: int, relu: bool
) -> torch.Tensor:
    """resize_like(conv(max_pool_clamped(y, scale)), y, relu), the conv with `weight` and `bias`."""
    pooled = F.conv2d(max_pool_clamped(y, scale), weight, bias, padding=weight.shape[-1] // 2)
    return resize_like(pooled, y, relu).contiguous(memory_format=_memory_format(y))


@pooled_branch_op.register_fake
def _(y, weight, bias, scale, relu):
    shape = (y.shape[0], weight.shape[0], y.shape[-2], y.shape[-1])
    return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))


# Its backward is an operator too, so that a compiled training graph stays shape-generic. Inside an
# operator autograd records nothing, so the backward is written out: the branch is recomputed, then
# each step's own backward runs in reverse (resize, conv, pool). Without a bias it gives an empty
# bias gradient (an operator returns tensors only).
@torch.library.custom_op("scalenet_d2::pooled_branch_backward", mutates_args=())
def pooled_branch_backward_op(
    grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: int, relu: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    aten = torch.ops.aten
    height, width = y.shape[-2], y.shape[-1]
    padded = y
    if height < scale or width < scale:  # as max_pool_clamped
        padded = F.pad(y, [0, max(scale - width, 0), 0, max(scale - height, 0)], value=float("-inf"))
    pooled, indices = F.max_pool2d(padded, scale, scale, return_indices=True)
    padding = weight.shape[-1] // 2
    z = F.conv2d(pooled, weight, bias, padding=padding)
    if height % z.shape[-2] == 0 and width % z.shape[-1] == 0:  # nearest, the ReLU before it (resize_like)
        grad_z = aten.upsample_nearest2d_backward(grad, [height, width], list(z.shape))
        if relu:
            grad_z = grad_z * (z > 0)
    else:  # bilinear, the ReLU after it
        if relu:
            resized = F.interpolate(z, size=[height, width], mode="bilinear", align_corners=False)
            grad = grad * (resized > 0)
        grad_z = aten.upsample_bilinear2d_backward(grad, [height, width], list(z.shape), False)
    grad_pooled, grad_weight, grad_bias = aten.convolution_backward(
        grad_z,
        pooled,
        weight,
        None if bias is None else [bias.shape[0]],
        [1, 1],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        1,
        [True, True, bias is not None],
    )
    grad_padded = aten.max_pool2d_with_indices_backward(
        grad_pooled, padded, [scale, scale], [scale, scale], [0, 0], [1, 1], False, indices
    )
    grad_y = grad_padded[..., :height, :width].contiguous(memory_format=_memory_format(y))
    return grad_y, grad_weight.contiguous(), weight.new_empty(0) if bias is None else grad_bias


@pooled_branch_backward_op.register_fake
def _(grad, y, weight, bias, scale, relu):
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
    grad_bias = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return grad_y, torch.empty_like(weight, memory_format=torch.contiguous_format), grad_bias


def _pooled_branch_setup_context(ctx, inputs, output):
    y, weight, bias, scale, relu = inputs
    ctx.save_for_backward(y, weight, bias)
    ctx.scale, ctx.relu = scale, relu


def _pooled_branch_backward(ctx, grad):
    y, weight, bias = ctx.saved_tensors
    grad_y, grad_weight, grad_bias = torch.ops.scalenet_d2.pooled_branch_backward(
        grad, y, weight, bias, ctx.scale, ctx.relu
    )
    return grad_y, grad_weight, None if bias is None else grad_bias, None, None


pooled_branch_op.register_autograd(_pooled_branch_backward, setup_context=_pooled_branch_setup_context)


def export_body(body: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """torch.export of a backbone body (images (N, C, H, W) -> dict of feature maps), with N, H
    and W dynamic: H and W from 1 to MAX_SIDE.

    Size-oblivious reasoning: the export otherwise specialises every feature-map size that
    could be 1 (a 7x-pooled map of a small image is 1x1), which no value of 1 changes here.
    """
    dims = {
        0: Dim("batch", min=1, max=1024),
        2: Dim("height", min=1, max=MAX_SIDE),
        3: Dim("width", min=1, max=MAX_SIDE),
    }
    with symbolic_shapes_config.patch(backed_size_oblivious=True):
        return torch.export.export(body.eval(), (example,), dynamic_shapes=(dims,))


def export_body_onnx(body: torch.nn.Module, path: str, example: torch.Tensor, opset: int = 17) -> Sequence[str]:
    """Writes `body` (eval mode) as ONNX to `path` (atomically), with the batch, height and width
    of input "images" dynamic; returns the output names (the body's output features, in order).

    The tracing exporter records the shapes of the example's intermediate maps; they hold only
    for the example's size, so they are dropped (onnxruntime infers them at each run).
    """
    import onnx  # an optional dependency: pip install onnx onnxruntime

    body = body.eval()
    names = list(body.output_shape())
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            body,
            (example,),
            buffer,
            dynamo=False,  # the tracing exporter: the scripted shape logic becomes ONNX If nodes
            input_names=["images"],
            output_names=names,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
        )
    model = onnx.load_from_string(buffer.getvalue())
    _drop_example_shapes(model.graph)
    onnx.checker.check_model(model)
    write_atomically({path: bytes_writer(model.SerializeToString())})
    return names


def _drop_example_shapes(graph) -> None:
    import onnx

    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:  # the branches of an If
                _drop_example_shapes(attribute.g)
                for output in attribute.g.output:
                    output.type.tensor_type.ClearField("shape")
