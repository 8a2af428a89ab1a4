"""Exact rewrites of ScaleNet's forward (scalenet.py), and the one place that chooses, per block
and per call, which forward runs: `block_forward` (and `body_forward` for the whole body on CPU).

Routes, by `fast_path` mode (MODEL.SCALENET.FAST_PATH, `ScaleNet(fast_path=...)`):

| mode | device | norms | route |
|---|---|---|---|
| "off" | any | any | plain: the paper's forward as written (scalenet.py) |
| "on" | any | all frozen (FrozenBN; BN or SyncBN in eval) | folded (`forward_folded`) |
| "on" | any | an SA branch is BatchNorm2d with batch statistics | pooled BN (`forward_pooled_bn`) |
| "on" | any | otherwise (GN, SyncBN in training, ...) | plain |
| "auto" | CPU | | as "on"; float32 eager forwards of a folded body run channels_last with oneDNN convs (cpu_kernels.py); plain for a body's small inputs (`small_cpu_call`) |
| "auto" | CUDA, other | | plain, until a GPU measurement shows a route faster there (docs/fast_paths.md) |

TorchScript always compiles the plain forward. Traced, compiled and exported graphs, which must
hold for every input size, take the shape-independent parts of a route (every branch resized
and concatenated). Folded weights are computed at every call, never kept: a kept copy would cost
the body's weights once more in memory and would have to notice every write to its sources.

Every rewrite is exact up to float rounding:
- a norm with frozen statistics is a per-channel affine map, folded into the conv before it; a
  branch's norm too (an affine map commutes with nearest and with bilinear resizing, whose
  weights sum to 1);
- pooling by 4 is pooling by 2 of the pool by 2 (the max of maxima over the same cells);
- where the nearest resize replicates values (`replicates`), a branch's ReLU runs at its pooled
  resolution, and conv3, a sum of one 1x1 conv per branch, is pushed through the concatenation:
  the branch's slice of conv3 runs at the pooled resolution and is added by broadcasting;
- BatchNorm with batch statistics of a replicated map equals BatchNorm of the pooled map (every
  value appears equally often), the unbiased running variance apart, which is corrected.
"""

import contextlib
import contextvars
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from .cpu_kernels import (
    add_relu,
    cat_channels,
    conv2d,
    conv2d_backward,
    conv_format,
    eager_cpu_float,
    is_channels_last,
    to_memory_format,
)
from .layers import compiling, in_graph, max_pool_clamped, resize_like

__all__ = [
    "block_route",
    "block_forward",
    "body_forward",
    "stages_in_channels_last",
    "small_cpu_call",
    "AUTO_CPU_MIN_WORK",
    "forward_folded",
    "forward_pooled_bn",
    "frozen_statistics",
    "norm_affine",
    "fold_norm",
    "conv_norm",
    "replicates",
    "add_replicated_",
    "added_replicated",
    "nest_replicated",
    "batch_norm_of_replicated",
]

PLAIN, FOLDED, POOLED_BN = "plain", "folded", "pooled_bn"


# "auto" on CPU runs a body's plain forward where its input has fewer than this many values at the
# stem's width (N x H x W x stem channels): there oneDNN's fixed cost per conv call and folding the
# weights at every call outweigh what the rewrites save. At or above every crossover measured on an
# AVX2 CPU (docs/fast_paths.md, "Small inputs on CPU"): ScaleNet-50 (stem 64) about 256x256 at
# batch 1, scalenet_tiny (stem 16) about 360x360.
AUTO_CPU_MIN_WORK = 2**22

# set while a body runs its small-input plain forward: its "auto" blocks take the plain route too
_PLAIN_BLOCKS = contextvars.ContextVar("scalenet_d2_plain_blocks", default=False)


@contextlib.contextmanager
def _plain_blocks() -> Iterator[None]:
    token = _PLAIN_BLOCKS.set(True)
    try:
        yield
    finally:
        _PLAIN_BLOCKS.reset(token)


def rewrites_enabled(mode: str, x: torch.Tensor) -> bool:
    """Whether `mode` lets a forward on x take the exact rewrites (see the table above)."""
    return mode == "on" or (mode == "auto" and x.device.type == "cpu")


def small_cpu_call(body: nn.Module, x: torch.Tensor) -> bool:
    """Whether "auto" runs the body's plain forward on x: an eager CPU call below AUTO_CPU_MIN_WORK."""
    if body.fast_path != "auto" or x.device.type != "cpu" or in_graph():
        return False
    n, _, height, width = x.shape
    return n * height * width * body.stem.conv1.out_channels < AUTO_CPU_MIN_WORK


def frozen_statistics(norm: nn.Module) -> bool:
    return isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.track_running_stats
    )


def _batch_statistics(norm: nn.Module) -> bool:
    return type(norm) is nn.BatchNorm2d and norm.training


def block_route(block: nn.Module, x: torch.Tensor) -> str:
    """Which forward the SA block runs on x: PLAIN, FOLDED or POOLED_BN (the table above)."""
    if not rewrites_enabled(block.fast_path, x):
        return PLAIN
    if block.fast_path == "auto" and not in_graph() and _PLAIN_BLOCKS.get():
        return PLAIN
    if all(frozen_statistics(norm) for norm in block.norms()):
        return FOLDED
    if not in_graph() and any(_batch_statistics(norm) for norm in block.bn2.values()):
        return POOLED_BN
    return PLAIN


def block_forward(block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The block's output by its route, or None where that is the plain forward."""
    route = block_route(block, x)
    if route == FOLDED:
        return forward_folded(block, x)
    if route == POOLED_BN:
        return forward_pooled_bn(block, x)
    return None


def body_forward(body: nn.Module, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
    """ScaleNet.forward by the body's route, or None where each block chooses its own (the loop of
    detectron2's ResNet).

    - "auto" on CPU, small inputs (`small_cpu_call`): the plain forward, every "auto" block included;
      without autograd in channels_last (`stages_in_channels_last`), 5-15% faster there than in NCHW.
    - On CPU where every block folds: the stem's norm folded too, and the features in channels_last."""
    if small_cpu_call(body, x):
        with _plain_blocks():
            if eager_cpu_float(x) and not torch.is_grad_enabled():
                return stages_in_channels_last(body, body.stem(to_memory_format(x, torch.channels_last)), x)
            return body.run_stages(body.stem(x))
    if not rewrites_enabled(body.fast_path, x):
        return None
    blocks = [block for stage in body.stages for block in stage]
    if not (
        eager_cpu_float(x)
        and frozen_statistics(body.stem.conv1.norm)
        and all(block_route(block, x) == FOLDED for block in blocks)
    ):
        return None
    conv = body.stem.conv1
    # nested calls: the input's channels_last copy is freed before the pool, the conv's output after it
    stem = F.max_pool2d(conv_norm(to_memory_format(x, torch.channels_last), conv, conv.norm, relu=True), 3, 2, 1)
    return stages_in_channels_last(body, stem, x)


def stages_in_channels_last(body: nn.Module, features: torch.Tensor, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The body's outputs from its stem's output `features` (channels_last) on the image x, the stages
    run on channels_last maps, where pooling is 10-20x faster than in NCHW on CPU and oneDNN's convs
    take them directly. The outputs come in x's memory format, as a conv's would (NCHW for
    detectron2's images), in training too: an FPN fed channels_last maps made the whole training
    step 1.4x slower on an AVX2 CPU (docs/fast_paths.md). Each output is converted once the next
    stage has read it, so that only one stage's output exists in both formats at once."""
    if is_channels_last(x):
        return body.run_stages(features)
    outputs: Dict[str, torch.Tensor] = {}
    name = "stem"
    for next_name, stage in zip(body.stage_names, body.stages):
        next_features = stage(features)
        if name in body._out_features:
            outputs[name] = to_memory_format(features, torch.contiguous_format)
        features, name = next_features, next_name
    if name in body._out_features:
        outputs[name] = to_memory_format(features, torch.contiguous_format)
    return outputs


# -- norms folded into convs ----------------------------------------------------------------


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
    if in_graph() or (torch.is_grad_enabled() and (weight.requires_grad or scale.requires_grad)):
        return (weight * scale).contiguous(memory_format=memory_format)
    out = torch.empty(
        weight.shape, dtype=torch.result_type(weight, scale), device=weight.device, memory_format=memory_format
    )
    return torch.mul(weight, scale, out=out)


class _FoldedConv(torch.autograd.Function):
    """conv(x, weight * scale) + shift, for a norm whose affine map has no gradient: the backward
    keeps the conv's own weight, not a folded copy of it (recomputed there, one multiply), so that
    training holds no more than the plain forward does. Under autocast, the backward runs in the
    dtype the conv ran in (in float16 in the order of the plain forward's, see below), and hands
    back gradients in the inputs' dtypes, as autocast's casts do."""

    @staticmethod
    def forward(ctx, x, weight, scale, shift, stride: int, padding: int):
        out = conv2d(x, scaled_weight(weight, scale, conv_format(x)), shift, stride, padding)
        ctx.save_for_backward(x, weight, scale)
        ctx.conv, ctx.dtype = (stride, padding), out.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        grad = grad.to(ctx.dtype)
        if ctx.dtype == torch.float16:
            # The folded weight's gradient is the conv weight's divided by the norm's scale: in
            # float16's range it would overflow first wherever |scale| < 1, and a GradScaler would
            # skip steps the plain forward takes. Scale the output's gradient, as the norm's backward does.
            grad = grad * scale.to(ctx.dtype).reshape(-1, 1, 1)
            grad_x, grad_weight = conv2d_backward(grad, x.to(ctx.dtype), weight.to(ctx.dtype), *ctx.conv, needs)
        else:  # one multiply of the (small) weight and its gradient instead of one of the output's gradient
            folded = scaled_weight(weight, scale).to(ctx.dtype)
            grad_x, grad_folded = conv2d_backward(grad, x.to(ctx.dtype), folded, *ctx.conv, needs)
            grad_weight = None if grad_folded is None else grad_folded * scale.reshape(-1, 1, 1, 1)
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None, None, None


def conv_norm(
    x: torch.Tensor,
    conv: nn.Conv2d,
    norm: nn.Module,
    relu: bool = False,
    add: Optional[torch.Tensor] = None,
    into_add: bool = False,
) -> torch.Tensor:
    """relu?(norm(conv(x)) [+ add]) for a norm with frozen statistics, folded into the conv (see
    cpu_kernels.conv2d for `add` and `into_add`)."""
    stride, padding = conv.stride[0], conv.padding[0]
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad) and not in_graph():
        scale, shift = norm_affine(norm)
        if not (scale.requires_grad or shift.requires_grad):
            return add_relu(_FoldedConv.apply(x, conv.weight, scale, shift, stride, padding), relu, add, into_add)
    scale, shift = norm_affine(norm)
    return conv2d(x, scaled_weight(conv.weight, scale, conv_format(x)), shift, stride, padding, relu, add, into_add)


# -- pooling --------------------------------------------------------------------------------


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
    if not in_graph() and torch.is_grad_enabled() and x.requires_grad and min(x.shape[-2:]) >= factor:
        return _MaxPool.apply(x, factor)
    return max_pool_clamped(x, factor)


# -- nearest resizes that replicate ---------------------------------------------------------

_REPLICATES: Dict[Tuple[int, int, torch.device], bool] = {}


def _interpolate_replicates(size: int, pooled: int, device: torch.device) -> bool:
    """Whether F.interpolate(mode="nearest") from `pooled` to `size` (a multiple of it) repeats
    each value size // pooled times in a row. It usually does, but its source index is computed
    in float32 (floor(i * (pooled / size))), which for some sizes rounds down: 2 -> 82 takes 41
    values from the first row and 41 from the second, but at index 41 rather than 40."""
    key = (size, pooled, device)
    if key not in _REPLICATES:
        source = torch.arange(pooled, dtype=torch.float32, device=device).reshape(1, 1, pooled, 1)
        selected = F.interpolate(source, size=[size, 1], mode="nearest").flatten()
        expected = torch.arange(size, device=device, dtype=torch.float32) // (size // pooled)
        _REPLICATES[key] = bool(torch.equal(selected, expected))
    return _REPLICATES[key]


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
    at the full resolution, as the norm on the resized map would; it is applied here. The
    statistics are computed in float32 whatever the input's dtype (under autocast, float16 loses
    the correction and overflows for a standard deviation above 256)."""
    if norm.track_running_stats and norm.running_mean is not None:
        repeats = (reference.shape[-2] // pooled.shape[-2]) * (reference.shape[-1] // pooled.shape[-1])
        count = pooled.numel() // pooled.shape[1] * repeats
        with torch.no_grad():
            var, mean = torch.var_mean(pooled.float(), dim=(0, 2, 3), correction=0)
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
            norm.running_var.lerp_((var * (count / (count - 1))).to(norm.running_var.dtype), factor)
    return F.batch_norm(pooled, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)


# -- the block's routes ---------------------------------------------------------------------


def forward_pooled_bn(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain forward, with each SA branch whose BatchNorm uses batch statistics normalised at
    the pooled resolution where its resize replicates (`batch_norm_of_replicated`)."""
    if block.stride == 2:
        x = max_pool_clamped(x, 2)
    shortcut = x if block.downsample is None else block.downsample(x)
    y = F.relu_(block.bn1(block.conv1(x)))
    branches: List[torch.Tensor] = []
    for scale, conv, norm in zip(block.scales, block.conv2.values(), block.bn2.values()):
        if scale == 1:
            branches.append(norm(conv(y)))
            continue
        z = conv(max_pool_clamped(y, scale))
        if _batch_statistics(norm) and z.numel() > z.shape[1] and replicates(z, y):  # BN refuses one value
            branches.append(resize_like(batch_norm_of_replicated(norm, z, y), y))
        else:
            branches.append(norm(resize_like(z, y)))
    out = block.bn3(block.conv3(F.relu_(torch.cat(branches, dim=1))))
    return F.relu_(out + shortcut)


def forward_folded(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's forward (up to float rounding) where every norm has frozen statistics, with
    fewer passes over memory and fewer FLOPs; gradients reach the conv weights through the folding.

    - every norm folded into its conv; pooling by 4 as pooling by 2 of the pool by 2;
    - where autograd records nothing: a replicating branch's ReLU at its pooled resolution, and
      its slice of conv3 there too, the slices nested (`nest_replicated`) and added by
      broadcasting into the shortcut; the other branches (scale 1, bilinear) are concatenated
      for the rest of conv3, which adds into that sum;
    - where it records: the backward keeps what the plain forward keeps (folded convs keep the
      conv's weight, pools their input, the branches share one ReLU on the concatenation);
      nothing is pushed, as the broadcast's backward, a strided sum, measured slower there.
    """
    if block.stride == 2:
        x = max_pool(x, 2)
    shortcut = x if block.downsample is None else conv_norm(x, block.downsample[0], block.downsample[1])
    y = conv_norm(x, block.conv1, block.bn1, relu=True)
    eager = not in_graph()
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters()))
    push, relu = eager and not grad, not grad
    scale3 = bias3 = None  # bn3's affine map, for conv3's slices where branches are pushed
    full: List[torch.Tensor] = []  # branches at y's resolution, and their channels of conv3's input
    full_channels: List[slice] = []
    pushed: List[torch.Tensor] = []  # conv3 slices of the branches that replicate, at their pooled resolution
    pooled_by = {}
    start = 0
    for scale, conv, norm in zip(block.scales, block.conv2.values(), block.bn2.values()):
        channels = slice(start, start + conv.out_channels)
        start = channels.stop
        if scale == 1:
            full.append(conv_norm(y, conv, norm, relu=relu))
        elif compiling():
            full.append(torch.ops.scalenet_d2.pooled_branch(y, *fold_norm(conv, norm), scale, relu))
        elif not eager:
            full.append(resize_like(conv_norm(max_pool_clamped(y, scale), conv, norm), y, relu))
        else:
            if scale == 4 and 2 in pooled_by and min(y.shape[-2:]) >= 4:
                pooled_by[4] = max_pool(pooled_by[2], 2)
            else:
                pooled_by[scale] = max_pool(y, scale)
            if push and replicates(pooled_by[scale], y):
                if scale3 is None:
                    scale3, bias3 = norm_affine(block.bn3)
                z = conv_norm(pooled_by[scale], conv, norm, relu=True)
                pushed.append(conv2d(z, scaled_weight(block.conv3.weight[:, channels], scale3)))
                continue
            full.append(resize_like(conv_norm(pooled_by[scale], conv, norm), y, relu))
        full_channels.append(channels)
    # what conv3 adds to: the shortcut and the pushed slices, a slice first into a larger one
    # whose grid holds its own (one pass less)
    residual = shortcut if block.downsample is not None else None  # a fresh map: conv3 may add into it
    for part in nest_replicated(pushed):
        residual = added_replicated(shortcut, part) if residual is None else add_replicated_(residual, part)
    add, into_add = (shortcut, False) if residual is None else (residual, True)
    if not full:  # every branch pushed: bn3's shift is all that is left of conv3's output
        return F.relu_(add.add(bias3.to(add.dtype).reshape(-1, 1, 1)))
    features = cat_channels(full, y) if relu else F.relu_(cat_channels(full, y))
    if not pushed:
        return conv_norm(features, block.conv3, block.bn3, relu=True, add=add, into_add=into_add)
    parts = [block.conv3.weight[:, c] for c in full_channels]
    weight = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return conv2d(features, scaled_weight(weight, scale3), bias3, relu=True, add=add, into_add=into_add)
