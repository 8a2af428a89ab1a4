"""ScaleNet backbone (Li et al., "Data-Driven Neuron Allocation for Scale Aggregation
Networks", CVPR 2019) for detectron2.

ScaleNet is ResNet-50/101/152 with every 3x3 conv replaced by a scale-aggregation (SA)
layer: the block's 1x1-reduced features are max-pooled by 1, 2, 4 and 7, each pooled map
gets its own conv (with the number of output channels the allocation gives it), is resized
back and normalised, and the branches are concatenated. Downsampling between stages is a
2x2 max-pool at the start of the first block, not a strided conv.

The modules here compute exactly the published network (with FrozenBN = eval-mode BN),
and their state_dict keys follow the published checkpoint layout inside each block
(`conv1`, `bn1`, `conv2.{i}`, `bn2.{i}`, `conv3`, `bn3`, `downsample.{0,1}`), so that a
converted ImageNet checkpoint is a renaming only (see checkpoint.py).

Small inputs. The published network fails when a feature map is smaller than a pooling
factor: a scale-s branch on a map with H < s or W < s, or a 1-pixel map entering a
stride-2 block, pools to size 0. Here such a dimension is padded with -inf up to the
factor (as if the kernel were clamped to the dimension's size): it pools to size 1, i.e.
to the maximum over the whole dimension, and is then resized back like any other pooled
map. Whenever the published network runs, nothing is padded and the result is identical.
"""

import contextlib
import functools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem, ResNet
from torch import nn

from .allocation import SCALES, STAGE_NAMES, Allocation, branch_kernel_size, load_allocation

__all__ = [
    "SABottleneck",
    "ScaleNet",
    "make_scalenet_stages",
    "make_norm",
    "group_norm_groups",
    "ScaleNetGroupNorm",
    "max_pool_clamped",
    "resize_like",
    "norm_affine",
    "fold_norm",
    "conv_norm",
    "set_norm_folding",
    "plain_forward",
    "build_scalenet_backbone",
    "build_scalenet_fpn_backbone",
    "build_retinanet_scalenet_fpn_backbone",
]


class ScaleNetGroupNorm(nn.GroupNorm):
    """GroupNorm that also accepts groups holding a single value (a 1-channel group on a
    1x1 map, which small inputs produce in narrow SA branches): they normalise to 0, so
    the output is the bias. F.group_norm refuses them; the underlying op computes this."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def group_norm_groups(channels: int) -> int:
    """Groups for "GN": 32 as detectron2 where that leaves >= 2 channels per group, else the
    largest count that divides `channels` and does (62 -> 31, 12 -> 6, 9 -> 3, 5 -> 1)."""
    return max([g for g in range(1, 33) if channels % g == 0 and channels // g >= 2] or [1])


def make_norm(norm, channels: int) -> nn.Module:
    """detectron2's `get_norm(norm, channels)`, with two ScaleNet-specific rules.

    - An empty norm is refused: every conv of ScaleNet, and every published weight file,
      has a BN after it.
    - "GN": SA branch widths are rarely multiples of 32 (e.g. 9 or 62), so the group count
      follows `group_norm_groups` (32 for any multiple of 32 from 64 up, as detectron2).
    """
    if norm == "GN":
        return ScaleNetGroupNorm(group_norm_groups(channels), channels)
    if norm is None or norm == "":
        raise ValueError(
            "ScaleNet needs a normalisation layer after every conv (the published weights have a BN "
            f"there); got norm={norm!r}. Use FrozenBN, BN, SyncBN, GN or another norm of get_norm."
        )
    try:
        return get_norm(norm, channels)
    except KeyError:
        raise ValueError(
            f"unknown norm {norm!r}: expected a name detectron2's get_norm accepts "
            "(FrozenBN, BN, SyncBN, GN, nnSyncBN, naiveSyncBN, ...) or a callable channels -> module"
        ) from None


@torch.jit.script_if_tracing
def max_pool_clamped(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool with kernel = stride = `factor`, no padding (floor), as the published network.

    A dimension shorter than `factor` is first padded with -inf up to it, so that it pools to
    one value, its maximum, instead of to nothing (where the published network fails; see
    module docstring). Scripted when traced, so that a traced model pads for every input size.
    """
    if not torch.jit.is_scripting() and _exporting():
        return _exported_max_pool_clamped(x, factor)
    pad_h, pad_w = max(factor - x.shape[-2], 0), max(factor - x.shape[-1], 0)
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, [0, pad_w, 0, pad_h], value=float("-inf"))
    return F.max_pool2d(x, kernel_size=factor, stride=factor)


@torch.jit.script_if_tracing
def resize_like(pooled: torch.Tensor, reference: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """`pooled` resized to the height and width of `reference`, as the published network: nearest
    (F.interpolate's, a selection of pooled values) where they are whole multiples of the pooled
    size, else bilinear.
    relu=True: relu of the result, computed at the pooled resolution where the resize is nearest
    (a replication, with which it commutes; bilinear mixes values, so there it comes after).
    Scripted when traced, so that a traced model makes this choice for every input size."""
    height, width = reference.shape[-2], reference.shape[-1]
    if height % pooled.shape[-2] == 0 and width % pooled.shape[-1] == 0:
        return F.interpolate(F.relu(pooled) if relu else pooled, size=[height, width], mode="nearest")
    resized = F.interpolate(pooled, size=[height, width], mode="bilinear", align_corners=False)
    return F.relu(resized) if relu else resized


def norm_affine(norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a norm with frozen statistics (FrozenBatchNorm2d, or BatchNorm2d in eval
    mode), which is then the per-channel affine map x * scale + shift."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.weight is not None:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return scale, shift


def fold_norm(conv: nn.Conv2d, norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv computing norm(conv(x)), for a norm with frozen statistics."""
    scale, shift = norm_affine(norm)
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift


def scaled_weight(
    weight: torch.Tensor, scale: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """weight * scale per output channel, in `memory_format`: in an eager forward where autograd
    records nothing, written there in one pass (not a product, then a copy in the conv's format)."""
    scale = scale.reshape(-1, 1, 1, 1)
    if _in_graph() or (torch.is_grad_enabled() and (weight.requires_grad or scale.requires_grad)):
        return (weight * scale).contiguous(memory_format=memory_format)
    out = torch.empty(
        weight.shape, dtype=torch.result_type(weight, scale), device=weight.device, memory_format=memory_format
    )
    return torch.mul(weight, scale, out=out)


def frozen_statistics(norm: nn.Module) -> bool:
    return isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.track_running_stats
    )


def _in_graph() -> bool:
    """Whether the forward is being traced, compiled or exported: a graph that must hold for
    every input size, so no choice may be made in Python on the shapes of this input."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or _exporting()


def _eager_cpu_float(x: torch.Tensor) -> bool:
    """Whether x is a CPU float32 tensor in an eager forward without CPU autocast, where the fast
    path may pick memory formats and kernels that a graph (or autocast) could not keep."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and not _in_graph() and not torch.is_autocast_enabled("cpu")
    )


def _onednn(x: torch.Tensor) -> bool:
    """Whether x is an eager CPU float32 channels_last map that oneDNN's convs take as it is."""
    return (
        _eager_cpu_float(x)
        and x.is_contiguous(memory_format=torch.channels_last)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


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
    (oneDNN post-ops, as inductor fuses them: no extra pass over memory)."""
    channels_last = torch.channels_last
    if _onednn(x):
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
    return _add_relu(out, relu, add, into_add)


def _add_relu(out: torch.Tensor, relu: bool, add: Optional[torch.Tensor], into_add: bool) -> torch.Tensor:
    """relu?(out [+ add]) as conv2d's post-ops, in place (into `add` with into_add)."""
    if add is not None:
        out = add.add_(out) if into_add else out.add_(add)
    return F.relu_(out) if relu else out


# oneDNN's conv with fused post-ops (what inductor uses on CPU), where this torch has it
_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class _FoldedConv(torch.autograd.Function):
    """conv(x, weight * scale) + shift, for a norm whose affine map has no gradient: the backward
    keeps the conv's own weight, not a folded copy of it (recomputed there, one multiply), so that
    training holds no more than the plain forward does. Under autocast, the backward runs in the
    dtype the conv ran in, and hands back gradients in the inputs' dtypes, as autocast's casts do."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, stride: int, padding: int):
        out = conv2d(x, scaled_weight(weight, scale, _conv_format(x)), shift, stride, padding)
        ctx.save_for_backward(x, weight, scale)
        ctx.stride, ctx.padding, ctx.dtype = stride, padding, out.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        memory_format = torch.channels_last if _channels_last(x) else torch.contiguous_format
        folded = scaled_weight(weight, scale, memory_format).to(ctx.dtype)
        grad_x, grad_folded, _ = torch.ops.aten.convolution_backward(
            grad.to(ctx.dtype).contiguous(memory_format=memory_format),
            x.to(ctx.dtype),
            folded,
            None,
            [ctx.stride] * 2,
            [ctx.padding] * 2,
            [1, 1],
            False,
            [0, 0],
            1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_weight = None if grad_folded is None else grad_folded.to(weight.dtype) * scale.reshape(-1, 1, 1, 1)
        return grad_x, grad_weight, None, None, None, None


class _MaxPool(torch.autograd.Function):
    """F.max_pool2d with kernel = stride = factor, keeping for the backward its input, which the
    ops around it keep anyway, rather than the argmax indices (int64: twice the bytes of the
    pooled map); the backward finds them again with the same kernel, ties included."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.factor = factor
        return F.max_pool2d(x, kernel_size=factor, stride=factor)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel = [ctx.factor] * 2
        _, indices = F.max_pool2d(x, kernel, kernel, return_indices=True)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, kernel, kernel, [0, 0], [1, 1], False, indices
        ), None


def max_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """max_pool_clamped; in an eager forward that autograd records, through _MaxPool."""
    if not _in_graph() and torch.is_grad_enabled() and x.requires_grad and min(x.shape[-2:]) >= factor:
        return _MaxPool.apply(x, factor)
    return max_pool_clamped(x, factor)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _conv_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format conv2d wants its weight in for input x."""
    return torch.channels_last if _onednn(x) else torch.contiguous_format


def conv_norm(
    x: torch.Tensor,
    conv: nn.Conv2d,
    norm: nn.Module,
    relu: bool = False,
    add: Optional[torch.Tensor] = None,
    into_add: bool = False,
) -> torch.Tensor:
    """relu?(norm(conv(x)) [+ add]) for a norm with frozen statistics, folded into the conv (see
    conv2d for `add` and `into_add`)."""
    stride, padding = conv.stride[0], conv.padding[0]
    scale, shift = norm_affine(norm)
    if (
        torch.is_grad_enabled()
        and (x.requires_grad or conv.weight.requires_grad)
        and not (scale.requires_grad or shift.requires_grad)
        and not _in_graph()
    ):
        return _add_relu(_FoldedConv.apply(x, conv.weight, scale, shift, stride, padding), relu, add, into_add)
    return conv2d(x, scaled_weight(conv.weight, scale, _conv_format(x)), shift, stride, padding, relu, add, into_add)


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


def _in_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    if x.is_contiguous(memory_format=memory_format):
        return x
    if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=_OTHER_FORMAT[memory_format]):
        return _transposed_copy(x, memory_format)
    return x.contiguous(memory_format=memory_format)


_OTHER_FORMAT = {torch.channels_last: torch.contiguous_format, torch.contiguous_format: torch.channels_last}


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


@functools.lru_cache(maxsize=4096)
def _interpolate_replicates(size: int, pooled: int, device: torch.device) -> bool:
    """Whether F.interpolate(mode="nearest") from `pooled` to `size` (a multiple of it) repeats
    each value size // pooled times in a row. It usually does, but its source index is computed
    in float32 (floor(i * (pooled / size))), which for some sizes rounds down: 2 -> 82 takes 41
    values from the first row and 41 from the second, but at index 41 rather than 40."""
    source = torch.arange(pooled, dtype=torch.float32, device=device).reshape(1, 1, pooled, 1)
    selected = F.interpolate(source, size=[size, 1], mode="nearest").flatten()
    return torch.equal(selected, torch.arange(size, device=device, dtype=torch.float32) // (size // pooled))


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


def replicates(pooled: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether `resize_like(pooled, reference)` repeats each value of `pooled` in a block of
    (H / h) x (W / w) pixels (see _interpolate_replicates)."""
    (height, width), (h, w) = reference.shape[-2:], pooled.shape[-2:]
    return (
        height % h == 0
        and width % w == 0
        and _interpolate_replicates(height, h, pooled.device)
        and _interpolate_replicates(width, w, pooled.device)
    )


def add_replicated_(out: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """out += resize_like(pooled, out), in place, without the resized copy: a broadcast over the
    replicated rows and columns. Only where `replicates(pooled, out)`."""
    (n, c, height, width), (h, w) = out.shape, pooled.shape[-2:]
    out.view(n, c, h, height // h, w, width // w).add_(pooled[:, :, :, None, :, None])
    return out


def added_replicated(x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """x + resize_like(pooled, x), a new map in x's memory format (see add_replicated_)."""
    (n, c, height, width), (h, w) = x.shape, pooled.shape[-2:]
    blocks = (n, c, h, height // h, w, width // w)
    out = torch.empty_like(x)
    torch.add(x.view(blocks), pooled[:, :, :, None, :, None], out=out.view(blocks))
    return out


def nest_replicated(parts: List[torch.Tensor]) -> List[torch.Tensor]:
    """Maps to be replicated onto one full-resolution map, fewer: one whose grid divides a larger
    one's is added into that one by replication first. Exact: replicating h -> h' -> H repeats each
    value H / h times, as h -> H does, wherever h divides h' and h' divides H."""
    groups: List[torch.Tensor] = []
    for part in sorted(parts, key=lambda t: -t.shape[-2] * t.shape[-1]):
        for group in groups:
            if group.shape[-2] % part.shape[-2] == 0 and group.shape[-1] % part.shape[-1] == 0:
                add_replicated_(group, part)
                break
        else:
            groups.append(part)
    return groups


def batch_norm_of_replicated(norm: nn.BatchNorm2d, pooled: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """norm(resize_like(pooled, reference)), for a BatchNorm2d in training mode, computed at the
    pooled resolution and not yet resized, where the resize replicates (`replicates`): every
    value then appears the same number of times, so batch mean and (biased) variance are those
    of `pooled`. Only the running variance's unbiased correction n / (n - 1) counts the values
    at the full resolution, as the norm on the resized map would; it is applied here."""
    if norm.track_running_stats and norm.running_mean is not None:
        repeats = (reference.shape[-2] // pooled.shape[-2]) * (reference.shape[-1] // pooled.shape[-1])
        count = pooled.numel() // pooled.shape[1] * repeats
        with torch.no_grad():
            var, mean = torch.var_mean(pooled, dim=(0, 2, 3), correction=0)
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
            norm.running_var.lerp_((var * (count / (count - 1))).to(norm.running_var.dtype), factor)
    return F.batch_norm(pooled, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)


# torch.export: the shape-dependent steps are operators whose output shape (register_fake) is
# plain arithmetic on the input's, so that an exported program keeps the choices above for
# every input size instead of freezing those of the example input. A pooled branch is one
# operator (pool, conv, resize back): its pooled map, often 1x1, stays inside it, where the
# export cannot freeze that map's memory layout either.
@torch.library.custom_op("scalenet_d2::max_pool_clamped", mutates_args=())
def _max_pool_clamped_op(x: torch.Tensor, factor: int) -> torch.Tensor:
    return max_pool_clamped(x, factor)


@_max_pool_clamped_op.register_fake
def _(x, factor):
    height, width = x.shape[-2], x.shape[-1]
    return x.new_empty((x.shape[0], x.shape[1], torch.sym_max(1, height // factor), torch.sym_max(1, width // factor)))


@torch.library.custom_op("scalenet_d2::pooled_branch", mutates_args=())
def _pooled_branch_op(
    y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: int, relu: bool
) -> torch.Tensor:
    pooled = F.conv2d(max_pool_clamped(y, scale), weight, bias, padding=weight.shape[-1] // 2)
    return resize_like(pooled, y, relu)


@_pooled_branch_op.register_fake
def _(y, weight, bias, scale, relu):
    return y.new_empty((y.shape[0], weight.shape[0], y.shape[-2], y.shape[-1]))


@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting()


@torch.jit.unused
def _exported_max_pool_clamped(x: torch.Tensor, factor: int) -> torch.Tensor:
    return torch.ops.scalenet_d2.max_pool_clamped(x, factor)


@torch.jit.unused
def _exported_pooled_branch(
    y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: int, relu: bool
) -> torch.Tensor:
    return torch.ops.scalenet_d2.pooled_branch(y, weight, bias, scale, relu)


class SABottleneck(CNNBlockBase):
    """ScaleNet bottleneck: [2x2 max-pool if stride 2] -> 1x1 conv -> SA layer -> 1x1 conv,
    plus a shortcut (identity, or 1x1 conv + norm in the first block of a stage).

    The SA layer: for each scale s with a non-zero width c_s, in scale order, max-pool by s ->
    conv to c_s channels -> resize back -> norm; concatenate; ReLU. Its convs and norms are
    `conv2[str(i)]` and `bn2[str(i)]` for branch index i (scale SCALES[i]), present only where
    c_i > 0. With conv1, bn1, conv3, bn3 and downsample.{0,1} these are the published names.

    Args (the keywords of `ResNet.make_stage`):
        in_channels, out_channels: of the block (out_channels = 4 x bottleneck_channels).
        bottleneck_channels: the width `planes` of conv1's output, the SA layer's input.
        widths: SA branch widths (c1, c2, c4, c7); 0 = no branch.
        side: the stage's feature side at a 224x224 input: it fixes each branch's kernel
            (3x3 while side / 2**i > 1, else 1x1; see `allocation.branch_kernel_size`).
        stride: 2 for the first block of res3..res5 (a 2x2 max-pool), else 1.
        shortcut_conv: True for the first block of every stage (res2 included).
        norm: a detectron2 norm name or callable (see `make_norm`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        widths: Sequence[int],
        side: int,
        stride: int = 1,
        shortcut_conv: bool = False,
        norm="BN",
    ):
        super().__init__(in_channels, out_channels, stride)
        if stride not in (1, 2):
            raise ValueError(f"stride {stride}: a ScaleNet block has stride 1 or 2")
        if not shortcut_conv and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"a block with an identity shortcut needs stride 1 and in_channels == out_channels; got "
                f"stride {stride}, in_channels {in_channels}, out_channels {out_channels}"
            )
        if len(widths) != len(SCALES) or min(widths) < 0 or sum(widths) == 0:
            raise ValueError(f"widths {tuple(widths)}: expected 4 non-negative integers (c1, c2, c4, c7), not all 0")
        self.widths = tuple(int(w) for w in widths)
        self.side = side
        self.fold_norms = True  # forward_folded where exact; set_norm_folding(model, False) to compare

        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.bn1 = make_norm(norm, bottleneck_channels)
        self.conv2 = nn.ModuleDict()
        self.bn2 = nn.ModuleDict()
        for i, width in enumerate(self.widths):
            if width > 0:  # a pruned branch has no conv and no norm
                kernel = branch_kernel_size(side, i)
                self.conv2[str(i)] = nn.Conv2d(bottleneck_channels, width, kernel, padding=kernel // 2, bias=False)
                self.bn2[str(i)] = make_norm(norm, width)
        # scale factor of each branch that exists, in the order of conv2 / bn2
        self.scales = tuple(scale for scale, width in zip(SCALES, self.widths) if width > 0)
        self.conv3 = nn.Conv2d(sum(self.widths), out_channels, kernel_size=1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        if shortcut_conv:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                make_norm(norm, out_channels),
            )
        else:
            self.downsample = None

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                weight_init.c2_msra_fill(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._folds():
            return self.forward_folded(x)
        if self.stride == 2:
            x = max_pool_clamped(x, 2)  # the block's only downsampling: both paths see it
        shortcut = x if self.downsample is None else self.downsample(x)

        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.sa_layer(out)
        out = self.bn3(self.conv3(out))
        return F.relu_(out + shortcut)

    def sa_layer(self, y: torch.Tensor) -> torch.Tensor:
        """The scale-aggregation layer on conv1's activated output y."""
        branches: List[torch.Tensor] = []
        for scale, conv, norm in zip(self.scales, self.conv2.values(), self.bn2.values()):
            if scale == 1:
                z = conv(y)
            elif not torch.jit.is_scripting() and _exporting():
                z = _exported_pooled_branch(y, conv.weight, None, scale, False)  # the line below, as one operator
            else:
                z = conv(max_pool_clamped(y, scale))
                normalised = None if torch.jit.is_scripting() else self._batch_norm_pooled(scale, z, y)
                if normalised is not None:
                    branches.append(resize_like(normalised, y))
                    continue
                z = resize_like(z, y)
            branches.append(norm(z))  # norm after resize
        return F.relu_(torch.cat(branches, dim=1))

    @torch.jit.unused
    def _batch_norm_pooled(self, scale: int, z: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """The scale-`scale` branch's norm of resize_like(z, y) before the resize, where that is
        exact (see batch_norm_of_replicated): BatchNorm2d with batch statistics, a resize that
        replicates, more than one value per channel (BN refuses one), an eager forward; else None."""
        norm = self.bn2[str(SCALES.index(scale))]
        if (
            type(norm) is nn.BatchNorm2d
            and norm.training
            and z.numel() > z.shape[1]
            and not _in_graph()
            and replicates(z, y)
        ):
            return batch_norm_of_replicated(norm, z, y)
        return None

    @torch.jit.unused
    def _folds(self) -> bool:
        """Whether forward takes forward_folded: folding enabled and every norm frozen."""
        norms = [self.bn1, self.bn3, *self.bn2.values()] + ([] if self.downsample is None else [self.downsample[1]])
        return self.fold_norms and all(frozen_statistics(norm) for norm in norms)

    @torch.jit.unused
    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` (up to float rounding) where every norm has frozen statistics, with fewer
        passes over memory and fewer FLOPs. The default wherever every norm is frozen (FrozenBN,
        in training too; BN in eval: detectron2's predictor, exports); gradients reach the conv
        weights through the folding; weights and checkpoints unchanged. Exact rewrites:

        - every norm folded into its conv, a branch's norm too (a per-channel affine map
          commutes with nearest and with bilinear resizing, whose weights sum to 1);
        - pooling by 4 as pooling by 2 of the pool by 2 (the max of maxima over the same cells);
        - where autograd records nothing: a nearest branch's ReLU at its pooled resolution (a
          selection commutes with it), and conv3 pushed through the concatenation, which it
          reads as a sum of one 1x1 conv per branch: a branch whose resize replicates values
          (`replicates`) gets its slice of conv3 at the pooled resolution, the slices are nested
          (`nest_replicated`) and added by broadcasting into the shortcut, and the others
          (scale 1, bilinear) are concatenated for the rest of conv3, which adds into that sum;
        - where it records: what the backward keeps is what the plain forward keeps (folded
          convs keep the conv's weight, pools their input, and the branches share one ReLU on the
          concatenation); the broadcast's backward, a strided sum, measured slower than the
          concatenation's, so nothing is pushed there.

        In a traced, compiled or exported graph, which must hold for every input size, the
        branches all take the shape-independent route (resized, concatenated).
        """
        if self.stride == 2:
            x = max_pool(x, 2)
        shortcut = x if self.downsample is None else conv_norm(x, self.downsample[0], self.downsample[1])
        y = conv_norm(x, self.conv1, self.bn1, relu=True)
        eager = not _in_graph()
        # conv3 pushed through the concatenation only where no gradient flows back: the backward
        # of its broadcast, a strided sum, measured slower than the concatenation's
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        push = eager and not grad
        # with gradients, one ReLU on the concatenation, which conv3 keeps for the backward anyway,
        # rather than one per branch, each of which would keep its own output too
        relu = not grad
        scale3 = bias3 = None  # bn3's affine map, for conv3's slices where branches are pushed
        full: List[torch.Tensor] = []  # branches at y's resolution, and their channels of conv3's input
        full_channels: List[slice] = []
        pushed: List[torch.Tensor] = []  # conv3 slices of the branches that replicate, at their pooled resolution
        pooled_by = {}
        start = 0
        for scale, conv, norm in zip(self.scales, self.conv2.values(), self.bn2.values()):
            channels = slice(start, start + conv.out_channels)
            start = channels.stop
            if scale == 1:
                full.append(conv_norm(y, conv, norm, relu=relu))
            elif _exporting():
                full.append(_exported_pooled_branch(y, *fold_norm(conv, norm), scale, relu))
            elif not eager:
                full.append(resize_like(conv_norm(max_pool_clamped(y, scale), conv, norm), y, relu))
            else:
                if scale == 4 and 2 in pooled_by and min(y.shape[-2:]) >= 4:
                    pooled_by[4] = max_pool(pooled_by[2], 2)
                else:
                    pooled_by[scale] = max_pool(y, scale)
                if push and replicates(pooled_by[scale], y):
                    if scale3 is None:
                        scale3, bias3 = norm_affine(self.bn3)
                    z = conv_norm(pooled_by[scale], conv, norm, relu=True)
                    pushed.append(conv2d(z, scaled_weight(self.conv3.weight[:, channels], scale3)))
                    continue
                full.append(resize_like(conv_norm(pooled_by[scale], conv, norm), y, relu))
            full_channels.append(channels)
        # what conv3 adds to: the shortcut and the pushed branches' conv3 slices, added by
        # broadcasting, a slice first into a larger one whose grid holds its own (one pass less)
        residual = shortcut if self.downsample is not None else None  # a fresh map: conv3 may add into it
        for part in nest_replicated(pushed):
            residual = added_replicated(shortcut, part) if residual is None else add_replicated_(residual, part)
        add, into_add = (shortcut, False) if residual is None else (residual, True)
        if not full:
            return F.relu_(add.add(bias3.reshape(-1, 1, 1)))
        features = cat_channels(full, y) if relu else F.relu_(cat_channels(full, y))
        if not pushed:
            return conv_norm(features, self.conv3, self.bn3, relu=True, add=add, into_add=into_add)
        parts = [self.conv3.weight[:, c] for c in full_channels]
        weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return conv2d(features, scaled_weight(weight, scale3), bias3, relu=True, add=add, into_add=into_add)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, side={self.side}, stride={self.stride}"


def set_norm_folding(model: nn.Module, enabled: bool) -> nn.Module:
    """Whether the SA blocks of `model` use `SABottleneck.forward_folded` where it is exact (the
    default) or always the plain forward (to compare the two, or to time the plain one)."""
    for module in model.modules():
        if isinstance(module, SABottleneck):
            module.fold_norms = enabled
    return model


@contextlib.contextmanager
def plain_forward(model: nn.Module):
    """Within it, the SA blocks of `model` run their plain forward (FLOP counts that follow the
    paper's convention, which counts the norms, and module hooks, which folding bypasses)."""
    blocks = [m for m in model.modules() if isinstance(m, SABottleneck)]
    saved = [block.fold_norms for block in blocks]
    try:
        set_norm_folding(model, False)
        yield model
    finally:
        for block, fold in zip(blocks, saved):
            block.fold_norms = fold


def make_scalenet_stages(allocation: Allocation, norm) -> List[List[SABottleneck]]:
    """The blocks of res2..res5 of `allocation`, with `ResNet.make_stage`: the first block of a
    stage has the 1x1 shortcut conv and, from res3 on, stride 2; the others an identity shortcut."""
    stages, in_channels = [], allocation.stem_channels
    for index, stage in enumerate(allocation.stages):
        num_blocks = len(stage.blocks)
        stages.append(
            ResNet.make_stage(
                SABottleneck,
                num_blocks,
                in_channels=in_channels,
                out_channels=stage.out_channels,
                bottleneck_channels=stage.planes,
                widths_per_block=list(stage.blocks),
                side=stage.side,
                stride_per_block=[1 if index == 0 else 2] + [1] * (num_blocks - 1),
                shortcut_conv_per_block=[True] + [False] * (num_blocks - 1),
                norm=norm,
            )
        )
        in_channels = stage.out_channels
    return stages


class ScaleNet(ResNet):
    """ScaleNet body: detectron2's ResNet with its BasicStem and stages res2..res5 of SABottleneck.

    Outputs, strides, stage naming, FREEZE_AT and the dropping of stages after the last
    requested output are those of detectron2's ResNet. Channels are 4 * planes (256..2048 for
    the published allocations).

    Args:
        allocation: an `Allocation`, a bundled allocation name or an allocation file path.
        norm: detectron2 norm name ("FrozenBN", "BN", "SyncBN", "GN", ...) or callable.
        out_features: which of stem, res2..res5 to return.
        freeze_at: as detectron2's ResNet: 0 nothing, 1 the stem, k >= 2 the stem and
            res2..res{k}; frozen parts get requires_grad=False and FrozenBN.
        in_channels: channels of the input image.
    """

    def __init__(
        self,
        allocation: Union[Allocation, str],
        norm="FrozenBN",
        out_features: Sequence[str] = STAGE_NAMES,
        freeze_at: int = 0,
        in_channels: int = 3,
    ):
        allocation = load_allocation(allocation)
        known = ("stem",) + STAGE_NAMES
        out_features = list(out_features)
        if not out_features or any(name not in known for name in out_features):
            raise ValueError(f"ScaleNet out_features {out_features}: expected a non-empty subset of {list(known)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at {freeze_at}: expected 0 (nothing) .. 5 (the stem and res2..res5)")
        make_norm(norm, 64)  # fail here, with a clear message, on an unknown norm
        # detectron2's stem is exactly the published one; give it ScaleNet's norm rules too
        stem = BasicStem(in_channels, allocation.stem_channels, functools.partial(make_norm, norm))
        super().__init__(
            stem,
            make_scalenet_stages(allocation, norm),
            out_features=[name for name in known if name in out_features],
            freeze_at=freeze_at,
        )
        self.allocation = allocation
        self.register_forward_pre_hook(_check_images)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """detectron2's ResNet.forward. Where every norm is frozen (every block takes
        `SABottleneck.forward_folded`) on CPU, the stem's norm is folded too and the features run
        in channels_last, where pooling is 10-20x faster than in NCHW and oneDNN's convs take them
        directly. The outputs then come in the input's memory format, as a conv's would (NCHW for
        detectron2's images), except where autograd records them (training): there they stay
        channels_last, as an NCHW copy would be kept for the backward beside each original."""
        if not torch.jit.is_scripting() and self._fast_cpu(x):
            outputs = self._stages(self._stem_channels_last(to_memory_format(x, torch.channels_last)))
            # where autograd keeps them, an NCHW copy would be kept beside each channels_last map
            if any(feature.requires_grad for feature in outputs.values()) or (_channels_last(x)):
                return outputs
            return {name: to_memory_format(feature, torch.contiguous_format) for name, feature in outputs.items()}
        return self._stages(self.stem(x))

    def _stages(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The outputs of the stem (its output x) and of the stages that are asked for."""
        outputs: Dict[str, torch.Tensor] = {}
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    @torch.jit.unused
    def _fast_cpu(self, x: torch.Tensor) -> bool:
        return (
            _eager_cpu_float(x)
            and frozen_statistics(self.stem.conv1.norm)
            and all(block._folds() for stage in self.stages for block in stage)
        )

    @torch.jit.unused
    def _stem_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """detectron2's BasicStem with its norm folded, in channels_last."""
        conv = self.stem.conv1
        return F.max_pool2d(conv_norm(x, conv, conv.norm, relu=True), kernel_size=3, stride=2, padding=1)


def _check_images(body: ScaleNet, inputs: Tuple[torch.Tensor]) -> None:
    """A clear error for what ResNet's forward would fail on deep inside a conv."""
    x = inputs[0]
    if x.dim() != 4 or x.shape[1] != body.stem.in_channels or x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"ScaleNet takes images of shape (N, {body.stem.in_channels}, H, W) with H, W >= 1; "
            f"got a tensor of shape {x.shape}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"ScaleNet takes floating-point images (normalised as MODEL.PIXEL_MEAN/PIXEL_STD say); got {x.dtype}"
        )


def _scalenet_from_cfg(cfg, input_shape: ShapeSpec) -> ScaleNet:
    scalenet_cfg = cfg.MODEL.SCALENET
    return ScaleNet(
        scalenet_cfg.ALLOCATION,
        norm=scalenet_cfg.NORM,
        out_features=scalenet_cfg.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels,
    )


def fpn_from_cfg(cfg, bottom_up: Backbone, top_block) -> FPN:
    """detectron2's FPN on `bottom_up` with the MODEL.FPN settings, as its ResNet builders make it."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def _check_fpn_inputs(cfg, required: Sequence[str]) -> None:
    missing = [name for name in required if name not in cfg.MODEL.SCALENET.OUT_FEATURES]
    if missing:
        raise ValueError(
            f"the FPN needs {list(required)} from the ScaleNet body, but MODEL.SCALENET.OUT_FEATURES is "
            f"{list(cfg.MODEL.SCALENET.OUT_FEATURES)} (missing {missing}); add them to MODEL.SCALENET.OUT_FEATURES"
        )


@BACKBONE_REGISTRY.register()
def build_scalenet_backbone(cfg, input_shape: ShapeSpec):
    """ScaleNet body from cfg.MODEL.SCALENET (ALLOCATION, NORM, OUT_FEATURES) and BACKBONE.FREEZE_AT."""
    return _scalenet_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_scalenet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN with LastLevelMaxPool (P6) on ScaleNet, as detectron2's build_resnet_fpn_backbone."""
    _check_fpn_inputs(cfg, cfg.MODEL.FPN.IN_FEATURES)
    bottom_up = _scalenet_from_cfg(cfg, input_shape)
    return fpn_from_cfg(cfg, bottom_up, LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_retinanet_scalenet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN with P6/P7 from res5 on ScaleNet, as detectron2's build_retinanet_resnet_fpn_backbone."""
    _check_fpn_inputs(cfg, list(cfg.MODEL.FPN.IN_FEATURES) + ["res5"])
    bottom_up = _scalenet_from_cfg(cfg, input_shape)
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return fpn_from_cfg(cfg, bottom_up, LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS))
