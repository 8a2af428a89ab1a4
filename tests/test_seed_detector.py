"""Seed detectors for detection-aware neuron allocation: seed allocations by config name, the
L1 penalty on SA branch norm scales (MODEL.SCALENET.GAMMA_L1), its sparsity metrics, the
start-up refusals, and ImageNet seeds converted into the seed detector."""

import hashlib
import json
import re

import pytest
import torch
from conftest import TINY_TRAIN, train_net

from scalenet_d2 import model_zoo
from scalenet_d2.checkpoint import to_d2_key
from scalenet_d2.modeling.allocation import AllocationError, load_allocation
from scalenet_d2.modeling.classification import ScaleNetClassifier
from scalenet_d2.modeling.scalenet import ScaleNet
from scalenet_d2.neuron_allocation.detection import (
    GAMMA_NEAR_ZERO,
    add_gamma_l1,
    gamma_l1_config_problem,
    gamma_sparsity,
    sa_gamma_parameters,
)
from scalenet_d2.neuron_allocation.pruning import count_flops, sa_gamma_l1, seed_allocation

SEED_CONFIG = "Synthetic/faster_rcnn_Sseed_FPN.yaml"


def test_seed_allocations_by_name():
    tiny = load_allocation("seed:scalenet_tiny")
    assert tiny.same_network(seed_allocation("scalenet_tiny", 1.0))
    assert [st.blocks[0] for st in tiny.stages] == [(8,) * 4, (16,) * 4, (32,) * 4, (64,) * 4]
    assert load_allocation("seed:50@0.5").same_network(seed_allocation(50, 0.5))
    assert load_allocation("seed:101").blocks_per_stage == (3, 4, 23, 3)
    for bad, message in (
        ("seed:", "no base"),
        ("seed:50@x", "multiplier 'x' is not a number"),
        ("seed:49", "seed depth 49: expected one of"),
        ("seed:50@0", "seed multiplier 0.0: expected a number > 0"),
    ):
        with pytest.raises(AllocationError, match=f"allocation '{bad}': .*{message}"):
            load_allocation(bad)


def test_config_problems_name_the_keys():
    cfg = model_zoo.get_config(SEED_CONFIG)
    assert cfg.MODEL.SCALENET.GAMMA_L1 > 0 and gamma_l1_config_problem(cfg) is None
    for key, value, message in (
        ("MODEL.SCALENET.NORM", "FrozenBN", "MODEL.SCALENET.NORM is FrozenBN"),
        ("MODEL.BACKBONE.FREEZE_AT", 2, "MODEL.BACKBONE.FREEZE_AT 2 freezes res2..res2"),
        ("MODEL.BACKBONE.NAME", "build_resnet_twin_fpn_backbone", "MODEL.BACKBONE.NAME is build_resnet_twin"),
        ("MODEL.SCALENET.GAMMA_L1", -1.0, "GAMMA_L1 -1.0: expected 0"),
    ):
        bad = cfg.clone()
        bad.merge_from_list([key, value])
        assert message in gamma_l1_config_problem(bad), key
    coco = model_zoo.get_config("NeuronAllocation/faster_rcnn_Sseed50_FPN_1x.yaml")
    assert gamma_l1_config_problem(coco) is None and coco.MODEL.SCALENET.NORM == "SyncBN"
    assert load_allocation(coco.MODEL.SCALENET.ALLOCATION).same_network(seed_allocation(50))


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_penalty_gradient_is_that_of_the_classifier_definition(norm):
    """One SGD step with the hook equals one step on loss + w * sum |gamma| (train_classifier.py's
    definition), and only the SA scales feel it."""
    torch.manual_seed(0)
    weight = 0.05
    body = ScaleNet("seed:scalenet_tiny", norm=norm, out_features=["res5"])
    with torch.no_grad():  # scales of both signs, so that sign() matters
        for _, p in sa_gamma_parameters(body):
            p.uniform_(-1, 1)
    twin = ScaleNet("seed:scalenet_tiny", norm=norm, out_features=["res5"])
    twin.load_state_dict(body.state_dict())
    x = torch.randn(2, 3, 64, 64)

    opt = torch.optim.SGD(body.parameters(), lr=1.0)
    add_gamma_l1(opt, body, weight)
    body(x)["res5"].square().mean().backward()
    opt.step()

    opt_twin = torch.optim.SGD(twin.parameters(), lr=1.0)
    l1 = sum(p.abs().sum() for _, p in sa_gamma_parameters(twin))
    (twin(x)["res5"].square().mean() + weight * l1).backward()
    opt_twin.step()

    names = dict(sa_gamma_parameters(body))
    assert len(names) == 16  # 4 blocks x 4 scales
    for (name, a), b in zip(body.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # the same scales as tools/train_classifier.py's sa_gamma_l1 penalises, in detectron2's names
    classifier = ScaleNetClassifier(seed_allocation("scalenet_tiny"), num_classes=3)
    penalised = {n for n, _ in classifier.named_parameters() if re.search(r"layer\d+\.\d+\.bn2\.\d+\.weight$", n)}
    assert {to_d2_key(n) for n in penalised} == set(names)
    expected = sum(float(p.detach().abs().sum()) for n, p in classifier.named_parameters() if n in penalised)
    assert float(sa_gamma_l1(classifier).detach()) == pytest.approx(expected)

    mean, near_zero = gamma_sparsity(body)
    gammas = torch.cat([p.detach().abs().flatten() for p in names.values()])
    assert mean == pytest.approx(float(gammas.mean())) and near_zero == pytest.approx(
        float((gammas < GAMMA_NEAR_ZERO).float().mean())
    )


def test_penalty_refuses_scales_that_cannot_train():
    frozen = ScaleNet("seed:scalenet_tiny", norm="FrozenBN")
    with pytest.raises(ValueError, match="the model has 0 trainable SA branch norm scales"):
        add_gamma_l1(torch.optim.SGD(frozen.parameters(), lr=0.1), frozen, 1e-4)
    partly = ScaleNet("seed:scalenet_tiny", norm="BN", freeze_at=2)
    with pytest.raises(ValueError, match=r"and 4 frozen ones \(first: res2.0.bn2.0.weight\)"):
        add_gamma_l1(torch.optim.SGD(partly.parameters(), lr=0.1), partly, 1e-4)


def test_imagenet_seed_converts_into_the_seed_detector(tmp_path):
    from detectron2.modeling import build_model

    from scalenet_d2.checkpoint import ScaleNetCheckpointer, convert_published_checkpoint

    torch.manual_seed(0)
    classifier = ScaleNetClassifier(seed_allocation("scalenet_tiny"), num_classes=3)
    torch.save({"model": classifier.state_dict()}, tmp_path / "seed.pth")
    convert_published_checkpoint(str(tmp_path / "seed.pth"), str(tmp_path / "seed.pkl"), log=lambda line: None)
    cfg = model_zoo.get_config(SEED_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    ScaleNetCheckpointer(model).load(str(tmp_path / "seed.pkl"))  # every body tensor, by exact name
    assert torch.equal(model.backbone.bottom_up.res5[0].bn2["3"].weight, classifier.layer4[0].bn2["3"].weight)


def test_frozen_scales_are_refused_at_start_by_train_net(env, tmp_path):
    rc, log = train_net(
        env,
        "--config-file",
        f"configs/{SEED_CONFIG}",
        *TINY_TRAIN,
        "MODEL.SCALENET.NORM",
        "FrozenBN",
        "OUTPUT_DIR",
        str(tmp_path / "frozen"),
        timeout=200,
    )
    assert rc != 0 and "MODEL.SCALENET.NORM is FrozenBN" in log and "Traceback" not in log
    assert not (tmp_path / "frozen" / "metrics.json").exists()


# ----------------------------------------------------------------------------- allocation from a seed detector


def _allocate_tool():
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("allocate_tool", REPO_ROOT / "tools" / "allocate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _save_detector(model, cfg, folder, iteration=7):
    """A checkpoint as train_net.py writes it, with the run's config.yaml beside it."""
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "iteration": iteration}, folder / "model_final.pth")
    (folder / "config.yaml").write_text(cfg.dump())
    return folder / "model_final.pth"


def _seed_detector(norm="BN"):
    """The synthetic seed detector whose dropped SA neurons have scale and shift exactly 0: per
    block, a random quarter of its neurons (the stage's ResNet width, width multiplier 1) keeps
    nonzero ones."""
    from detectron2.modeling import build_model

    cfg = model_zoo.get_config(SEED_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SCALENET.NORM = norm
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    body = model.backbone.bottom_up
    kept = {}
    with torch.no_grad():
        for stage_name in ("res2", "res3", "res4", "res5"):
            block = getattr(body, stage_name)[0]
            norms = [block.bn2[str(i)] for i in range(4)]
            width = norms[0].num_features
            keep = torch.randperm(4 * width)[:width]
            mask = torch.zeros(4 * width, dtype=torch.bool)
            mask[keep] = True
            for i, bn in enumerate(norms):
                m = mask[i * width : (i + 1) * width]
                if norm != "FrozenBN":
                    bn.running_mean.uniform_(-0.5, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
                gamma = torch.empty(width).uniform_(0.5, 1.5) * torch.sign(torch.randn(width))
                bn.weight.copy_(torch.where(m, gamma, torch.zeros(width)))
                bn.bias.copy_(torch.where(m, torch.randn(width) * 0.1, torch.zeros(width)))
            kept[stage_name] = tuple(int(mask[i * width : (i + 1) * width].sum()) for i in range(4))
    return cfg, model, kept


def test_detection_allocation_inherits_weights_that_give_the_seeds_detections(tmp_path):
    from detectron2.modeling import build_model

    from scalenet_d2.checkpoint import ScaleNetCheckpointer

    cfg, seed, kept = _seed_detector()
    ckpt = _save_detector(seed, cfg, tmp_path / "seed")
    out, weights = tmp_path / "det.json", tmp_path / "det_init.pth"
    _allocate_tool().main(
        [str(ckpt), "--width-multiplier", "1", "--output", str(out), "--inherit-weights", str(weights)]
    )
    allocation = load_allocation(str(out))
    # the kept count per scale is where the nonzero scales were
    assert {st.name: st.blocks[0] for st in allocation.stages} == kept
    prov = allocation.provenance
    assert prov["seed_kind"] == "detection" and prov["seed_iteration"] == 7
    assert prov["seed_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["seed_config"] == str(tmp_path / "seed" / "config.yaml")
    assert prov["seed_datasets"] == list(cfg.DATASETS.TRAIN)

    # the pruned detector: the same config with the new allocation, weights loaded strictly
    pruned_cfg = cfg.clone()
    pruned_cfg.MODEL.SCALENET.ALLOCATION = str(out)
    pruned = build_model(pruned_cfg).eval()
    ScaleNetCheckpointer(pruned).load(str(weights))
    image = torch.randint(0, 255, (3, 160, 192), dtype=torch.uint8)
    with torch.no_grad():
        a = seed([{"image": image, "height": 160, "width": 192}])[0]["instances"]
        b = pruned([{"image": image, "height": 160, "width": 192}])[0]["instances"]
        x = seed.preprocess_image([{"image": image}]).tensor
        fa, fb = seed.backbone(x), pruned.backbone(x)
    for name in fa:
        torch.testing.assert_close(fb[name], fa[name], rtol=1e-4, atol=1e-5)
    assert len(a) == len(b) > 0
    torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)

    # a budget counted at a detection input size
    sized = tmp_path / "sized.json"
    target = 0.9 * count_flops(allocation, (320, 448), 1000) / 1e9
    _allocate_tool().main(
        [str(ckpt), "--target-gflops", str(target), "--flops-size", "320x448", "--output", str(sized)]
    )
    budget = load_allocation(str(sized)).provenance["budget"]
    assert (
        budget["flops_size"] == [320, 448]
        and budget["flops_320x448"] <= target * 1e9 < budget["next_step_flops_320x448"]
    )


def test_detector_checkpoints_that_are_not_seeds_are_refused_and_nothing_is_written(tmp_path):
    from detectron2.modeling import build_model

    from scalenet_d2.checkpoint.classifier import ClassifierCheckpointError
    from scalenet_d2.neuron_allocation.pruning import NeuronAllocationError

    allocate = _allocate_tool()
    outs = tmp_path / "outs"
    outs.mkdir()

    def run(ckpt, *budget):
        allocate.main([str(ckpt), *(budget or ("--width-multiplier", "1")), "--output", str(outs / "a.json")])

    cfg, frozen, _ = _seed_detector(norm="FrozenBN")
    with pytest.raises(ClassifierCheckpointError, match="a seed detector trained with FrozenBN"):
        run(_save_detector(frozen, cfg, tmp_path / "frozen"))
    for config, message in (
        ("Synthetic/faster_rcnn_Stiny_FPN.yaml", "not a seed network: block layer1.0"),
        ("Synthetic/faster_rcnn_Rtiny_FPN.yaml", "a ResNet detector"),
    ):
        other = model_zoo.get_config(config)
        other.MODEL.DEVICE = "cpu"
        with pytest.raises(ClassifierCheckpointError, match=message):
            run(_save_detector(build_model(other), other, tmp_path / config.split("/")[1]))
    cfg, seed, _ = _seed_detector()
    with pytest.raises(NeuronAllocationError, match="FLOPs target 1e-06 G keeps nothing"):
        run(_save_detector(seed, cfg, tmp_path / "seed"), "--target-gflops", "1e-6", "--flops-size", "800x1344")
    assert list(outs.iterdir()) == []


def test_the_whole_pipeline_through_the_command_lines(env, tmp_path):
    """tools/run_allocation_demo.py --quick: the seed detector in two gloo processes with
    synchronized BN and the L1 penalty, its allocation at scalenet_tiny's FLOPs, the three arms
    through tools/study.py, the fine-tuned arm, the summary and the picture."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "tools/run_allocation_demo.py", "--quick", "--seeds", "1", "--parallel", "3"]
        + ["--seed-processes", "2", "--output-dir", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the seed: two processes, the penalty on, sparsity in its metrics
    seed_log = (out / "seed" / "console.log").read_text()
    assert "World size: 2" in seed_log and "'MODEL.SCALENET.NORM', 'naiveSyncBN'" in seed_log
    assert "GAMMA_L1: 0.001" in (out / "seed" / "config.yaml").read_text()
    records = [json.loads(line) for line in (out / "seed" / "metrics.json").read_text().splitlines()]
    sparsity = [r for r in records if "sa_gamma_abs_mean" in r]
    assert sparsity and sparsity[-1]["iteration"] == 15
    assert 0 < sparsity[-1]["sa_gamma_abs_mean"] <= 1.01 and 0 <= sparsity[-1]["sa_gamma_near_zero"] <= 1
    # the allocation: from the detector, at most scalenet_tiny's FLOPs, within one neuron step
    allocation = load_allocation(str(out / "detection_allocation.json"))
    prov, tiny = allocation.provenance, load_allocation("scalenet_tiny")
    assert prov["seed_kind"] == "detection" and prov["seed_datasets"] == ["synthetic_shapes_tiny_train"]
    assert prov["flops_224"] <= count_flops(tiny, 224, 1000) < prov["budget"]["next_step_flops_224"]
    assert allocation.blocks_per_stage == tiny.blocks_per_stage
    # the three arms, each trained and compared; the fine-tuned arm apart with its iterations
    study = json.loads((out / "study" / "study.json").read_text())
    assert study["names"] == ["detection_allocation", "imagenet_allocation", "resnet_twin"]
    table = (out / "study" / "comparison.md").read_text()
    assert all(name in table for name in study["names"])
    summary = (out / "summary.md").read_text()
    assert "detection_allocation fine-tuned (32 iterations in all)" in summary
    assert (out / "allocations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lsj_seed_lazyconfig_trains_the_sa_scales_with_the_l1_penalty():
    """The from-scratch LSJ LazyConfig: a seed:50 body in SyncBN with nothing frozen, and an
    optimizer whose step equals one of torch's SGD on loss + gamma_l1 x sum |gamma|."""
    from conftest import REPO_ROOT
    from detectron2.config import LazyConfig, instantiate
    from detectron2.solver import get_default_optimizer_params

    from scalenet_d2.neuron_allocation.detection import SGDWithGammaL1

    cfg = LazyConfig.load(str(REPO_ROOT / "configs/NeuronAllocation/mask_rcnn_Sseed50_FPN_100ep_LSJ.py"))
    body = instantiate(cfg.model.backbone.bottom_up)
    assert body.allocation.same_network(seed_allocation(50)) and isinstance(
        body.res3[0].bn2["2"], torch.nn.SyncBatchNorm
    )
    assert all(p.requires_grad for p in body.parameters())  # freeze_at 0: every scale trains

    torch.manual_seed(0)
    model = ScaleNet("seed:scalenet_tiny", norm="BN", out_features=["res5"])
    with torch.no_grad():
        for _, p in sa_gamma_parameters(model):
            p.uniform_(-1, 1)
    twin = ScaleNet("seed:scalenet_tiny", norm="BN", out_features=["res5"])
    twin.load_state_dict(model.state_dict())
    cfg.optimizer.params.model = model  # as detectron2's lazyconfig_train_net.py does
    opt = instantiate(cfg.optimizer)
    assert isinstance(opt, SGDWithGammaL1)
    penalised = [g for g in opt.param_groups if "gamma_l1" in g]
    assert {id(p) for g in penalised for p in g["params"]} == {id(p) for _, p in sa_gamma_parameters(model)}
    reference = torch.optim.SGD(
        get_default_optimizer_params(twin, weight_decay_norm=0.0), lr=0.1, momentum=0.9, weight_decay=4e-5
    )
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):  # two steps: momentum carries the penalty's gradient too
        opt.zero_grad()
        model(x)["res5"].square().mean().backward()
        opt.step()
        reference.zero_grad()
        l1 = sum(p.abs().sum() for _, p in sa_gamma_parameters(twin))
        (twin(x)["res5"].square().mean() + 1e-4 * l1).backward()
        reference.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
