"""CPU kernels of ScaleNet's fast paths (fast_paths.py): oneDNN's convs with fused post-ops on
channels_last maps, a conv backward that stays off torch's slow single-thread path, and fast
memory-format conversions. Only eager CPU float32 forwards take them; everything else (CUDA,
other dtypes, traced, compiled or exported graphs) runs `F.conv2d` and torch's own copies.
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .layers import in_graph

__all__ = ["conv2d", "conv2d_backward", "cat_channels", "to_memory_format", "is_channels_last", "conv_format"]

# oneDNN's conv with fused post-ops (what inductor uses on CPU), where this torch has it
_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def eager_cpu_float(x: torch.Tensor) -> bool:
    """Whether x is a CPU float32 tensor in an eager forward without CPU autocast, where the fast
    path may pick memory formats and kernels that a graph (or autocast) could not keep."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and not in_graph() and not torch.is_autocast_enabled("cpu")
    )


def onednn(x: torch.Tensor) -> bool:
    """Whether x is an eager CPU float32 channels_last map that oneDNN's convs take as it is."""
    return (
        eager_cpu_float(x)
        and x.is_contiguous(memory_format=torch.channels_last)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format conv2d wants its weight in for input x."""
    return torch.channels_last if onednn(x) else torch.contiguous_format


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: int = 1,
    padding: int = 0,
    relu: bool = False,
    add: Optional[torch.Tensor] = None,
    into_add: bool = False,
) -> torch.Tensor:
    """relu?(conv(x) + bias [+ add]); with into_add, written into `add` (in place).

    On an eager CPU float channels_last input, oneDNN's kernel for every kernel size, with a
    channels_last result: torch sends 1x1 convs at batch < 16 to its own GEMM when it runs on one
    thread, which is 2-3x slower than oneDNN on channels_last maps (same result up to float
    rounding). Where no gradient is needed there, the add and the ReLU run inside the conv
    (oneDNN post-ops, as inductor fuses them: no extra pass over memory). Elsewhere F.conv2d."""
    channels_last = torch.channels_last
    if onednn(x):
        weight = weight.contiguous(memory_format=channels_last)
        conv = ([padding] * 2, [stride] * 2, [1, 1], 1)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if _FUSED_CONV and not needs_grad and (add is None or add.is_contiguous(memory_format=channels_last)):
            unary = "relu" if relu else None
            if add is None:
                out = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *conv, unary or "none", [], "")
            elif into_add:
                out = torch.ops.mkldnn._convolution_pointwise_.binary(
                    add, x, weight, bias, *conv, "add", 1.0, unary, [], ""
                )
            else:
                out = torch.ops.mkldnn._convolution_pointwise.binary(
                    x, add, weight, bias, *conv, "add", 1.0, unary, [], ""
                )
            # a 1-channel input is both NCHW and channels_last, and oneDNN then answers in NCHW
            return (
                out if out.is_contiguous(memory_format=channels_last) else out.contiguous(memory_format=channels_last)
            )
        out = torch.ops.aten.mkldnn_convolution(x, weight, bias, *conv)
        if not out.is_contiguous(memory_format=channels_last):
            out = out.contiguous(memory_format=channels_last)
    else:
        out = F.conv2d(x, weight, bias, stride, padding)
    return add_relu(out, relu, add, into_add)


def add_relu(out: torch.Tensor, relu: bool, add: Optional[torch.Tensor], into_add: bool) -> torch.Tensor:
    """relu?(out [+ add]) as conv2d's post-ops, in place (into `add` with into_add)."""
    if add is not None:
        out = add.add_(out) if into_add else out.add_(add)
    return F.relu_(out) if relu else out


def conv2d_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, needs: Sequence[bool]
) -> List[Optional[torch.Tensor]]:
    """(grad_x, grad_weight) of conv2d(x, weight) (no bias), those that `needs` asks for.

    A 1x1 stride-1 conv on a CPU channels_last map is two matrix products over the pixels, run
    here as such: torch's own backward sends them, on one thread (OMP_NUM_THREADS=1, as torchrun
    and SLURM set it) and a batch below 16, to its slow reference kernel. That includes maps whose
    layout is both formats at once (1x1 pooled maps of small inputs). Elsewhere torch's."""
    one_by_one = weight.shape[-2:] == (1, 1) and stride == 1 and padding == 0
    if one_by_one and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last):
        n, c, height, width = x.shape
        grad = grad.contiguous(memory_format=torch.channels_last)
        rows = grad.permute(0, 2, 3, 1).reshape(n * height * width, -1)  # (pixels, out channels), a view
        matrix = weight.reshape(weight.shape[0], c)
        grad_x = grad_weight = None
        if needs[0]:
            grad_x = torch.empty_like(x, memory_format=torch.channels_last)
            torch.mm(rows, matrix, out=grad_x.permute(0, 2, 3, 1).view(-1, c))
        if needs[1]:
            grad_weight = torch.mm(rows.t(), x.permute(0, 2, 3, 1).reshape(-1, c)).view_as(weight)
        return [grad_x, grad_weight]
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad.contiguous(memory_format=memory_format),
        x,
        weight.contiguous(memory_format=memory_format),
        None,
        [stride] * 2,
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        1,
        [needs[0], needs[1], False],
    )
    return [grad_x, grad_weight]


def _transposed_copy(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """x in `memory_format` (NCHW or channels_last) by one transposed-matrix copy per image, which
    torch does blockwise on CPU: several times faster than the strided copy of .contiguous()."""
    n, c, height, width = x.shape
    out = torch.empty((n, c, height, width), dtype=x.dtype, device=x.device, memory_format=memory_format)
    for image, source in zip(out, x):
        if memory_format == torch.channels_last:  # rows of pixels <- rows of channels
            image.permute(1, 2, 0).view(height * width, c).copy_(source.view(c, height * width).t())
        else:
            image.view(c, height * width).copy_(source.permute(1, 2, 0).view(height * width, c).t())
    return out


_OTHER_FORMAT = {torch.channels_last: torch.contiguous_format, torch.contiguous_format: torch.channels_last}


def _in_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    if x.is_contiguous(memory_format=memory_format):
        return x
    if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=_OTHER_FORMAT[memory_format]):
        return _transposed_copy(x, memory_format)
    return x.contiguous(memory_format=memory_format)


class _ToFormat(torch.autograd.Function):
    """A map in another memory format; its gradient comes back in the input's format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        ctx.input_format = _OTHER_FORMAT[memory_format]
        return _in_format(x, memory_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _in_format(grad, ctx.input_format), None


def to_memory_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """x.contiguous(memory_format=...) for NCHW <-> channels_last maps, fast on CPU (a blocked
    transpose), in the backward too, where a gradient in the other format would make every
    elementwise op of the backward take torch's slow path for mixed formats."""
    if x.is_contiguous(memory_format=memory_format):
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _ToFormat.apply(x, memory_format)
    return _in_format(x, memory_format)


def cat_channels(tensors: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """torch.cat on channels, in channels_last where `like` is: cat falls back to NCHW when an
    input's format is ambiguous (a 1-channel branch), which would send the next conv to NCHW."""
    if len(tensors) == 1:
        return tensors[0]
    if like.is_contiguous() or not like.is_contiguous(memory_format=torch.channels_last):
        return torch.cat(tensors, dim=1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):  # cat(out=) has no gradient
        return torch.cat(tensors, dim=1).contiguous(memory_format=torch.channels_last)
    n, _, height, width = tensors[0].shape
    channels = sum(t.shape[1] for t in tensors)
    out = torch.empty(
        (n, channels, height, width), dtype=like.dtype, device=like.device, memory_format=torch.channels_last
    )
    return torch.cat(tensors, dim=1, out=out)
