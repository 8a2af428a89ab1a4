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
converted ImageNet checkpoint is a renaming only (checkpoint/published.py). Inputs smaller
than a pooling factor are handled as layers.py says.

`SABottleneck.forward` below is the paper's block. Exact rewrites of it (norms folded into
convs, conv3 pushed through the concatenation, ...) live in fast_paths.py, entered from one
place, `fast_paths.block_forward`, which says which route runs on which device, dtype and mode.
"""

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicStem, ResNet
from torch import nn

from . import fast_paths
from .allocation import SCALES, STAGE_NAMES, Allocation, branch_kernel_size, load_allocation
from .fpn import check_body_outputs, fpn_from_cfg
from .layers import compiling, make_norm, max_pool_clamped, resize_like

__all__ = [
    "FAST_PATH_MODES",
    "SABottleneck",
    "ScaleNet",
    "make_scalenet_stages",
    "set_fast_path",
    "plain_forward",
    "build_scalenet_backbone",
    "build_scalenet_fpn_backbone",
    "build_retinanet_scalenet_fpn_backbone",
]

# which forward runs (fast_paths.py): "auto" by device and input size, "on" every exact rewrite, "off" the plain one
FAST_PATH_MODES = ("auto", "on", "off")


def check_fast_path(mode: str, where: str = "fast_path") -> str:
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"{where} {mode!r}: expected one of {', '.join(map(repr, FAST_PATH_MODES))}")
    return mode


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
        norm: a detectron2 norm name or callable (see `layers.make_norm`).
        fast_path: "auto", "on" or "off" (see fast_paths.py).
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
        fast_path: str = "auto",
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
        self.fast_path = check_fast_path(fast_path)

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
        if not torch.jit.is_scripting():
            fast = self._fast_forward(x)
            if fast is not None:
                return fast
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
            elif not torch.jit.is_scripting() and compiling():
                z = torch.ops.scalenet_d2.pooled_branch(y, conv.weight, None, scale, False)  # the line below, as one op
            else:
                z = resize_like(conv(max_pool_clamped(y, scale)), y)
            branches.append(norm(z))  # norm after resize
        return F.relu_(torch.cat(branches, dim=1))

    @torch.jit.unused
    def _fast_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return fast_paths.block_forward(self, x)

    @torch.jit.unused
    def norms(self) -> List[nn.Module]:
        return [self.bn1, self.bn3, *self.bn2.values()] + ([] if self.downsample is None else [self.downsample[1]])

    def extra_repr(self) -> str:
        return f"widths={self.widths}, side={self.side}, stride={self.stride}, fast_path={self.fast_path!r}"


def set_fast_path(model: nn.Module, mode: str) -> nn.Module:
    """Set the fast-path mode ("auto", "on", "off"; fast_paths.py) of every ScaleNet and SA block in
    `model`: to compare the routes, or to time the plain forward."""
    check_fast_path(mode)
    for module in model.modules():
        if isinstance(module, (SABottleneck, ScaleNet)):
            module.fast_path = mode
    return model


@contextlib.contextmanager
def plain_forward(model: nn.Module):
    """Within it, `model` runs its plain forward (FLOP counts that follow the paper's convention,
    which counts the norms, and module hooks, which the rewrites bypass)."""
    modules = [m for m in model.modules() if isinstance(m, (SABottleneck, ScaleNet))]
    saved = [module.fast_path for module in modules]
    try:
        yield set_fast_path(model, "off")
    finally:
        for module, mode in zip(modules, saved):
            module.fast_path = mode


def make_scalenet_stages(allocation: Allocation, norm, fast_path: str = "auto") -> List[List[SABottleneck]]:
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
                fast_path=fast_path,
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
        fast_path: "auto" (default), "on" or "off": which forward runs (fast_paths.py).
    """

    def __init__(
        self,
        allocation: Union[Allocation, str],
        norm="FrozenBN",
        out_features: Sequence[str] = STAGE_NAMES,
        freeze_at: int = 0,
        in_channels: int = 3,
        fast_path: str = "auto",
    ):
        allocation = load_allocation(allocation)
        known = ("stem",) + STAGE_NAMES
        out_features = list(out_features)
        if not out_features or any(name not in known for name in out_features):
            raise ValueError(f"ScaleNet out_features {out_features}: expected a non-empty subset of {list(known)}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at {freeze_at}: expected 0 (nothing) .. 5 (the stem and res2..res5)")
        check_fast_path(fast_path)
        make_norm(norm, 64)  # fail here, with a clear message, on an unknown norm
        # detectron2's stem is exactly the published one; give it ScaleNet's norm rules too
        stem = BasicStem(in_channels, allocation.stem_channels, lambda channels: make_norm(norm, channels))
        super().__init__(
            stem,
            make_scalenet_stages(allocation, norm, fast_path),
            out_features=[name for name in known if name in out_features],
            freeze_at=freeze_at,
        )
        self.allocation = allocation
        self.fast_path = fast_path
        self.register_forward_pre_hook(_check_images)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """detectron2's ResNet.forward (`fast_paths.body_forward` where the body's route applies)."""
        if not torch.jit.is_scripting():
            fast = self._fast_forward(x)
            if fast is not None:
                return fast
        return self.run_stages(self.stem(x))

    def run_stages(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
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
    def _fast_forward(self, x: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
        return fast_paths.body_forward(self, x)


def _check_images(body: ScaleNet, inputs: Tuple[torch.Tensor]) -> None:
    """A clear error for what ResNet's forward would fail on deep inside a conv."""
    x = inputs[0]
    if torch.jit.is_tracing():  # a trace would record these checks as constants of its first input
        return
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
        fast_path=check_fast_path(scalenet_cfg.FAST_PATH, "MODEL.SCALENET.FAST_PATH"),
    )


@BACKBONE_REGISTRY.register()
def build_scalenet_backbone(cfg, input_shape: ShapeSpec):
    """ScaleNet body from cfg.MODEL.SCALENET (ALLOCATION, NORM, OUT_FEATURES, FAST_PATH) and BACKBONE.FREEZE_AT."""
    return _scalenet_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_scalenet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN with LastLevelMaxPool (P6) on ScaleNet, as detectron2's build_resnet_fpn_backbone."""
    bottom_up = _scalenet_from_cfg(cfg, input_shape)
    return fpn_from_cfg(cfg, bottom_up, LastLevelMaxPool(), "MODEL.SCALENET.OUT_FEATURES")


@BACKBONE_REGISTRY.register()
def build_retinanet_scalenet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """FPN with P6/P7 from res5 on ScaleNet, as detectron2's build_retinanet_resnet_fpn_backbone."""
    bottom_up = _scalenet_from_cfg(cfg, input_shape)
    check_body_outputs(bottom_up, list(cfg.MODEL.FPN.IN_FEATURES) + ["res5"], "MODEL.SCALENET.OUT_FEATURES")
    top_block = LastLevelP6P7(bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS)
    return fpn_from_cfg(cfg, bottom_up, top_block, "MODEL.SCALENET.OUT_FEATURES")
