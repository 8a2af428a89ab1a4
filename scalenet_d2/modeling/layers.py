"""The layers of ScaleNet besides detectron2's: its norms (detectron2's `get_norm` with two
ScaleNet rules) and the pooling and resizing of its scale branches.

Small inputs. The published network fails when a feature map is smaller than a pooling
factor: a scale-s branch on a map with H < s or W < s, or a 1-pixel map entering a stride-2
block, pools to size 0. Here such a dimension is padded with -inf up to the factor (as if the
kernel were clamped to the dimension's size): it pools to size 1, i.e. to the maximum over the
whole dimension, and is then resized back like any other pooled map. Wherever the published
network runs, nothing is padded and the result is identical.

Under torch.export the two shape-dependent steps are operators (export.py registers them), so
that an exported program keeps these choices for every input size; under tracing they are
scripted (`torch.jit.script_if_tracing`) for the same reason.
"""

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from torch import nn

__all__ = [
    "ScaleNetGroupNorm",
    "group_norm_groups",
    "make_norm",
    "max_pool_clamped",
    "resize_like",
    "exporting",
    "compiling",
    "in_graph",
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


@torch.jit.unused
def exporting() -> bool:
    """Whether torch.export is tracing the forward (then the shape-dependent steps are operators)."""
    return torch.compiler.is_exporting()


@torch.jit.script_if_tracing
def max_pool_clamped(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool with kernel = stride = `factor`, no padding (floor), as the published network.

    A dimension shorter than `factor` is first padded with -inf up to it, so that it pools to
    one value, its maximum, instead of to nothing (where the published network fails; see
    the module docstring).
    """
    if not torch.jit.is_scripting() and exporting():
        return torch.ops.scalenet_d2.max_pool_clamped(x, factor)
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
    (a selection, with which it commutes; bilinear mixes values, so there it comes after)."""
    height, width = reference.shape[-2], reference.shape[-1]
    if height % pooled.shape[-2] == 0 and width % pooled.shape[-1] == 0:
        return F.interpolate(F.relu(pooled) if relu else pooled, size=[height, width], mode="nearest")
    resized = F.interpolate(pooled, size=[height, width], mode="bilinear", align_corners=False)
    return F.relu(resized) if relu else resized


@torch.jit.unused
def compiling() -> bool:
    """Whether torch.compile or torch.export is tracing the forward: a graph that must hold for
    every input size, in which a pooled branch is one operator (export.py) rather than the shape
    tests of `resize_like`, which would make one graph per size."""
    return torch.compiler.is_compiling()


@torch.jit.unused
def in_graph() -> bool:
    """Whether the forward is being traced, compiled or exported: a graph that must hold for
    every input size, so no choice may be made in Python on the shapes of this input."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()
