"""The fast paths of ScaleNet: same results as the plain forward (float rounding apart), in eval
(norms folded, conv3 pushed through the concatenation, channels_last with oneDNN convs and their
fused ReLUs and adds on CPU) and in training (frozen norms folded, channels_last on CPU, under
autocast; BatchNorm of replicated branches at the pooled resolution); the memory-format
conversions; and the measuring helpers of tools/benchmark.py. Speed itself is measured by the
benchmark, not here."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import damp_norms
from reference_scalenet import ReferenceBlock
from torch.profiler import ProfilerActivity, profile

import scalenet_d2.modeling.fast_paths as fast_paths_module
from scalenet_d2.modeling.cpu_kernels import to_memory_format
from scalenet_d2.modeling.fast_paths import add_replicated_, added_replicated, nest_replicated, replicates
from scalenet_d2.modeling.resnet_twin import resnet_twin
from scalenet_d2.modeling.scalenet import SABottleneck, ScaleNet, set_fast_path
from scalenet_d2.utils.profiling import folded_resnet, peak_bytes, time_interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def random_norms(model, seed=0):
    """Damped scales (see damp_norms) with random shifts and statistics, so that folding a norm
    is not the identity."""
    damp_norms(model)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "running_var") and module.running_var is not None:
            for tensor, low, high in [
                (module.bias, -0.1, 0.1),
                (module.running_mean, -0.5, 0.5),
                (module.running_var, 0.5, 2),
            ]:
                with torch.no_grad():
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model


def relative_error(ours, expected):
    return ((ours - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("size,pooled", [(32, 16), (28, 4), (49, 7), (7, 1), (164, 41), (96, 32)])
def test_add_replicated_equals_adding_the_nearest_resize(size, pooled):
    out, z = torch.randn(2, 3, size, size), torch.randn(2, 3, pooled, pooled)
    assert replicates(z, out)
    expected = out + F.interpolate(z, size=[size, size], mode="nearest")
    torch.testing.assert_close(add_replicated_(out.clone(), z), expected, rtol=0, atol=0)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_to_memory_format_converts_exactly_and_its_gradient_comes_back_in_the_input_format(memory_format):
    other = torch.contiguous_format if memory_format == torch.channels_last else torch.channels_last
    x = torch.randn(3, 5, 70, 90).contiguous(memory_format=other).requires_grad_()
    y = to_memory_format(x, memory_format)
    assert y.is_contiguous(memory_format=memory_format) and not y.is_contiguous(memory_format=other)
    assert torch.equal(y, x)
    grad = torch.randn(3, 5, 70, 90).contiguous(memory_format=memory_format)
    y.backward(grad)
    assert x.grad.is_contiguous(memory_format=other) and torch.equal(x.grad, grad)
    with torch.no_grad():
        assert to_memory_format(y, memory_format) is y and torch.equal(to_memory_format(y, other), x)


def test_replicated_maps_nest_and_add_up_to_their_nearest_resizes():
    out = torch.randn(2, 4, 24, 36).contiguous(memory_format=torch.channels_last)
    parts = [torch.randn(2, 4, 12, 18), torch.randn(2, 4, 6, 9), torch.randn(2, 4, 8, 12), torch.randn(2, 4, 3, 3)]
    groups = nest_replicated([p.clone() for p in parts])
    # 6x9 and 3x3 go into 12x18 (their grids divide it); 8x12 does not divide 12x18: a group of its own
    assert [g.shape[-2:] for g in groups] == [(12, 18), (8, 12)]
    result = added_replicated(out, groups[0])
    assert result.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(result, out + F.interpolate(groups[0], size=[24, 36], mode="nearest"), rtol=0, atol=0)
    add_replicated_(result, groups[1])
    expected = out + sum(F.interpolate(p, size=[24, 36], mode="nearest") for p in parts)
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)


def test_a_nearest_resize_that_does_not_replicate_is_told_apart():
    # F.interpolate computes its source index in float32: from 2 to 82 rows, the second value
    # starts at row 41, not 40; such a branch takes the resize-and-concatenate route
    z, out = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 82, 82)
    assert not replicates(z, out)
    assert not replicates(torch.randn(1, 1, 5, 5), torch.randn(1, 1, 12, 12))  # not a multiple: bilinear
    assert replicates(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 8, 12))


@pytest.mark.parametrize("size", [(128, 160), (131, 197), (96, 1000), (33, 47), (5, 7)])
def test_the_fast_eval_path_equals_the_plain_forward(size):
    body = random_norms(ScaleNet("scalenet50")).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        fast, plain = set_fast_path(body, "on")(x), set_fast_path(body, "off")(x)
    for stage in plain:
        assert fast[stage].shape == plain[stage].shape and fast[stage].is_contiguous()
        assert relative_error(fast[stage], plain[stage]) <= 1e-4, f"{stage} at {size}"


def test_the_fast_eval_path_runs_onednn_convs_in_channels_last_on_cpu():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    body = ScaleNet("scalenet_tiny", fast_path="on").eval()  # "auto" runs so small an input plain
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as fast:
        body(torch.randn(1, 3, 96, 128))
    ops = {event.key: event.count for event in fast.key_averages()}
    convs = sum(1 for m in body.modules() if isinstance(m, torch.nn.Conv2d))
    onednn = ("aten::mkldnn_convolution", "mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_")
    assert sum(ops.get(op, 0) for op in onednn) >= convs - 4  # pushed-through conv3 slices add convs
    assert "aten::_slow_conv2d_forward" not in ops and "aten::thnn_conv2d" not in ops
    # without autograd, the ReLUs and the residual adds run inside the convs (no branch is bilinear here)
    assert not {"aten::relu_", "aten::relu", "aten::clamp_min_"} & set(ops)
    assert ops["mkldnn::_convolution_pointwise_"] == len(body.stages)  # conv3 adds into the shortcut conv's output
    # the outputs come in the input's memory format, with the same values
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        nchw, last = body(x), body(x.contiguous(memory_format=torch.channels_last))
    assert all(nchw[k].is_contiguous() and last[k].is_contiguous(memory_format=torch.channels_last) for k in nchw)
    assert all(torch.equal(nchw[k], last[k]) for k in nchw)
    # conv3 reads only the branches that stay at full resolution: it has fewer input channels
    # than the block's concatenation wherever a pooled branch replicates
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as plain:
        set_fast_path(body, "off")(torch.randn(1, 3, 96, 128))
    assert {event.key for event in plain.key_averages()} >= {"aten::cat", "aten::upsample_nearest2d"}


def test_frozen_norms_fold_in_training_with_the_gradients_of_the_plain_forward():
    # float64: the two computations then agree to ~1e-12, so a wrong gradient cannot hide in rounding
    body = random_norms(ScaleNet("scalenet50", norm="FrozenBN", freeze_at=0)).double().train()
    x = torch.randn(2, 3, 131, 197, dtype=torch.float64)
    results = []
    for fold in (False, True):
        set_fast_path(body, "on" if fold else "off").zero_grad()
        outputs = body(x)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs.values()).backward()
        results.append((outputs, {n: p.grad.clone() for n, p in body.named_parameters()}))
    (plain, plain_grads), (folded, folded_grads) = results
    assert all(relative_error(folded[k], plain[k]) <= 1e-10 for k in plain)
    assert plain_grads.keys() == folded_grads.keys() and len(plain_grads) > 90
    assert max(relative_error(folded_grads[k], plain_grads[k]) for k in plain_grads) <= 1e-10


def test_frozen_norms_train_in_channels_last_on_cpu_with_the_gradients_of_the_plain_forward():
    # float32, where the CPU path runs channels_last with oneDNN convs, forward and backward; a
    # small body, whose rounding stays small (in a deep random one, float32 max-pool near-ties
    # move gradients by ~1e-4 in the plain forward too; a seed, so that none lands on one here)
    torch.manual_seed(0)
    body = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0)).train()
    x = torch.randn(2, 3, 96, 128, requires_grad=True)
    results = []
    for fold in (False, True):
        set_fast_path(body, "on" if fold else "off").zero_grad()
        x.grad = None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outputs = body(x)
            sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs.values()).backward()
        grads = {n: p.grad.clone() for n, p in body.named_parameters()}
        results.append((outputs, grads, x.grad.clone(), {event.key for event in prof.key_averages()}))
    (plain, plain_grads, plain_x, _), (fast, fast_grads, fast_x, ops) = results
    # the body runs channels_last, its outputs come in the input's format (NCHW), as in eval
    assert all(fast[k].is_contiguous() and not fast[k].is_contiguous(memory_format=torch.channels_last) for k in plain)
    assert all(relative_error(fast[k], plain[k]) <= 1e-5 for k in plain)
    assert len(plain_grads) == 29 and max(relative_error(fast_grads[k], plain_grads[k]) for k in plain_grads) <= 1e-5
    assert fast_x.is_contiguous() and relative_error(fast_x, plain_x) <= 1e-5
    if torch.backends.mkldnn.is_available():
        assert {"aten::mkldnn_convolution", "mkldnn::_convolution_pointwise"} & ops and "_ToFormatBackward" in ops
        assert not {"aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::thnn_conv2d"} & ops


def test_folded_training_under_autocast_runs_in_its_dtype_and_is_as_close_to_float32_as_the_plain_forward():
    # the folded convs keep the conv's own weight for the backward and recompute the fold there:
    # under autocast it must run in the conv's dtype and hand back float32 gradients
    torch.manual_seed(0)
    body = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0)).train()
    x = torch.randn(2, 3, 96, 128)
    grads = {}
    for name, fold, autocast in [("float32", False, False), ("plain", False, True), ("folded", True, True)]:
        set_fast_path(body, "on" if fold else "off").zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = body(x)
        assert {o.dtype for o in outputs.values()} == {torch.bfloat16 if autocast else torch.float32}
        sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outputs.values()).backward()
        grads[name] = {n: p.grad.clone() for n, p in body.named_parameters()}
    assert {g.dtype for g in grads["folded"].values()} == {torch.float32}
    error = {name: max(relative_error(g[k], grads["float32"][k]) for k in g) for name, g in grads.items()}
    assert 0 < error["folded"] <= error["plain"], error


@pytest.mark.parametrize("size", [(32, 48), (28, 56), (7, 9), (33, 47)])
def test_batch_norm_of_replicated_branches_runs_pooled_with_the_same_statistics(size, monkeypatch):
    # against the independent reference block: outputs, gradients, running statistics after 2 steps
    pooled_calls = []
    original = fast_paths_module.batch_norm_of_replicated
    monkeypatch.setattr(
        fast_paths_module, "batch_norm_of_replicated", lambda *a: pooled_calls.append(1) or original(*a)
    )
    torch.manual_seed(0)
    reference = ReferenceBlock(32, 16, (6, 5, 4, 3), 56, False, True).train()
    block = SABottleneck(32, 64, bottleneck_channels=16, widths=(6, 5, 4, 3), side=56, shortcut_conv=True, norm="BN")
    block.load_state_dict(reference.state_dict())
    block.train()
    x, weights = torch.randn(2, 32, *size), torch.randn(2, 64, *size)
    results = []
    for model in (reference, block):
        outputs = [model(x) for _ in range(2)]
        (outputs[-1] * weights).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        statistics = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        results.append((outputs[-1], grads, statistics))
    (expected, expected_grads, expected_stats), (ours, grads, stats) = results
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert max(relative_error(grads[k], expected_grads[k]) for k in expected_grads) <= 1e-5
    assert stats.keys() == expected_stats.keys()
    for key in expected_stats:
        torch.testing.assert_close(stats[key], expected_stats[key], rtol=1e-5, atol=1e-6, msg=key)
    # pooled branches that replicate, times 2 forwards: at 32x48 all three (16x24, 8x12, 4x6); at
    # 28x56 all three; at 7x9 only the 1x1 of scale 7; at 33x47 none (all bilinear)
    assert len(pooled_calls) == {(32, 48): 6, (28, 56): 6, (7, 9): 2, (33, 47): 0}[size]


def test_folded_resnet_is_the_resnet_up_to_rounding():
    body = random_norms(resnet_twin("scalenet_tiny", "FrozenBN", ["res2", "res3", "res4", "res5"], 0, False, 3)).eval()
    folded = folded_resnet(body).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected, ours = body(x), folded(x.contiguous(memory_format=torch.channels_last))
    assert all(relative_error(ours[k], expected[k]) <= 1e-4 for k in expected)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in folded.modules())
    with_batch_statistics = resnet_twin("scalenet_tiny", "BN", ["res5"], 0, False, 3)
    with_batch_statistics.res5[0].conv1.norm.track_running_stats = False  # normalises by each batch, even in eval
    with pytest.raises(ValueError, match="has no frozen statistics"):
        folded_resnet(with_batch_statistics)


def test_peak_bytes_and_interleaved_timing():
    def allocate_two_at_once():
        a = torch.ones(10_000_000)
        b = a * 2
        del a, b

    peak = peak_bytes(allocate_two_at_once, CPU, held=1000)
    if peak is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 0.95 * 2 * 40e6 <= peak - 1000 <= 2 * 40e6 + 30e6  # resident pages: to a page
    calls = []
    seconds = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], 3, CPU)
    assert calls == ["a", "b"] * 4 and [len(s) for s in seconds] == [3, 3]  # a warm-up, then 3 rounds


def test_benchmark_speed_and_training_rows(tmp_path):
    configs = [
        os.path.join(ROOT, "configs/Synthetic", f) for f in ("faster_rcnn_Rtiny_FPN.yaml", "faster_rcnn_Stiny_FPN.yaml")
    ]
    report = tmp_path / "report.json"
    args = ["--sizes", "64x64", "--speed", "96x128", "--train-speed", "96x128", "--rounds", "2", "--threads", "1"]
    args += ["--batch", "2", "--json", str(report), "--peak-sites"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools/benchmark.py"), *configs, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    inference = lines.index(next(line for line in lines if line.startswith("Backbone inference")))
    training = lines.index(next(line for line in lines if line.startswith("Detector training step")))
    table_rows = [line for line in lines if "faster_rcnn_" in line and "at the peak" not in line]
    rows = [line.split() for line in lines[inference:training] if line in table_rows]
    assert [row[1] for row in rows] == ["shipped", "fair", "shipped", "fair", "on", "plain"]
    assert rows[0][4] == rows[1][4] == "1.000" and rows[0][5] == "1.000"  # the twin against itself
    train_rows = [line.split() for line in lines[training:] if line in table_rows]
    assert [row[1] for row in train_rows] == ["shipped", "fair", "shipped", "fair", "on", "plain"]
    assert all(float(row[2]) > 0 and float(row[6]) > 0 for row in rows + train_rows)
    rows_in_report = json.loads(report.read_text())["rows"]
    assert [r["run"] for r in rows_in_report] == [row[1] for row in rows + train_rows]
    assert all(len(r["seconds"]) == 2 for r in rows_in_report)
    # ScaleNet's on and plain rows compare with the twin's shipped run (ResNet has no other forward)
    assert "nan" not in result.stdout
    for table in (rows, train_rows):
        twin_shipped = float(table[0][2])
        for row in table[4:]:
            ratio = float(row[2]) / twin_shipped
            assert abs(float(row[4]) - ratio) <= 0.03 * ratio + 2e-3, row
    # --peak-sites: where each run's tensor peak is, for the 6 eval and the 6 training runs
    assert result.stdout.count("MiB of tensors made in the call at the peak, at ") == 12
    # the CPU's instruction sets, which decide oneDNN's kernels and so the ratios
    assert re.search(
        r"AVX2 (yes|no), AVX-512 (yes|no), AVX-512 BF16 (yes|no), AMX (yes|no); torch CPU kernels: ", result.stdout
    )


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python in tools/gpu_check.sh: CUDA "available", the tests fail, one table crashes
echo "ran: $*" >> "$CALLS"
case "$*" in
  -c*) echo "torch settings" ;;
  "-m pytest"*) echo "1 failed"; exit 1 ;;
  *"--batch 1 --amp"*) echo "Traceback: out of memory" >&2; exit 1 ;;
  *) echo "| a table |" ;;
esac
"""


def test_gpu_check_records_a_failing_step_and_runs_the_rest(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PY=str(fake), CALLS=str(tmp_path / "calls.txt"))
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "tools/gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "these steps failed: CUDA tests,eval batch 1 --amp" in result.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert sum("tools/benchmark.py" in call for call in calls) == 8  # every table after the failures ran
    report = (tmp_path / "output/gpu_check/report.md").read_text()
    assert report.count("| a table |") == 7 and "FAILED: eval batch 1 --amp" in report


def test_tensor_peak_sites_counts_new_storages_until_they_are_freed():
    from scalenet_d2.utils.profiling import tensor_peak_sites

    mib = 2**20

    def run():
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # 1 MiB more
        del a
        b.view(-1).add_(1)  # a view and an in-place op: nothing new
        return torch.ones(1024, 512)  # 2 MiB: with b, the peak

    peak, op, alive = tensor_peak_sites(run)
    assert peak == 3 * mib
    assert [size for size, _ in alive] == [2 * mib, mib]
    assert "(1024, 512)" in alive[0][1] and "(1024, 256)" in alive[1][1]
