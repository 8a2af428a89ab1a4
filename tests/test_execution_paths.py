"""Which forward runs where (fast_paths.block_route), and the control flow CUDA takes, run on CPU:
float64 eval and float32 channels_last training with oneDNN off, fp16/bf16 autocast with a
GradScaler, two-process gloo DDP, torch.compile, the custom operators under opcheck, and the
folded weights kept between calls. Each compares against the plain forward."""

import copy
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_fast_paths import random_norms, relative_error

import scalenet_d2.modeling.fast_paths as fast_paths
from scalenet_d2 import SABottleneck, ScaleNet, set_fast_path
from scalenet_d2.modeling.fast_paths import FOLDED, PLAIN, POOLED_BN, block_route


def weighted_sum(outputs):
    """A loss that weighs every value of an image's outputs differently (a wrong gradient cannot
    cancel out), the same for every image: the sum over a batch is the sum of its images'."""
    return sum(
        (o.float() * torch.linspace(-1, 1, o[0].numel(), device=o.device).view_as(o[0])).sum() for o in outputs.values()
    )


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def run(body, x, mode):
    """Outputs and parameter gradients of `body` on x with fast-path `mode`."""
    set_fast_path(body, mode).zero_grad()
    outputs = body(x)
    weighted_sum(outputs).backward()
    return outputs, gradients(body)


def test_auto_takes_the_rewrites_on_cpu_and_the_plain_forward_on_cuda():
    block = SABottleneck(32, 64, bottleneck_channels=16, widths=(6, 5, 4, 3), side=56, shortcut_conv=True, norm="BN")
    cpu, cuda = torch.empty(1, 32, 8, 8), SimpleNamespace(device=torch.device("cuda", 0))
    expected = {  # (mode, norms in training) -> (route on CPU, route on CUDA)
        ("auto", True): (POOLED_BN, PLAIN),
        ("auto", False): (FOLDED, PLAIN),
        ("on", True): (POOLED_BN, POOLED_BN),
        ("on", False): (FOLDED, FOLDED),
        ("off", True): (PLAIN, PLAIN),
        ("off", False): (PLAIN, PLAIN),
    }
    for (mode, training), routes in expected.items():
        block.fast_path = mode
        block.train(training)
        assert (block_route(block, cpu), block_route(block, cuda)) == routes, (mode, training)
    gn = SABottleneck(32, 64, bottleneck_channels=16, widths=(6, 5, 4, 3), side=56, shortcut_conv=True, norm="GN")
    gn.fast_path = "on"
    assert block_route(gn, cpu) == PLAIN
    with pytest.raises(ValueError, match="fast_path 'fast': expected one of 'auto', 'on', 'off'"):
        ScaleNet("scalenet_tiny", fast_path="fast")


def test_auto_runs_small_cpu_inputs_plain_and_large_ones_by_the_rewrites():
    body = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN")).eval()
    stem = body.stem.conv1.out_channels
    small = torch.randn(1, 3, 64, 96)
    large = torch.randn(1, 3, 512, fast_paths.AUTO_CPU_MIN_WORK // (stem * 512))  # just at the bound
    last = torch.channels_last
    with torch.no_grad():
        for x, route, other in ((small, "off", "on"), (large, "on", "off")):
            assert fast_paths.small_cpu_call(set_fast_path(body, "auto"), x) == (route == "off")
            auto = set_fast_path(body, "auto")(x)
            # small: the plain forward on channels_last maps (without autograd), outputs in NCHW
            same = set_fast_path(body, route)(x.contiguous(memory_format=last) if route == "off" else x)
            different = set_fast_path(body, other)(x)
            assert all(auto[k].is_contiguous() and torch.equal(auto[k], same[k]) for k in auto), route
            assert not all(torch.equal(auto[k], different[k]) for k in auto)  # the routes round differently
    # with autograd, small inputs take the plain forward in NCHW
    auto, plain = set_fast_path(body, "auto")(small), set_fast_path(body, "off")(small)
    assert all(torch.equal(auto[k], plain[k]) for k in auto)
    assert not fast_paths.small_cpu_call(set_fast_path(body, "on"), small)


def test_fast_path_config_key_reaches_every_block(detector_cfg):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = detector_cfg("fpn")
    assert cfg.MODEL.SCALENET.FAST_PATH == "auto"
    cfg.MODEL.SCALENET.FAST_PATH = "off"
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    modes = {m.fast_path for m in backbone.modules() if isinstance(m, (ScaleNet, SABottleneck))}
    assert modes == {"off"}
    cfg.MODEL.SCALENET.FAST_PATH = "yes"
    with pytest.raises(ValueError, match="MODEL.SCALENET.FAST_PATH 'yes': expected one of"):
        build_backbone(cfg, ShapeSpec(channels=3))


def test_the_cuda_route_in_float64_eval_equals_the_plain_forward():
    # float64 and oneDNN off: NCHW maps and F.conv2d, the control flow of "on" on CUDA
    body = random_norms(ScaleNet("scalenet50", fast_path="on")).double().eval()
    x = torch.randn(1, 3, 131, 197, dtype=torch.float64)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        assert fast_paths.body_forward(body, x) is None  # the CPU-only channels_last route stays out
        fast = set_fast_path(body, "on")(x)
        plain = set_fast_path(body, "off")(x)
    assert all(fast[k].is_contiguous() and relative_error(fast[k], plain[k]) <= 1e-10 for k in plain)


def test_channels_last_training_with_onednn_off_has_the_gradients_of_the_plain_forward():
    torch.manual_seed(0)
    body = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0)).train()
    x = torch.randn(2, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    with torch.backends.mkldnn.flags(enabled=False):
        plain, plain_grads = run(body, x, "off")
        fast, fast_grads = run(body, x, "on")
    assert all(fast[k].is_contiguous(memory_format=torch.channels_last) for k in fast)
    assert all(relative_error(fast[k], plain[k]) <= 1e-5 for k in plain)
    assert len(plain_grads) == 29 and max(relative_error(fast_grads[k], plain_grads[k]) for k in plain_grads) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_with_a_grad_scaler_skips_the_same_steps_with_gradients_as_close_as_the_plain_forward(dtype):
    torch.manual_seed(0)
    start = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0)).train()
    x = torch.randn(2, 3, 64, 96)
    reference = run(copy.deepcopy(start), x, "off")[1]  # float32
    for init_scale in (2.0**16, 2.0**4):  # float16 gradients overflow at the first, at no step at the second
        history, first_grads = {}, {}
        for mode in ("off", "on"):
            body = set_fast_path(copy.deepcopy(start), mode)
            optimizer = torch.optim.SGD(body.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
            scales = []
            for _ in range(3):
                optimizer.zero_grad()
                with torch.autocast("cpu", dtype=dtype):
                    outputs = body(x)
                assert {o.dtype for o in outputs.values()} == {dtype}
                scaler.scale(weighted_sum(outputs)).backward()
                scaler.unscale_(optimizer)
                if mode not in first_grads and all(torch.isfinite(p.grad).all() for p in body.parameters()):
                    first_grads[mode] = gradients(body)
                scaler.step(optimizer)
                scaler.update()
                scales.append(scaler.get_scale())
            history[mode] = scales
        assert history["on"] == history["off"], init_scale
        skipped = history["off"][0] < init_scale
        assert skipped == (dtype == torch.float16 and init_scale == 2.0**16), history
    error = {mode: max(relative_error(g[k], reference[k]) for k in reference) for mode, g in first_grads.items()}
    assert error["on"] <= 1.5 * error["off"] + 1e-6, error


def test_float16_weight_gradients_overflow_at_the_same_loss_scales_as_the_plain_forward():
    # the norms' scales are below 1 (damped): a gradient taken for the folded weight, then scaled,
    # overflows float16 a loss-scale step earlier than the conv weight's own, and in more convs
    torch.manual_seed(0)
    start = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0)).train()
    x = torch.randn(2, 3, 64, 96)
    overflowing = {}
    for mode in ("off", "on"):
        for exponent in range(6, 13):
            body = set_fast_path(copy.deepcopy(start), mode)
            with torch.autocast("cpu", dtype=torch.float16):
                outputs = body(x)
            (weighted_sum(outputs) * 2.0**exponent).backward()
            bad = {name for name, p in body.named_parameters() if not torch.isfinite(p.grad).all()}
            overflowing[mode, exponent] = bad
    assert not overflowing["off", 6] and overflowing["off", 12]  # the range crosses the edge
    assert all(overflowing["on", e] == overflowing["off", e] for e in range(6, 13)), overflowing


def test_batch_statistics_of_replicated_branches_are_float32_under_autocast():
    # std 1000: its variance (1e6) overflows float16, and n / (n - 1) is below float16's resolution
    norm = torch.nn.BatchNorm2d(3).train()
    pooled = (torch.randn(2, 3, 4, 6) * 1000).half()
    reference = torch.randn(2, 3, 16, 24)
    fast_paths.batch_norm_of_replicated(norm, pooled, reference)
    count = pooled.numel() // 3 * 16
    var = pooled.float().var(dim=(0, 2, 3), correction=0) * count / (count - 1)
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * var, rtol=1e-6, atol=0)
    assert norm.running_var.dtype == torch.float32


def test_a_block_whose_branches_all_replicate_keeps_the_dtype_of_autocast():
    # c1 = 0 and every pooled branch replicates at 28x28: conv3 is pushed through completely
    block = SABottleneck(64, 64, bottleneck_channels=16, widths=(0, 4, 4, 4), side=56, norm="FrozenBN")
    random_norms(block).eval()
    x = torch.randn(1, 64, 28, 28).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, fast = set_fast_path(block, "off")(x), set_fast_path(block, "on")(x)
    assert fast.dtype == plain.dtype == torch.bfloat16
    assert relative_error(fast.float(), plain.float()) <= 2e-2


def _ddp_worker(rank, path, x, state):
    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=2)
    try:
        body = ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0, fast_path="on").double()
        body.load_state_dict(state)
        model = torch.nn.parallel.DistributedDataParallel(body)
        outputs = model(x[rank * 2 : rank * 2 + 2])
        (weighted_sum(outputs) / 2).backward()
        if rank == 0:
            torch.save(gradients(body), path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_has_the_folded_gradients_of_one_process():
    torch.manual_seed(0)
    body = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0)).double()
    x = torch.randn(4, 3, 64, 96, dtype=torch.float64)
    # one process, the whole batch: the mean of the per-image losses (DDP averages the halves')
    set_fast_path(body, "off").zero_grad()
    (weighted_sum(body(x)) / 4).backward()
    expected = gradients(body)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "grads.pt")
        mp.spawn(_ddp_worker, args=(path, x, body.state_dict()), nprocs=2)
        folded = torch.load(path)
    assert folded.keys() == expected.keys() and len(expected) == 29
    assert max(relative_error(folded[k], expected[k]) for k in expected) <= 1e-10


def test_compiled_forwards_equal_the_plain_forward_in_training_and_eval():
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0, fast_path="on")).train()
    x = torch.randn(2, 3, 64, 96)
    plain, plain_grads = run(body, x, "off")
    set_fast_path(body, "on").zero_grad()
    compiled = torch.compile(body, backend="aot_eager", fullgraph=True)
    outputs = compiled(x)
    weighted_sum(outputs).backward()
    assert all(relative_error(outputs[k], plain[k]) <= 1e-5 for k in plain)
    assert max(relative_error(g, plain_grads[k]) for k, g in gradients(body).items()) <= 1e-5
    body.eval()
    with torch.no_grad():
        eager, graph = set_fast_path(body, "off")(x), torch.compile(body, backend="aot_eager", fullgraph=True)(x)
    assert all(relative_error(graph[k], eager[k]) <= 1e-5 for k in eager)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_one_compiled_graph_serves_every_input_size(mode):
    # detectron2's images vary in size: shape tests of the resizes would make a graph per size
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    body = random_norms(ScaleNet("scalenet_tiny", norm="FrozenBN", freeze_at=0, fast_path=mode))
    sizes = [(64, 96), (72, 100), (80, 116), (96, 128), (100, 150), (112, 84), (120, 160), (128, 136), (66, 70)]
    sizes.append((140, 98))
    for training in (True, False):
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(body.train(training), backend=counter, dynamic=True)
        for height, width in sizes:
            x = torch.randn(2, 3, height, width)
            with torch.set_grad_enabled(training):
                outputs = compiled(x)
                if training:
                    weighted_sum(outputs).backward()
                expected = set_fast_path(copy.deepcopy(body), "off")(x)
            assert all(relative_error(outputs[k], expected[k]) <= 1e-5 for k in expected), (height, width)
        graphs = [g for g in counter.graphs if any(node.op == "call_function" for node in g.graph.nodes)]
        assert len(graphs) <= 2, (mode, training, len(graphs))  # (dynamo also compiles a few empty frames)
        torch._dynamo.reset()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_export_operators_pass_opcheck(memory_format):
    x = torch.randn(2, 5, 9, 13).contiguous(memory_format=memory_format)
    weight, bias = torch.randn(4, 5, 3, 3), torch.randn(4)
    for factor in (2, 4, 7, 16):
        torch.library.opcheck(torch.ops.scalenet_d2.max_pool_clamped.default, (x, factor))
        torch.library.opcheck(torch.ops.scalenet_d2.pooled_branch.default, (x, weight, bias, factor, True))
        torch.library.opcheck(
            torch.ops.scalenet_d2.pooled_branch.default, (x, weight[..., :1, :1], None, factor, False)
        )
        # with gradients: the registered backward, itself an operator
        grad_inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        torch.library.opcheck(torch.ops.scalenet_d2.pooled_branch.default, (*grad_inputs, factor, True))
        torch.library.opcheck(
            torch.ops.scalenet_d2.pooled_branch.default, (grad_inputs[0], grad_inputs[1], None, factor, False)
        )


def test_every_write_to_weights_or_statistics_reaches_the_next_folded_forward():
    # Folded weights are computed at every call. Writes that torch's version counters miss (fused
    # optimizer steps, writes through .data) and BN's own statistics update must change the next output.
    torch.manual_seed(0)
    body = random_norms(ScaleNet("scalenet_tiny", norm="BN", freeze_at=0))
    x = torch.randn(2, 3, 64, 96)

    def check():
        body.eval()
        with torch.no_grad():
            fast, plain = set_fast_path(body, "on")(x), set_fast_path(body, "off")(x)
        assert all(relative_error(fast[k], plain[k]) <= 1e-5 for k in plain)
        return fast

    first = check()
    other = random_norms(ScaleNet("scalenet_tiny", norm="BN", freeze_at=0), seed=1)
    body.load_state_dict(other.state_dict())
    loaded = check()
    assert not torch.equal(loaded["res5"], first["res5"])
    optimizer = torch.optim.SGD(body.parameters(), lr=0.5, momentum=0.9, fused=True)
    for _ in range(2):  # two fused steps, which leave the parameters' versions unchanged
        body.train()
        optimizer.zero_grad()
        weighted_sum(set_fast_path(body, "on")(x)).backward()
        optimizer.step()
        stepped = check()
        assert not torch.equal(stepped["res5"], loaded["res5"])
        loaded = stepped
    body.train()  # BN's running statistics, updated by a training forward alone
    with torch.no_grad():
        body(x * 3 + 1)
    updated = check()
    assert not torch.equal(updated["res3"], stepped["res3"])
    body.res3[0].conv1.weight.data.mul_(3)  # a write through .data
    assert not torch.equal(check()["res3"], updated["res3"])


@pytest.mark.parametrize("size", [(12, 16), (11, 13), (5, 3)])  # nearest, bilinear, clamped to 1 pixel
def test_the_pooled_branch_operator_has_the_gradients_of_the_eager_branch(size):
    from scalenet_d2.modeling.layers import max_pool_clamped, resize_like

    torch.manual_seed(0)
    y = torch.randn(2, 5, *size, dtype=torch.float64)
    weight, bias = torch.randn(4, 5, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for scale, relu, with_bias in ((2, True, True), (4, False, False), (7, True, False)):
        inputs = [t.clone().requires_grad_() for t in (y, weight, bias)]
        b = inputs[2] if with_bias else None
        eager = resize_like(
            torch.nn.functional.conv2d(max_pool_clamped(inputs[0], scale), inputs[1], b, padding=1), y, relu
        )
        grad = torch.randn_like(eager)
        expected = torch.autograd.grad(eager, inputs[:2] + [b] * with_bias, grad)
        op = torch.ops.scalenet_d2.pooled_branch(inputs[0], inputs[1], b, scale, relu)
        assert torch.equal(op, eager)
        found = torch.autograd.grad(op, inputs[:2] + [b] * with_bias, grad)
        assert all(relative_error(f, e) <= 1e-12 for f, e in zip(found, expected)), (size, scale)
