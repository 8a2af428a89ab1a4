"""The ScaleNet backbone: exactness against an independent implementation, shapes, small
inputs, FREEZE_AT, NORM, OUT_FEATURES, the registered builders and the config."""

import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from reference_scalenet import ReferenceScaleNet, randomize, rows_from_project_file
from torch import nn

import scalenet_d2
from scalenet_d2 import (
    BUNDLED_ALLOCATIONS,
    SABottleneck,
    ScaleNet,
    ScaleNetCheckpointer,
    add_scalenet_config,
    convert_published_checkpoint,
    load_allocation,
)
from scalenet_d2.checkpoint import published_key_shapes, to_d2_key
from scalenet_d2.modeling.layers import max_pool_clamped
from scalenet_d2.modeling.scalenet import set_fast_path

STAGES = ["res2", "res3", "res4", "res5"]


def make_cfg(
    allocation="scalenet_tiny", out_features=STAGES, norm="FrozenBN", freeze_at=0, name="build_scalenet_backbone"
):
    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.SCALENET.ALLOCATION = allocation
    cfg.MODEL.SCALENET.OUT_FEATURES = list(out_features)
    cfg.MODEL.SCALENET.NORM = norm
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def expected_sizes(size):
    """Feature side of res2..res5 for an input side: the stem's conv and max-pool (padded)
    round up, the 2x2 max-pools of res3..res5 round down, and never below 1 (the clamp)."""
    side = (size + 1) // 2  # 7x7 conv, stride 2, pad 3
    side = (side + 1) // 2  # 3x3 max-pool, stride 2, pad 1
    sizes = [side]
    for _ in range(3):
        side = max(1, side // 2)
        sizes.append(side)
    return sizes


def images(height, width, batch=1, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


_TINY = ScaleNet("scalenet_tiny")  # shared by tests that only run it


# ----------------------------------------------------------------------------- exactness
# Input sizes where the published network runs (it needs res4 >= 7 where res4 has a scale-7
# branch, res5 >= 4 / >= 7 where res5 has a scale-4 / scale-7 branch), odd ones included.
EXACTNESS_SIZES = {
    "scalenet50": [(128, 160), (131, 197)],
    "scalenet50_light": [(225, 231)],
    "scalenet101": [(225, 231)],
    "scalenet152": [(129, 131)],
}


@pytest.mark.parametrize("name", sorted(EXACTNESS_SIZES))
def test_equals_the_published_network(name, tmp_path):
    """Reference with random weights and BN statistics -> published state_dict -> converter
    -> ScaleNetCheckpointer -> identical res2..res5. The reference reads the bundled file as
    rows; test_allocation checks that the bundled files transcribe the published ones."""
    rows, blocks, planes, stem = rows_from_project_file(scalenet_d2.modeling.allocation.BUNDLED_DIR / f"{name}.json")
    reference = randomize(ReferenceScaleNet(rows, blocks, planes, stem))
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "published.pth")
    result = convert_published_checkpoint(str(tmp_path / "published.pth"), str(tmp_path / "d2.pkl"), log=lambda s: None)
    assert result.allocation.name == name  # inferred from the shapes

    backbone = build_backbone(make_cfg(name))
    assert isinstance(backbone, ScaleNet)
    ScaleNetCheckpointer(backbone).load(str(tmp_path / "d2.pkl"))
    backbone.eval()
    for height, width in EXACTNESS_SIZES[name]:
        x = images(height, width)
        with torch.no_grad():
            expected = reference(x)
            plain, folded = set_fast_path(backbone, "off")(x), set_fast_path(backbone, "on")(x)
        assert list(plain) == list(folded) == STAGES
        for stage in STAGES:
            torch.testing.assert_close(
                plain[stage], expected[stage], rtol=1e-5, atol=1e-5, msg=f"{stage} at {height}x{width}"
            )
            assert plain[stage].shape[1] == backbone.output_shape()[stage].channels
            # the fast eval path (norms folded into the convs), the default: float rounding apart
            error = (folded[stage] - expected[stage]).abs().max() / expected[stage].abs().max()
            assert error <= 1e-4, f"folded {stage} at {height}x{width}: relative error {error:.2e}"

    # trainable parameters (trainable BN, nothing frozen) = the published model's minus fc
    published = sum(p.numel() for p in reference.parameters()) - reference.fc.weight.numel() - reference.fc.bias.numel()
    with torch.device("meta"):
        trainable = ScaleNet(name, norm="BN", freeze_at=0)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == published
    # with FrozenBN only the convs train
    conv_weights = sum(m.weight.numel() for m in reference.modules() if isinstance(m, nn.Conv2d))
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == conv_weights


def _tiny_reference_and_backbone(tmp_path, seed=0):
    rows, blocks, planes, stem = rows_from_project_file(
        scalenet_d2.modeling.allocation.BUNDLED_DIR / "scalenet_tiny.json"
    )
    reference = randomize(ReferenceScaleNet(rows, blocks, planes, stem), seed=seed).eval()
    torch.save(reference.state_dict(), tmp_path / "tiny.pth")
    convert_published_checkpoint(str(tmp_path / "tiny.pth"), str(tmp_path / "tiny.pkl"), log=lambda s: None)
    backbone = ScaleNet("scalenet_tiny")
    ScaleNetCheckpointer(backbone).load(str(tmp_path / "tiny.pkl"))
    return reference, backbone.eval()


def test_tiny_equals_reference_and_runs_where_the_published_network_fails(tmp_path):
    reference, backbone = _tiny_reference_and_backbone(tmp_path)
    with torch.no_grad():
        x = images(224, 237, batch=2)
        expected, ours = reference(x), backbone(x)
        for stage in STAGES:
            torch.testing.assert_close(ours[stage], expected[stage], rtol=1e-5, atol=1e-5)

        # 64x96: res4 is 4x6, smaller than the scale-7 pooling: the published network fails ...
        x = images(64, 96, seed=1)
        with pytest.raises(RuntimeError):
            reference(x)
        # ... ours runs, and agrees on everything before the failing layer
        ours = backbone(x)
        y = F.max_pool2d(F.relu(reference.bn1(reference.conv1(x))), 3, 2, 1)
        y2 = reference.layer1(y)
        y3 = reference.layer2(y2)
        torch.testing.assert_close(ours["res2"], y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours["res3"], y3, rtol=1e-5, atol=1e-5)
        assert [tuple(ours[s].shape[-2:]) for s in STAGES] == [(16, 24), (8, 12), (4, 6), (2, 3)]
        assert all(torch.isfinite(ours[s]).all() for s in STAGES)


def _identity_sa(widths, side, channels=3):
    """The SA layer of a block whose existing branches are identity 1x1 convs with identity norms:
    a function of the SA layer's input y (the block's conv1/bn1/ReLU output)."""
    block = SABottleneck(
        channels,
        4 * channels,
        bottleneck_channels=channels,
        widths=widths,
        side=side,
        shortcut_conv=True,
        norm=lambda c: nn.Identity(),
    )
    with torch.no_grad():
        for conv in block.conv2.values():
            assert conv.kernel_size == (1, 1)
            conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return block.sa_layer


def test_maps_smaller_than_the_scale_pool_over_the_whole_dimension():
    # scale-7 branch only (1x1 at side 7); a 5x20 map: rows pool over all 5, columns by 7 -> 1x2
    sa = _identity_sa((0, 0, 0, 3), side=7)
    x = torch.randn(2, 3, 5, 20)
    out = sa(x)
    left = x[..., :, 0:7].amax(dim=(-2, -1), keepdim=True)
    right = x[..., :, 7:14].amax(dim=(-2, -1), keepdim=True)
    # 20 is a multiple of 2, 5 of 1: nearest, i.e. columns 0-9 from the left window, 10-19 the right
    expected = torch.cat([left.expand(-1, -1, 5, 10), right.expand(-1, -1, 5, 10)], dim=-1).relu()
    torch.testing.assert_close(out, expected)

    # a 1-pixel-high map entering a stride-2 block keeps height 1, pools columns in pairs
    x = torch.randn(1, 4, 1, 5)
    torch.testing.assert_close(max_pool_clamped(x, 2), torch.maximum(x[..., 0:4:2], x[..., 1:4:2]))
    # whenever the published pooling works, the clamped one is the same
    for height, width, factor in [(7, 7, 7), (9, 14, 4), (2, 3, 2), (56, 56, 7)]:
        x = torch.randn(1, 2, height, width)
        assert torch.equal(max_pool_clamped(x, factor), F.max_pool2d(x, factor, factor))


def test_resize_is_nearest_for_whole_multiples_and_bilinear_otherwise():
    sa = _identity_sa((0, 3, 0, 0), side=2)  # scale 2 only, 1x1 (2 / 2**1 is not > 1)
    x = torch.randn(1, 3, 8, 6)
    pooled = F.max_pool2d(x, 2, 2)
    torch.testing.assert_close(sa(x), pooled.repeat_interleave(2, -2).repeat_interleave(2, -1).relu())

    x = torch.randn(1, 3, 9, 6)  # pooled 4x3: 9 is no multiple of 4
    pooled = F.max_pool2d(x, 2, 2)
    bilinear = F.interpolate(pooled, size=(9, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(sa(x), bilinear.relu())
    assert not torch.allclose(bilinear, F.interpolate(pooled, size=(9, 6), mode="nearest"))

    sa = _identity_sa((0, 0, 3, 0), side=4)  # scale 4 only, 1x1 at side 4
    x = torch.randn(1, 3, 6, 6)  # pooled 1x1 (the top-left 4x4 window); 6 is a multiple of 1
    expected = x[..., :4, :4].amax(dim=(-2, -1), keepdim=True).expand(-1, -1, 6, 6).relu()
    torch.testing.assert_close(sa(x), expected)


def test_branches_concatenate_in_scale_order_with_gaps():
    block = SABottleneck(8, 32, bottleneck_channels=8, widths=(3, 0, 2, 1), side=56, shortcut_conv=True, norm="BN")
    assert sorted(block.conv2) == ["0", "2", "3"] and sorted(block.bn2) == ["0", "2", "3"]
    assert [block.conv2[k].kernel_size for k in ("0", "2", "3")] == [(3, 3), (3, 3), (3, 3)]
    assert block.conv3.in_channels == 6
    block.eval()
    y = torch.randn(1, 8, 14, 14)
    out = block.sa_layer(y)
    assert out.shape == (1, 6, 14, 14)
    # channels 3:5 are the scale-4 branch alone
    pooled = block.conv2["2"](F.max_pool2d(y, 4, 4))
    scale4 = block.bn2["2"](F.interpolate(pooled, size=(14, 14), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out[:, 3:5], scale4.relu())


# ----------------------------------------------------------------------------- shapes and layout
@pytest.mark.parametrize("name", BUNDLED_ALLOCATIONS)
def test_every_bundled_allocation_has_the_published_layout_and_shapes(name):
    allocation = load_allocation(name)
    with torch.device("meta"):
        backbone = ScaleNet(name)
        outputs = backbone(torch.empty(1, 3, 97, 131))
    shapes = backbone.output_shape()
    assert list(shapes) == STAGES
    assert [shapes[s].stride for s in STAGES] == [4, 8, 16, 32]
    channels = [4 * st.planes for st in allocation.stages]
    assert [shapes[s].channels for s in STAGES] == channels
    if name != "scalenet_tiny":
        assert channels == [256, 512, 1024, 2048]
    heights, widths = expected_sizes(97), expected_sizes(131)
    for stage, c, h, w in zip(STAGES, channels, heights, widths):
        assert tuple(outputs[stage].shape) == (1, c, h, w)

    # the state_dict is the published layout renamed: same keys, same shapes
    published = {to_d2_key(k): shape for k, shape in published_key_shapes(allocation).items()}
    ours = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert ours == published


@pytest.mark.parametrize(
    "height, width",
    [(1, 1), (2, 3), (7, 7), (31, 33), (33, 47), (64, 96), (65, 97), (5, 1000), (64, 1000), (1000, 17)],
)
def test_small_odd_and_wide_inputs(height, width):
    backbone = _TINY.eval()
    with torch.no_grad():
        outputs = backbone(images(height, width, batch=2))
    for stage, h, w in zip(STAGES, expected_sizes(height), expected_sizes(width)):
        assert tuple(outputs[stage].shape) == (2, backbone.output_shape()[stage].channels, h, w)
        assert torch.isfinite(outputs[stage]).all()


@pytest.mark.parametrize(
    "shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64), (1, 3, 0, 64), (1, 3, 64, 0), (1, 3, 8, 8, 8)]
)
def test_bad_images_are_refused_clearly(shape):
    with pytest.raises(ValueError, match=r"ScaleNet takes images of shape \(N, 3, H, W\) with H, W >= 1") as info:
        _TINY(torch.zeros(shape))
    assert str(list(shape)) in str(info.value)


def test_integer_images_are_refused_clearly():
    with pytest.raises(ValueError, match="ScaleNet takes floating-point images .* got torch.uint8"):
        _TINY(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_out_features_select_outputs_and_stop_building():
    backbone = ScaleNet("scalenet_tiny", out_features=["res5", "res3"])
    assert list(backbone.output_shape()) == ["res3", "res5"]
    assert list(backbone(images(64, 64))) == ["res3", "res5"]

    backbone = ScaleNet("scalenet_tiny", out_features=["res3"])
    assert backbone.stage_names == ("res2", "res3")
    assert not hasattr(backbone, "res4") and not hasattr(backbone, "res5")
    assert list(backbone(images(64, 64))) == ["res3"]

    assert list(ScaleNet("scalenet_tiny", out_features=["stem", "res2"]).output_shape()) == ["stem", "res2"]
    for bad in (["res6"], [], ["res2", "p3"], ["linear"]):
        with pytest.raises(
            ValueError, match=r"expected a non-empty subset of \['stem', 'res2', 'res3', 'res4', 'res5'\]"
        ):
            ScaleNet("scalenet_tiny", out_features=bad)


def test_training_backward_reaches_every_parameter():
    backbone = ScaleNet("scalenet_tiny", norm="BN").train()
    outputs = backbone(images(64, 96, batch=2))
    sum(o.square().mean() for o in outputs.values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert any(n.startswith("res5.0.conv2.3.") for n, _ in backbone.named_parameters())


def test_the_block_owns_its_sa_branches():
    block = SABottleneck(
        16, 32, bottleneck_channels=8, widths=(4, 2, 1, 1), side=56, stride=2, shortcut_conv=True, norm="BN"
    )
    assert sorted(k for k, _ in block.named_children()) == [
        "bn1",
        "bn2",
        "bn3",
        "conv1",
        "conv2",
        "conv3",
        "downsample",
    ]
    assert {"conv2.3", "bn2.3"} <= {name for name, _ in block.named_modules()}
    assert "(conv2): ModuleDict" in repr(block)
    # eval/train, apply and reassignment reach the branch norms
    block.eval()
    assert not any(m.training for m in block.modules())
    block.apply(lambda m: m.train() if isinstance(m, nn.BatchNorm2d) else None)
    assert block.bn2["0"].training
    block.bn2 = nn.ModuleDict({k: nn.Identity() for k in block.bn2})
    y = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(block.sa_layer(y)[:, :4], block.conv2["0"](y).relu())
    clone = copy.deepcopy(block)
    assert clone.conv2["0"] is not block.conv2["0"]
    block.freeze()
    assert block.stride == 2 and block.out_channels == 32 and block.in_channels == 16
    assert tuple(block(torch.randn(1, 16, 9, 9)).shape) == (1, 32, 4, 4)


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (1, 5), (3, 40)])
def test_the_block_scripts_and_matches_eager(size):
    block = SABottleneck(
        16, 32, bottleneck_channels=8, widths=(4, 0, 2, 2), side=28, stride=2, shortcut_conv=True, norm="BN"
    ).eval()
    scripted = torch.jit.script(block)  # scripts the plain forward (forward_folded is Python only)
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), set_fast_path(block, "off")(x), rtol=0, atol=0)
        torch.testing.assert_close(scripted(x), set_fast_path(block, "on")(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- FREEZE_AT and NORM
def _norms(module):
    return [
        m for m in module.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, nn.GroupNorm))
    ]


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 4, 5])
def test_freeze_at_means_what_it_means_for_resnet(freeze_at):
    torch.manual_seed(0)
    backbone = build_backbone(make_cfg(norm="BN", freeze_at=freeze_at))
    parts = [("stem", 1)] + [(s, k) for k, s in enumerate(STAGES, start=2)]
    for name, level in parts:
        part = getattr(backbone, name)
        frozen = freeze_at >= level
        assert all(p.requires_grad != frozen for p in part.parameters()), name
        norm_type = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        assert all(type(m) is norm_type for m in _norms(part)), name
        assert len(_norms(part)) > 0

    # frozen BN is eval-mode BN: in training mode its statistics stay, the others move
    before = {n: b.clone() for n, b in backbone.named_buffers() if n.endswith("running_mean")}
    backbone.train()
    backbone(images(64, 64, batch=2))
    for name, value in backbone.named_buffers():
        if name.endswith("running_mean"):
            part_level = 1 if name.startswith("stem") else STAGES.index(name[:4]) + 2
            assert torch.equal(value, before[name]) == (freeze_at >= part_level), name


def test_freezing_keeps_the_eval_outputs():
    torch.manual_seed(0)
    backbone = ScaleNet("scalenet_tiny", norm="BN")
    for m in _norms(backbone):  # non-trivial statistics
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.data.uniform_(0.5, 1.5)
    backbone.eval()
    x = images(64, 80)
    with torch.no_grad():
        before = backbone(x)
        backbone.freeze(5)
        after = backbone(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    for stage in STAGES:
        torch.testing.assert_close(after[stage], before[stage])


@pytest.mark.parametrize(
    "norm, norm_type",
    [
        ("FrozenBN", FrozenBatchNorm2d),
        ("BN", nn.BatchNorm2d),
        ("SyncBN", nn.SyncBatchNorm),
        ("nnSyncBN", nn.SyncBatchNorm),
        ("naiveSyncBN", nn.BatchNorm2d),
        ("GN", nn.GroupNorm),
    ],
)
def test_norm_variants(norm, norm_type):
    backbone = build_backbone(make_cfg(norm=norm))
    norms = _norms(backbone)
    assert norms and all(isinstance(m, norm_type) for m in norms)
    if norm in ("FrozenBN", "BN", "naiveSyncBN", "GN"):  # SyncBatchNorm trains only on GPUs
        backbone.train()
        outputs = backbone(images(64, 64, batch=2))
        assert all(torch.isfinite(o).all() for o in outputs.values())
    backbone.eval()
    with torch.no_grad():
        outputs = backbone(images(33, 47))
    assert all(torch.isfinite(o).all() for o in outputs.values())


def test_group_norm_groups_fit_every_width():
    with torch.device("meta"):
        backbone = ScaleNet("scalenet50", norm="GN", out_features=["res2"])
    block = backbone.res2[0]  # widths (62, 9, 5, 12)
    assert [block.bn2[k].num_groups for k in "0123"] == [31, 3, 1, 6]
    assert block.bn1.num_groups == 32 and block.bn3.num_groups == 32 and backbone.stem.conv1.norm.num_groups == 32
    assert ScaleNet("scalenet_tiny", norm="GN").res4[0].bn1.num_groups == 16  # 32 channels: 2 per group


def test_group_norm_of_a_single_value_is_its_bias():
    # a 1-channel branch on a 1x1 map: one value per group, which F.group_norm refuses
    norm = scalenet_d2.modeling.layers.make_norm("GN", 1)
    with torch.no_grad():
        norm.bias.fill_(0.25)
    torch.testing.assert_close(norm(torch.randn(3, 1, 1, 1)), torch.full((3, 1, 1, 1), 0.25))
    x = torch.randn(2, 6, 5, 7)
    torch.testing.assert_close(scalenet_d2.modeling.layers.make_norm("GN", 6)(x), F.group_norm(x, 3))


def test_norm_callable_and_bad_norms():
    backbone = ScaleNet("scalenet_tiny", norm=lambda c: nn.BatchNorm2d(c, eps=1e-3))
    assert {m.eps for m in _norms(backbone)} == {1e-3}
    with pytest.raises(ValueError, match=r"unknown norm 'Foo': expected a name detectron2's get_norm accepts"):
        build_backbone(make_cfg(norm="Foo"))
    with pytest.raises(ValueError, match="ScaleNet needs a normalisation layer after every conv"):
        build_backbone(make_cfg(norm=""))


# ----------------------------------------------------------------------------- builders and config
def test_fpn_builders():
    cfg = make_cfg(name="build_scalenet_fpn_backbone")
    cfg.MODEL.FPN.IN_FEATURES = STAGES
    fpn = build_backbone(cfg)
    shapes = fpn.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [s.stride for s in shapes.values()] == [4, 8, 16, 32, 64]
    assert {s.channels for s in shapes.values()} == {cfg.MODEL.FPN.OUT_CHANNELS}
    assert isinstance(fpn.bottom_up, ScaleNet) and fpn.size_divisibility == 32
    outputs = fpn(images(64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in outputs.items()} == {
        "p2": (16, 24),
        "p3": (8, 12),
        "p4": (4, 6),
        "p5": (2, 3),
        "p6": (1, 2),
    }

    cfg = make_cfg(name="build_retinanet_scalenet_fpn_backbone", out_features=["res3", "res4", "res5"])
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    retina = build_backbone(cfg)
    assert list(retina.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in retina.output_shape().values()] == [8, 16, 32, 64, 128]
    assert retina.top_block.p6.in_channels == 256  # tiny res5: 4 * 64
    assert tuple(retina(images(64, 96))["p7"].shape[-2:]) == (1, 1)


def test_fpn_inputs_must_be_scalenet_outputs():
    cfg = make_cfg(name="build_scalenet_fpn_backbone", out_features=["res4"])
    cfg.MODEL.FPN.IN_FEATURES = STAGES
    with pytest.raises(
        ValueError, match=r"the FPN needs \['res2', 'res3', 'res4', 'res5'\] .*\(missing \['res2', 'res3', 'res5'\]\)"
    ):
        build_backbone(cfg)
    cfg = make_cfg(name="build_retinanet_scalenet_fpn_backbone", out_features=["res3", "res4"])
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4"]
    with pytest.raises(ValueError, match=r"missing \['res5'\]"):
        build_backbone(cfg)


def test_plain_builder_uses_the_config():
    backbone = build_backbone(make_cfg("scalenet50", out_features=["res4"], freeze_at=2), ShapeSpec(channels=3))
    assert backbone.allocation.name == "scalenet50"
    assert list(backbone.output_shape()) == ["res4"]
    assert not any(p.requires_grad for p in backbone.res2.parameters())
    assert all(p.requires_grad for p in backbone.res3.parameters())
    with pytest.raises(scalenet_d2.AllocationError, match="unknown allocation 'nope'"):
        build_backbone(make_cfg("nope"))


def test_config_defaults_and_idempotence():
    cfg = get_cfg()
    add_scalenet_config(cfg)
    assert cfg.MODEL.SCALENET.ALLOCATION == "scalenet50"
    assert cfg.MODEL.SCALENET.OUT_FEATURES == ["res4"]
    assert cfg.MODEL.SCALENET.NORM == "FrozenBN"
    assert "DEPTH" not in cfg.MODEL.SCALENET  # the allocation fixes the depth
    cfg.MODEL.SCALENET.ALLOCATION = "scalenet101"
    add_scalenet_config(cfg)
    assert cfg.MODEL.SCALENET.ALLOCATION == "scalenet101"
    cfg.merge_from_list(["MODEL.SCALENET.NORM", "GN", "MODEL.SCALENET.OUT_FEATURES", "['res3', 'res5']"])
    assert cfg.MODEL.SCALENET.NORM == "GN" and cfg.MODEL.SCALENET.OUT_FEATURES == ["res3", "res5"]


def test_the_body_scripts_where_detectron2_resnet_does():
    try:
        import detectron2.export  # noqa: F401  makes detectron2's ResNet (and so ScaleNet) scriptable
    except ImportError as e:  # v0.6's detectron2.export needs caffe2
        pytest.skip(f"detectron2's own ResNet does not script here: detectron2.export does not import ({e})")
    backbone = ScaleNet("scalenet_tiny").eval()
    scripted = torch.jit.script(backbone)  # the plain forward: the fast path is Python only
    for size in [(64, 96), (33, 47), (5, 300)]:
        x = images(*size)
        with torch.no_grad():
            plain, fast, ours = set_fast_path(backbone, "off")(x), set_fast_path(backbone, "on")(x), scripted(x)
        for stage in STAGES:
            torch.testing.assert_close(ours[stage], plain[stage], rtol=0, atol=0)
            torch.testing.assert_close(ours[stage], fast[stage], rtol=1e-4, atol=1e-5)


def test_a_traced_body_is_exact_at_every_input_size():
    # the shape-dependent choices (pool clamping, nearest or bilinear) are scripted inside the trace:
    # the traced plain forward is the eager one exactly; the traced fast path takes none of the
    # eager fast path's shape-dependent shortcuts, so those two agree up to float rounding
    body = ScaleNet("scalenet_tiny").eval()
    with torch.no_grad():
        example = images(256, 320)
        traced_plain = torch.jit.trace(
            set_fast_path(copy.deepcopy(body), "off"), example, check_trace=False, strict=False
        )
        traced = torch.jit.trace(body, example, check_trace=False, strict=False)  # dict outputs
        for size in [(256, 352), (288, 384), (96, 1000), (5, 7), (33, 47), (1000, 17)]:
            x = images(*size)
            plain, expected, ours = set_fast_path(body, "off")(x), set_fast_path(body, "on")(x), traced(x)
            ours_plain = traced_plain(x)
            assert list(ours) == STAGES
            for stage in STAGES:
                torch.testing.assert_close(ours_plain[stage], plain[stage], rtol=0, atol=0, msg=f"{stage} at {size}")
                error = (ours[stage] - expected[stage]).abs().max() / expected[stage].abs().max()
                assert error <= 1e-5, f"{stage} at {size}: relative error {error:.2e}"
