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
stride-2 block, pools to size 0. Here the pooling kernel and stride are clamped, per
dimension, to that dimension's size: such a dimension pools to size 1, i.e. to the
maximum over the whole dimension, and is then resized back like any other pooled map.
Whenever the published network runs, nothing is clamped and the result is identical.
"""
import functools
from typing import Sequence, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import CNNBlockBase, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem

from .allocation import SCALES, STAGE_NAMES, Allocation, StageAllocation, branch_kernel_size, load_allocation

__all__ = [
    "ScaleAggregation",
    "SABottleneck",
    "ScaleNet",
    "make_stage",
    "make_norm",
    "group_norm_groups",
    "ScaleNetGroupNorm",
    "max_pool_clamped",
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


def max_pool_clamped(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool with kernel = stride = `factor`, no padding (floor), as the published network.

    Along a dimension smaller than `factor` the kernel and stride are that dimension's size,
    so it pools to 1 instead of 0 (where the published network fails). See module docstring.
    """
    height, width = x.shape[-2:]
    kernel = (min(factor, height), min(factor, width))
    return F.max_pool2d(x, kernel_size=kernel, stride=kernel)


class ScaleAggregation(nn.Module):
    """The SA layer: for each scale s with a non-zero width c_s, in scale order,
    max-pool by s -> conv to c_s channels -> resize back to HxW -> norm; concat; ReLU.

    Its convs and norms are `conv2[str(i)]` and `bn2[str(i)]` for branch index i (scale
    SCALES[i]), present only where c_i > 0: the published names of a bottleneck's SA layer.

    Args:
        in_channels: channels of the input (the block's `planes`).
        widths: output channels (c1, c2, c4, c7) of the scale 1, 2, 4, 7 branches; 0 = no branch.
        side: the stage's feature side at a 224x224 input; it fixes each branch's kernel
            (3x3 while side / 2**i > 1, else 1x1; see `allocation.branch_kernel_size`).
        norm: a detectron2 norm name or callable (see `make_norm`).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], side: int, norm="BN"):
        super().__init__()
        if len(widths) != len(SCALES) or min(widths) < 0 or sum(widths) == 0:
            raise ValueError(f"widths {tuple(widths)}: expected 4 non-negative integers (c1, c2, c4, c7), not all 0")
        self.in_channels = in_channels
        self.widths = tuple(int(w) for w in widths)
        self.side = side
        self.out_channels = sum(self.widths)

        self.conv2 = nn.ModuleDict()
        self.bn2 = nn.ModuleDict()
        branches = []  # (key, scale factor) of the branches that exist, in scale order
        for i, (scale, width) in enumerate(zip(SCALES, self.widths)):
            if width == 0:
                continue  # pruned away: no conv, no norm
            kernel = branch_kernel_size(side, i)
            self.conv2[str(i)] = nn.Conv2d(in_channels, width, kernel, padding=kernel // 2, bias=False)
            self.bn2[str(i)] = make_norm(norm, width)
            weight_init.c2_msra_fill(self.conv2[str(i)])
            branches.append((str(i), scale))
        self.branches = tuple(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        outputs = []
        for key, scale in self.branches:
            if scale == 1:
                y = self.conv2[key](x)
            else:
                pooled = self.conv2[key](max_pool_clamped(x, scale))
                pooled_height, pooled_width = pooled.shape[-2:]
                # nearest is exact replication when the map is a whole multiple of the pooled one
                if height % pooled_height == 0 and width % pooled_width == 0:
                    y = F.interpolate(pooled, size=(height, width), mode="nearest")
                else:
                    y = F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=False)
            outputs.append(self.bn2[key](y))  # the norm comes after the resize
        return F.relu_(torch.cat(outputs, dim=1))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, widths={self.widths}, side={self.side}"


class SABottleneck(CNNBlockBase):
    """ScaleNet bottleneck: [2x2 max-pool if stride 2] -> 1x1 conv -> SA layer -> 1x1 conv,
    plus a shortcut (identity, or 1x1 conv + norm in the first block of a stage).

    Submodules carry the published names: conv1, bn1, conv2.{i}, bn2.{i}, conv3, bn3,
    downsample.0 (conv) and downsample.1 (norm).

    Args:
        in_channels: input channels.
        planes: bottleneck width; the block outputs 4 * planes channels.
        widths: SA branch widths (c1, c2, c4, c7).
        side: the stage's feature side at a 224x224 input (fixes the SA kernel sizes).
        stride: 2 for the first block of res3..res5, else 1.
        has_shortcut_conv: True for the first block of every stage (res2 included).
        norm: a detectron2 norm name or callable (see `make_norm`).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        widths: Sequence[int],
        side: int,
        stride: int = 1,
        has_shortcut_conv: bool = False,
        norm="BN",
    ):
        out_channels = self.expansion * planes
        super().__init__(in_channels, out_channels, stride)
        if stride not in (1, 2):
            raise ValueError(f"stride {stride}: a ScaleNet block has stride 1 or 2")
        if not has_shortcut_conv and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"a block with an identity shortcut needs stride 1 and in_channels == 4 * planes; got "
                f"stride {stride}, in_channels {in_channels}, planes {planes}"
            )

        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        scale_aggregation = ScaleAggregation(planes, widths, side, norm)
        # The SA layer's convs and norms are registered on the block as `conv2` and `bn2`,
        # which is the published key layout (conv2.{i}.weight, bn2.{i}.*). The SA module
        # itself is kept out of the block's children so they are not registered twice; it
        # holds the same ModuleDicts, so freezing or moving the block reaches them.
        self.conv2 = scale_aggregation.conv2
        self.bn2 = scale_aggregation.bn2
        self.__dict__["scale_aggregation"] = scale_aggregation
        self.conv3 = nn.Conv2d(scale_aggregation.out_channels, out_channels, kernel_size=1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        if has_shortcut_conv:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                make_norm(norm, out_channels),
            )
        else:
            self.downsample = None

        convs = [self.conv1, self.conv3] + ([self.downsample[0]] if has_shortcut_conv else [])
        for conv in convs:
            weight_init.c2_msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            # the block's only downsampling: both paths see the pooled input
            x = max_pool_clamped(x, 2)
        shortcut = x if self.downsample is None else self.downsample(x)

        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.scale_aggregation(out)  # conv2 / bn2 branches, concat, ReLU
        out = self.bn3(self.conv3(out))
        return F.relu_(out + shortcut)


def make_stage(stage: StageAllocation, in_channels: int, first_stride: int, norm) -> nn.Sequential:
    """The blocks of one stage, as in the published network: the first has the 1x1 shortcut
    conv and the stage's stride (a 2x2 max-pool), the others an identity shortcut."""
    blocks = []
    for index, widths in enumerate(stage.blocks):
        blocks.append(
            SABottleneck(
                in_channels,
                stage.planes,
                widths,
                stage.side,
                stride=first_stride if index == 0 else 1,
                has_shortcut_conv=index == 0,
                norm=norm,
            )
        )
        in_channels = blocks[-1].out_channels
    return nn.Sequential(*blocks)


class ScaleNet(Backbone):
    """ScaleNet body: detectron2's BasicStem, then stages res2..res5 of SABottleneck.

    Outputs `res2`..`res5` (strides 4, 8, 16, 32; channels 4 * planes, 256..2048 for the
    published allocations), those listed in `out_features`. Stages after the last requested
    one are not built, as in detectron2's ResNet.

    Args:
        allocation: an `Allocation`, a bundled allocation name or an allocation file path.
        norm: detectron2 norm name ("FrozenBN", "BN", "SyncBN", "GN", ...) or callable.
        out_features: which of res2..res5 to return.
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
        super().__init__()
        self.allocation = load_allocation(allocation)
        out_features = list(out_features)
        unknown = [name for name in out_features if name not in STAGE_NAMES]
        if not out_features or unknown:
            raise ValueError(
                f"ScaleNet out_features {out_features}: expected a non-empty subset of {list(STAGE_NAMES)}"
            )
        make_norm(norm, 64)  # fail here, with a clear message, on an unknown norm
        self._out_features = [name for name in STAGE_NAMES if name in out_features]

        # detectron2's stem is exactly the published one; give it ScaleNet's norm rules too
        self.stem = BasicStem(in_channels, self.allocation.stem_channels, functools.partial(make_norm, norm))
        self._out_feature_strides = {"stem": self.stem.stride}
        self._out_feature_channels = {"stem": self.stem.out_channels}

        num_stages = 1 + max(STAGE_NAMES.index(name) for name in self._out_features)
        self.stage_names = STAGE_NAMES[:num_stages]
        channels, stride = self.stem.out_channels, self.stem.stride
        for index, stage in enumerate(self.allocation.stages[:num_stages]):
            # res2 keeps the stem's resolution; res3..res5 halve it in their first block
            blocks = make_stage(stage, channels, first_stride=1 if index == 0 else 2, norm=norm)
            channels = blocks[-1].out_channels
            stride *= blocks[0].stride
            self.add_module(stage.name, blocks)
            self._out_feature_strides[stage.name] = stride
            self._out_feature_channels[stage.name] = channels

        self.freeze(freeze_at)

    def forward(self, x: torch.Tensor):
        """x: (N, C, H, W) images, any H, W >= 1. Returns {name: feature} for out_features."""
        if x.dim() != 4 or x.shape[1] != self.stem.in_channels or x.shape[-2] == 0 or x.shape[-1] == 0:
            raise ValueError(
                f"ScaleNet takes images of shape (N, {self.stem.in_channels}, H, W) with H, W >= 1; "
                f"got a tensor of shape {tuple(x.shape)}"
            )
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def freeze(self, freeze_at: int = 0):
        """Freeze the stem (freeze_at >= 1) and res{k} (freeze_at >= k), as ResNet.freeze."""
        if freeze_at >= 1:
            self.stem.freeze()
        for index, name in enumerate(self.stage_names, start=2):
            if freeze_at >= index:
                for block in getattr(self, name).children():
                    block.freeze()
        return self


def _register(builder):
    """Register `builder` once, so that reloading this module is harmless (the registry
    keeps the first registration); a builder of the same name from elsewhere is an error."""
    name = builder.__name__
    if name not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(builder)
    elif BACKBONE_REGISTRY.get(name).__module__ != builder.__module__:
        raise RuntimeError(f"backbone {name!r} is already registered by {BACKBONE_REGISTRY.get(name).__module__}")
    return builder


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


@_register
def build_scalenet_backbone(cfg, input_shape: ShapeSpec):
    """ScaleNet body from cfg.MODEL.SCALENET (ALLOCATION, NORM, OUT_FEATURES) and BACKBONE.FREEZE_AT."""
    return _scalenet_from_cfg(cfg, input_shape)


@_register
def build_scalenet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN with LastLevelMaxPool (P6) on ScaleNet, as detectron2's build_resnet_fpn_backbone."""
    _check_fpn_inputs(cfg, cfg.MODEL.FPN.IN_FEATURES)
    bottom_up = _scalenet_from_cfg(cfg, input_shape)
    return fpn_from_cfg(cfg, bottom_up, LastLevelMaxPool())


@_register
def build_retinanet_scalenet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN with P6/P7 from res5 on ScaleNet, as detectron2's build_retinanet_resnet_fpn_backbone."""
    _check_fpn_inputs(cfg, list(cfg.MODEL.FPN.IN_FEATURES) + ["res5"])
    bottom_up = _scalenet_from_cfg(cfg, input_shape)
    in_channels_p6p7 = bottom_up.output_shape()["res5"].channels
    return fpn_from_cfg(cfg, bottom_up, LastLevelP6P7(in_channels_p6p7, cfg.MODEL.FPN.OUT_CHANNELS))
