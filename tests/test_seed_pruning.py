"""Data-driven neuron allocation: selection, budgets, classifier layout and checkpoints, tools end to end."""

import hashlib
import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from scalenet_d2.checkpoint.classifier import ALLOCATION_KEY, SEED_KEY, ClassifierCheckpointError, load_seed_checkpoint
from scalenet_d2.modeling.allocation import SCALES, Allocation, StageAllocation, load_allocation
from scalenet_d2.modeling.classification import ScaleNetClassifier
from scalenet_d2.neuron_allocation.pruning import (
    NeuronAllocationError,
    NeuronRanking,
    candidate_multipliers,
    count_flops,
    count_params,
    inherit_weights,
    neuron_costs,
    search_flops_target,
    seed_allocation,
    select_block,
    select_multiplier,
    stage_widths,
)
from scalenet_d2.neuron_allocation.training import DatasetError

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_gammas(allocation, seed=0):
    """bn2 gammas of a seed, as a partial state_dict: enough for NeuronRanking."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for s, st in enumerate(allocation.stages):
        for b, widths in enumerate(st.blocks):
            for i, c in enumerate(widths):
                sd[f"layer{s + 1}.{b}.bn2.{i}.weight"] = torch.randn(c, generator=g)
    return sd


# ----------------------------------------------------------------------------- selection


def test_select_block_hand_made_gammas():
    gammas = [
        torch.tensor([0.9, 0.1, 0.5, 0.5]),  # scale 1
        torch.tensor([0.5, 0.7, 0.0, 0.2]),  # scale 2
        torch.tensor([-0.9, 0.3, 0.05, 0.5]),  # scale 4: the sign does not matter, |gamma| does
        torch.tensor([0.6, 0.0, 0.0, 0.0]),  # scale 7
    ]
    # ranking: .9 s1c0, .9 s4c0 (tie: smaller scale first), .7 s2c1, .6 s7c0,
    #          .5 s1c2, .5 s1c3, .5 s2c0, .5 s4c3 (ties: scale, then channel), .3 s4c1, ...
    assert select_block(gammas, 1) == ((1, 0, 0, 0), ((0,), (), (), ()))
    assert select_block(gammas, 2) == ((1, 0, 1, 0), ((0,), (), (0,), ()))
    assert select_block(gammas, 4) == ((1, 1, 1, 1), ((0,), (1,), (0,), (0,)))
    assert select_block(gammas, 6) == ((3, 1, 1, 1), ((0, 2, 3), (1,), (0,), (0,)))
    assert select_block(gammas, 7) == ((3, 2, 1, 1), ((0, 2, 3), (0, 1), (0,), (0,)))
    assert select_block(gammas, 8) == ((3, 2, 2, 1), ((0, 2, 3), (0, 1), (0, 3), (0,)))
    assert select_block(gammas, 16)[0] == (4, 4, 4, 4)
    for bad in (0, 17):
        with pytest.raises(NeuronAllocationError, match=r"keep=%d; expected 1\.\.16" % bad):
            select_block(gammas, bad)


def test_select_block_ties_are_deterministic():
    equal = [torch.full((4,), 0.25) for _ in SCALES]
    assert select_block(equal, 5) == ((4, 1, 0, 0), ((0, 1, 2, 3), (0,), (), ()))
    # the same answer whatever the tensors' dtype (float32 vs float64 vs half)
    assert select_block([g.double() for g in equal], 5) == select_block([g.half() for g in equal], 5)
    with pytest.raises(NeuronAllocationError, match="bn2.2.weight\\[1\\] is nan"):
        select_block([torch.ones(2), torch.ones(2), torch.tensor([1.0, float("nan")]), torch.ones(2)], 2)


def test_ranking_selects_per_block_not_globally():
    # block res2.0 has tiny gammas, res2.1 huge ones: a global threshold would empty res2.0
    base = Allocation(
        "t",
        16,
        tuple(
            StageAllocation(n, p, s, ((p, p, p, p),) * 2)
            for n, p, s in zip(("res2", "res3", "res4", "res5"), (8, 16, 32, 64), (56, 28, 14, 7))
        ),
    )
    sd = _random_gammas(base)
    for i in range(4):
        sd[f"layer1.0.bn2.{i}.weight"] = sd[f"layer1.0.bn2.{i}.weight"] * 1e-3
        sd[f"layer1.1.bn2.{i}.weight"] = sd[f"layer1.1.bn2.{i}.weight"] * 1e3
    rows = NeuronRanking(base, sd).counts((8, 16, 32, 64))
    assert [sum(r) for r in rows] == [8, 8, 16, 16, 32, 32, 64, 64]
    # and each row is exactly what select_block gives that block on its own
    gam = [sd[f"layer1.0.bn2.{i}.weight"] for i in range(4)]
    assert rows[0] == select_block(gam, 8)[0]


# ----------------------------------------------------------------------------- budgets


def test_cost_exponent_moves_neurons_to_cheaper_scales_and_lowers_flops():
    seed = seed_allocation("scalenet_tiny", 1.0)
    gammas = _random_gammas(seed)
    widths = stage_widths(seed, 1.0)
    paper = NeuronRanking(seed, gammas)
    zero = NeuronRanking(seed, gammas, cost_exponent=0.0)
    assert zero.orders == paper.orders  # exponent 0: |gamma|, bit for bit
    assert neuron_costs(seed.stages[0]) == (8 * 9 * 56**2, 8 * 9 * 28**2, 8 * 9 * 14**2, 8 * 9 * 8**2)
    assert neuron_costs(seed.stages[3]) == (64 * 9 * 7**2, 64 * 9 * 3**2, 64 * 9 * 1, 64 * 1)  # 1x1 at 7 / 2**3 <= 1
    baseline = paper.allocation_for(widths)
    for exponent in (0.5, 1.0):
        cheaper = NeuronRanking(seed, gammas, cost_exponent=exponent).allocation_for(widths)
        for stage, before, after in zip(seed.stages, baseline.stages, cheaper.stages):
            costs = neuron_costs(stage)
            for row_before, row_after in zip(before.blocks, after.blocks):
                assert sum(row_after) == sum(row_before)  # the same neurons per block
                assert sum(c * n for c, n in zip(costs, row_after)) <= sum(c * n for c, n in zip(costs, row_before))
        coarse = [sum(row[2] + row[3] for st in a.stages for row in st.blocks) for a in (baseline, cheaper)]
        assert coarse[1] > coarse[0], (exponent, coarse)  # towards the scale-4 and -7 branches
        assert count_flops(cheaper) < count_flops(baseline)
    with pytest.raises(NeuronAllocationError, match=r"cost exponent -1: expected a finite number >= 0"):
        NeuronRanking(seed, gammas, cost_exponent=-1)


def test_width_multiplier_reproduces_published_stage_widths():
    seed = seed_allocation(152, 1.0)  # widest layout: enough blocks for every depth's check
    for name, m in (("scalenet50", 1.36), ("scalenet50_light", 1.0), ("scalenet101", 1.332), ("scalenet152", 1.396)):
        published = [{sum(widths) for widths in stage.blocks} for stage in load_allocation(name).stages]
        assert all(len(widths) == 1 for widths in published), name
        assert [widths.pop() for widths in published] == list(stage_widths(seed, m)), name


def test_width_multiplier_errors():
    seed = seed_allocation(50, 1.0)  # 4 x 64 .. 4 x 512 neurons per block
    assert stage_widths(seed, 4.0) == (256, 512, 1024, 2048)
    with pytest.raises(
        NeuronAllocationError, match=r"keeps 257 neurons per res2 block .* has only 256 .* expected a multiplier <= 4\b"
    ):
        stage_widths(seed, 4.01)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(NeuronAllocationError, match="keeps nothing: expected a number > 0"):
            stage_widths(seed, bad)
    assert stage_widths(seed, 1e-9) == (1, 1, 1, 1)  # a block keeps at least one neuron


def test_flops_target_lands_within_one_neuron_step():

    seed = seed_allocation(50, 1.0)
    ranking = NeuronRanking(seed, _random_gammas(seed))
    cands = candidate_multipliers(seed)
    assert cands[0] == 1 / 512 and cands[-1] == 4.0 and len(cands) == 2048  # every res5 neuron step
    for target in (1.5e9, 3.8e9, 5.5e9):
        best, nxt = search_flops_target(ranking, target)
        assert best.flops <= target < nxt.flops
        k = cands.index(best.width_multiplier)
        assert nxt.width_multiplier == cands[k + 1]  # the very next neuron step overshoots
        steps = [n - b for n, b in zip(nxt.stage_widths, best.stage_widths)]
        assert steps[-1] == 1 and all(d in (0, 1) for d in steps)  # one neuron step: +1 in res5, maybe others
        assert best.flops == count_flops(best.allocation)
    full = select_multiplier(ranking, seed, 4.0, 1000, 224)
    assert search_flops_target(ranking, full.flops) == (full, None)
    with pytest.raises(NeuronAllocationError, match=r"keeps nothing: the smallest network .* already has"):
        search_flops_target(ranking, 1e6)
    with pytest.raises(
        NeuronAllocationError,
        match=r"more than seed .* can give: .* gives 6\.88\d* G at 224x224; expected a target <= that",
    ):
        search_flops_target(ranking, 7e9)


def test_flop_count_matches_fvcore_and_paper():
    from fvcore.nn import FlopCountAnalysis

    # a small net with pruned branches (zeros) and every kernel-size case of the side rule
    alloc = Allocation(
        "t",
        16,
        (
            StageAllocation("res2", 8, 56, ((5, 0, 2, 1), (3, 3, 0, 2))),
            StageAllocation("res3", 16, 28, ((0, 9, 4, 3),)),
            StageAllocation("res4", 32, 14, ((20, 0, 0, 12),)),
            StageAllocation("res5", 64, 7, ((30, 20, 10, 4),)),
        ),
    )
    model = ScaleNetClassifier(alloc, num_classes=10).eval()
    flops = FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    ops = flops.by_operator()
    assert count_flops(alloc, 224, 10) == ops["conv"] + ops["linear"]
    assert count_params(alloc, 10) == sum(p.numel() for p in model.parameters())
    # the paper's speed table: ScaleNet-50 3.8 G (ResNet-50 4.1 G)
    assert abs(count_flops(load_allocation("scalenet50")) / 1e9 - 3.8) < 0.05


# ----------------------------------------------------------------------------- classifier


def _published_keys(rows):
    """Key -> shape of a published ImageNet checkpoint, written from the spec, independent of the model code."""
    keys = {"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 2048), "fc.bias": (1000,)}

    def bn(prefix, c):
        for field in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{field}"] = (c,)

    bn("bn1", 64)
    in_ch, n = 64, 0
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            *widths, side = rows[n]
            n += 1
            p = f"layer{layer}.{b}"
            keys[f"{p}.conv1.weight"] = (planes, in_ch, 1, 1)
            bn(f"{p}.bn1", planes)
            for i, c in enumerate(widths):
                if c:
                    k = 3 if side / 2**i > 1 else 1
                    keys[f"{p}.conv2.{i}.weight"] = (c, planes, k, k)
                    bn(f"{p}.bn2.{i}", c)
            keys[f"{p}.conv3.weight"] = (4 * planes, sum(widths), 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * planes, in_ch, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            in_ch = 4 * planes
    return keys


def test_classifier_loads_published_layout_strictly(tmp_path):
    rows = load_allocation("scalenet50").to_rows()
    path = tmp_path / "scalenet50.json"
    path.write_text(json.dumps(rows))
    expected = _published_keys(rows)
    assert "layer1.2.conv2.3.weight" in expected and "layer1.2.conv2.2.weight" not in expected
    model = ScaleNetClassifier(str(path))
    sd = {k: torch.full(shape, 0.5) for k, shape in expected.items()}
    sd["layer1.2.conv2.3.weight"] = torch.randn(expected["layer1.2.conv2.3.weight"])
    model.load_state_dict(sd, strict=True)  # without num_batches_tracked, as some releases
    with_counts = dict(
        sd,
        **{k.replace("running_var", "num_batches_tracked"): torch.tensor(7) for k in sd if k.endswith("running_var")},
    )
    model.load_state_dict(with_counts, strict=True)
    assert {k for k in model.state_dict() if not k.endswith("num_batches_tracked")} == set(expected)
    assert torch.equal(model.layer1[2].conv2["3"].weight, sd["layer1.2.conv2.3.weight"])


def test_inherited_weights_equal_seed_with_dropped_neurons_zeroed():
    torch.manual_seed(0)
    seed = seed_allocation("scalenet_tiny", 1.0)
    model = ScaleNetClassifier(seed, num_classes=5).eval()
    with torch.no_grad():  # BN statistics and affine parameters that a trained seed would have
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        model.layer1[0].bn2["3"].weight.mul_(1e-3)  # scale-7 branch of res2.0 loses everything
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ranking = NeuronRanking(seed, sd)
    sel = select_multiplier(ranking, seed, 1.0, 5, 224)
    assert sel.allocation.stages[0].blocks[0][3] == 0
    pruned_sd = inherit_weights(sd, seed, sel)
    assert "layer1.0.conv2.3.weight" not in pruned_sd and "layer1.0.bn2.3.running_var" not in pruned_sd
    pruned = ScaleNetClassifier(sel.allocation, num_classes=5).eval()
    pruned.load_state_dict(pruned_sd, strict=True)

    zeroed = {k: v.clone() for k, v in sd.items()}
    for n, (s, b) in enumerate(ranking.blocks):
        for i, kept in enumerate(sel.kept[n]):
            drop = sorted(set(range(seed.stages[s].blocks[b][i])) - set(kept))
            for field in ("weight", "bias"):
                zeroed[f"layer{s + 1}.{b}.bn2.{i}.{field}"][drop] = 0
    model.load_state_dict(zeroed)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    assert torch.allclose(ref, out, atol=1e-5, rtol=1e-4), (ref - out).abs().max()
    model.load_state_dict(sd)  # and the dropped neurons did matter
    with torch.no_grad():
        assert not torch.allclose(model(x), out, atol=1e-3)


# ----------------------------------------------------------------------------- seed checkpoints


def test_seed_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ClassifierCheckpointError, match=f"seed checkpoint {missing}: no such file"):
        load_seed_checkpoint(str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ClassifierCheckpointError, match="cannot be read as a PyTorch checkpoint"):
        load_seed_checkpoint(str(garbage))
    other = tmp_path / "other.pth"
    torch.save({"model": {"weight": torch.zeros(3)}}, other)
    with pytest.raises(ClassifierCheckpointError, match="not a ScaleNet classifier checkpoint: no SA layer keys"):
        load_seed_checkpoint(str(other))
    # unequal widths (here a pruned branch in res3) are not a seed: the first offending block is named
    stages = [
        StageAllocation(n, p, sd, ((p, p, p, p),))
        for n, p, sd in zip(("res2", "res3", "res4", "res5"), (8, 16, 32, 64), (56, 28, 14, 7))
    ]
    stages[1] = StageAllocation("res3", 16, 28, ((16, 16, 0, 16),))
    stages[2] = StageAllocation("res4", 32, 14, ((32, 1, 32, 32),))
    path = tmp_path / "final.pth"
    torch.save({"model": ScaleNetClassifier(Allocation("final", 16, tuple(stages)), 3).state_dict()}, path)
    with pytest.raises(
        ClassifierCheckpointError,
        match=r"not a seed network: block layer2\.0 \(res3 block 0\) has SA widths "
        r"\[16, 16, 0, 16\] .* e\.g\. \[16, 16, 16, 16\]",
    ):
        load_seed_checkpoint(str(path))
    # seed weights whose recorded allocation disagrees with them
    seed = seed_allocation("scalenet_tiny", 1.0)
    wrong = seed_allocation("scalenet_tiny", 0.5)
    path = tmp_path / "mismatch.pth"
    torch.save({"model": ScaleNetClassifier(seed, 3).state_dict(), SEED_KEY: {"allocation": wrong.to_dict()}}, path)
    with pytest.raises(
        ClassifierCheckpointError,
        match=rf"seed checkpoint {path} does not fit allocation .* field '{SEED_KEY}.allocation': first mismatching key "
        r"'layer1.0.conv2.0.weight': shape \(8, 8, 3, 3\) in the checkpoint, \(4, 8, 3, 3\) in the allocation",
    ):
        load_seed_checkpoint(str(path))
    # a plain published-layout state_dict of a seed is accepted (allocation inferred)
    path = tmp_path / "plain_seed.pth"
    torch.save(ScaleNetClassifier(seed, 3).state_dict(), path)
    loaded = load_seed_checkpoint(str(path))
    assert loaded.allocation.same_network(seed) and loaded.num_classes == 3 and loaded.meta == {}


# ----------------------------------------------------------------------------- tools end to end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(root, "train", 6, seed=1)
    write_image_folder(root, "val", 2, seed=2)
    return root


def _tiny_seed_args(dataset, output_dir, extra):
    """train_classifier.py arguments for a tiny seed on the generated dataset, plus `extra`."""
    return [
        str(dataset),
        "--base",
        "scalenet_tiny",
        "--image-size",
        "64",
        "--workers",
        "0",
        "--output-dir",
        str(output_dir),
        *extra.split(),
    ]


@pytest.fixture(scope="module")
def trained_seed(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("seed")
    ckpt = _tool("train_classifier").main(
        _tiny_seed_args(dataset, out, "--max-iters 2 --batch-size 4 --log-period 1 --gamma-l1 1e-4 --lr 0.05")
    )
    return Path(ckpt), out


def test_train_classifier_writes_marked_checkpoint_and_resumes(trained_seed, dataset):
    ckpt, out = trained_seed
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and state["epoch"] == 0  # stopped inside epoch 1 (4 iterations)
    seed = Allocation.from_dict(state[SEED_KEY]["allocation"])
    assert seed.same_network(seed_allocation("scalenet_tiny", 1.0))
    assert state["classes"] == ["class_ellipse", "class_rectangle", "class_triangle"]
    log = (out / "log.txt").read_text()
    assert "total 2/2" in log and "eta 0:00:00" in log and "img/s" in log
    assert not [p for p in os.listdir(out) if "tmp" in p]  # atomic checkpointing leaves no temporaries

    # resume: the unfinished epoch is redone from its start; val is evaluated after it
    resumed = out.parent / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pth").write_bytes(ckpt.read_bytes())
    _tool("train_classifier").main(_tiny_seed_args(dataset, resumed, "--epochs 1 --batch-size 4 --resume"))
    state = torch.load(resumed / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] == 4
    assert set(state["metrics"]) == {"top1", "top5", "images"} and state["metrics"]["images"] == 6
    assert "resumed from" in (resumed / "log.txt").read_text()
    final = torch.load(resumed / "model_final.pth", map_location="cpu", weights_only=True)
    assert SEED_KEY in final and "optimizer" not in final
    # resuming with another network is refused
    with pytest.raises(
        ClassifierCheckpointError, match=r"--resume .*checkpoint.pth: field 'scalenet_d2_allocation' is allocation"
    ):
        _tool("train_classifier").main(
            _tiny_seed_args(dataset, resumed, "--multiplier 0.5 --epochs 3 --batch-size 4 --resume")
        )


def test_train_classifier_distributed_two_processes(dataset, tmp_path):
    """torchrun, 2 CPU processes (gloo): DistributedSampler + DDP, one checkpoint written by rank 0."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tools" / "train_classifier.py"),
            *_tiny_seed_args(dataset, out, "--max-iters 2 --batch-size 2 --log-period 1"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "on 2 x cpu, global batch 4" in log and "iter 2/4 (total 2/2)" in log  # 18 images / 2 ranks / batch 2
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and not any(k.startswith("module.") for k in state["model"])


def test_train_classifier_dataset_errors(tmp_path, dataset):
    train_classifier = _tool("train_classifier")
    out = tmp_path / "out"

    def run(data):
        train_classifier.main(_tiny_seed_args(data, out, "--max-iters 1 --batch-size 2"))

    layout = r"expected .*/train/<class>/<image> \(ImageNet layout"
    with pytest.raises(DatasetError, match=rf"dataset folder {tmp_path}/missing does not exist; {layout}"):
        run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=rf"dataset folder {tmp_path}/empty has no 'train' folder; {layout}"):
        run(tmp_path / "empty")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=rf"dataset folder {tmp_path}/noclass/train cannot be used: .*{layout}"):
        run(tmp_path / "noclass")
    (tmp_path / "noimage" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimage" / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=rf"dataset folder {tmp_path}/noimage/train cannot be used"):
        run(tmp_path / "noimage")
    (tmp_path / "corrupt" / "train" / "a").mkdir(parents=True)
    (tmp_path / "corrupt" / "train" / "a" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=rf"image {tmp_path}/corrupt/train/a/0.png .* cannot be read"):
        run(tmp_path / "corrupt")
    assert not out.exists()  # nothing written on bad input


def test_allocate_bad_budget_writes_nothing(trained_seed, tmp_path):
    ckpt, _ = trained_seed
    allocate = _tool("allocate")
    outs = [
        "--output",
        str(tmp_path / "a.json"),
        "--chart",
        str(tmp_path / "a.png"),
        "--inherit-weights",
        str(tmp_path / "a.pth"),
    ]
    with pytest.raises(
        NeuronAllocationError, match=r"width multiplier 4.5 keeps 36 neurons per res2 block .* has only 32"
    ):
        allocate.main([str(ckpt), "--width-multiplier", "4.5", *outs])
    with pytest.raises(NeuronAllocationError, match="width multiplier 0 keeps nothing"):
        allocate.main([str(ckpt), "--width-multiplier", "0", *outs])
    with pytest.raises(NeuronAllocationError, match="FLOPs target 1e-06 G keeps nothing"):
        allocate.main([str(ckpt), "--target-gflops", "1e-6", *outs])
    with pytest.raises(NeuronAllocationError, match=r"output .*/nodir/a.json: folder .*/nodir does not exist"):
        allocate.main([str(ckpt), "--width-multiplier", "1", "--output", str(tmp_path / "nodir" / "a.json")])
    assert os.listdir(tmp_path) == []
    # the command line reports the error and exits with status 1 (SystemExit with a message)
    with pytest.raises(SystemExit, match=rf"allocate.py: error: seed checkpoint {tmp_path}/none.pth: no such file"):
        argv = [str(tmp_path / "none.pth"), "--width-multiplier", "1", "--output", str(tmp_path / "a.json")]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["allocate.py", *argv])
            runpy.run_path(str(REPO / "tools" / "allocate.py"), run_name="__main__")
    assert os.listdir(tmp_path) == []


def test_allocate_records_the_cost_exponent_and_saves_flops_at_the_same_width(trained_seed, tmp_path):
    ckpt, _ = trained_seed
    allocate = _tool("allocate")
    made = {}
    for exponent in ("0", "1"):
        path = tmp_path / f"a{exponent}.json"
        allocate.main([str(ckpt), "--width-multiplier", "1", "--cost-exponent", exponent, "--output", str(path)])
        made[exponent] = load_allocation(str(path))
    assert made["0"].provenance["cost_exponent"] == 0.0 and made["1"].provenance["cost_exponent"] == 1.0
    assert "|gamma| / cost^cost_exponent" in made["1"].provenance["importance"]
    assert made["1"].provenance["stage_widths"] == made["0"].provenance["stage_widths"]
    assert made["1"].provenance["flops_224"] < made["0"].provenance["flops_224"]


def test_allocate_then_detect_end_to_end(trained_seed, dataset, tmp_path, detector_cfg):
    ckpt, _ = trained_seed
    alloc_path, chart, weights = tmp_path / "mine.json", tmp_path / "mine.png", tmp_path / "mine_init.pth"
    proc = subprocess.run(
        [
            PYTHON,
            str(REPO / "tools" / "allocate.py"),
            str(ckpt),
            "--target-gflops",
            "0.042",
            "--output",
            str(alloc_path),
            "--chart",
            str(chart),
            "--inherit-weights",
            str(weights),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "res5 sum" in proc.stdout and "FLOPs target 0.042 G -> width multiplier" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["mine.json", "mine.png", "mine_init.pth"]

    # the file: the project format, with provenance, loadable by name-or-path
    allocation = load_allocation(str(alloc_path))
    prov = allocation.provenance
    assert prov["method"] == "bn-gamma per-block selection"
    assert prov["seed_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["flops_224"] == count_flops(allocation, 224, 3) <= 0.042e9 < prov["budget"]["next_step_flops_224"]
    assert prov["params"] == count_params(allocation, 3)
    assert prov["budget"]["target_gflops"] == 0.042
    seed = load_seed_checkpoint(str(ckpt))
    widths = stage_widths(seed.allocation, prov["budget"]["width_multiplier"])
    assert [sum(b) for st in allocation.stages for b in st.blocks] == list(widths)
    # rows are what the per-block selection on the trained gammas gives
    assert allocation.same_network(NeuronRanking(seed.allocation, seed.state_dict).allocation_for(widths))

    # the chart: one bar colour per scale that has neurons anywhere
    from PIL import Image

    img = Image.open(chart)
    assert img.format == "PNG" and min(img.size) >= 400
    pixels = {tuple(p[:3]) for p in np.asarray(img.convert("RGB")).reshape(-1, 3)[::3]}
    from scalenet_d2.neuron_allocation.pruning import SCALE_COLOURS

    for i, colour in enumerate(SCALE_COLOURS):
        rgb = tuple(int(colour[k : k + 2], 16) for k in (1, 3, 5))
        used = any(b[i] for st in allocation.stages for b in st.blocks)
        assert (rgb in pixels) == used, (SCALES[i], used)

    # classifier: the inherited weights load strictly; detection: Faster R-CNN trains a step
    clf = ScaleNetClassifier(str(alloc_path), num_classes=3)
    clf.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"], strict=True)

    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(detector_cfg("fpn", allocation=str(alloc_path)))
    body = model.backbone.bottom_up
    assert body.allocation.same_network(allocation)
    model.train()
    inst = Instances(
        (96, 128),
        gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [64.0, 20.0, 120.0, 90.0]])),
        gt_classes=torch.tensor([0, 2]),
    )
    batch = [
        {"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8), "instances": inst, "height": 96, "width": 128}
    ]
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) >= {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sum(losses.values()).backward()
    sa_conv = next(iter(body.res3[0].conv2.values())).weight
    assert sa_conv.grad is not None and sa_conv.grad.abs().sum() > 0
    opt.step()


def test_final_network_trains_from_inherited_weights_and_converts(trained_seed, dataset, tmp_path, detector_cfg):
    ckpt, _ = trained_seed
    alloc_path, weights = tmp_path / "final.json", tmp_path / "final_init.pth"
    _tool("allocate").main(
        [str(ckpt), "--width-multiplier", "0.75", "--output", str(alloc_path), "--inherit-weights", str(weights)]
    )
    out = tmp_path / "train"
    _tool("train_classifier").main(
        [
            str(dataset),
            "--allocation",
            str(alloc_path),
            "--init-weights",
            str(weights),
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--image-size",
            "64",
            "--workers",
            "0",
            "--output-dir",
            str(out),
        ]
    )
    assert f"initialised from {weights}" in (out / "log.txt").read_text()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert SEED_KEY not in final and Allocation.from_dict(final[ALLOCATION_KEY]).same_network(
        load_allocation(str(alloc_path))
    )
    # a trained final network is not a seed
    with pytest.raises(ClassifierCheckpointError, match="not a seed network"):
        load_seed_checkpoint(str(out / "model_final.pth"))
    _check_conversion(out / "model_final.pth", alloc_path, tmp_path, detector_cfg)


def _check_conversion(classifier_path, alloc_path, tmp_path, detector_cfg):
    """tools/convert_scalenet_to_d2.py turns the trained classifier into weights that load strictly into the backbone."""
    from detectron2.modeling import build_model

    from scalenet_d2.checkpoint import ScaleNetCheckpointer

    out = tmp_path / "final_d2.pkl"
    assert _tool("convert_scalenet_to_d2").main([str(classifier_path), str(out), "--allocation", str(alloc_path)]) == 0
    cfg = detector_cfg("fpn", allocation=str(alloc_path))
    model = build_model(cfg)
    ScaleNetCheckpointer(model).load(str(out))
    trained = torch.load(classifier_path, map_location="cpu", weights_only=True)["model"]
    body = model.backbone.bottom_up
    assert torch.equal(body.stem.conv1.weight, trained["conv1.weight"])
    assert torch.equal(body.res5[0].conv3.weight, trained["layer4.0.conv3.weight"])
    key = next(k for k in trained if k.startswith("layer3.0.bn2.") and k.endswith("running_var"))
    branch = key.split(".")[3]
    assert torch.equal(body.res4[0].bn2[branch].running_var, trained[key])
