"""The routes on CUDA (run where a GPU exists, skipped elsewhere; `make gpu-check` runs them):
outputs and gradients of the exact rewrites ("on") against the plain forward in float32 (TF32
off), float16 and bfloat16 autocast, in deterministic mode, and no host synchronisation in a
forward after warm-up."""

import copy

import pytest
import torch
from test_execution_paths import gradients, weighted_sum
from test_fast_paths import random_norms, relative_error

from scalenet_d2 import ScaleNet, set_fast_path

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def exact_cuda():
    """TF32 off and deterministic kernels, so that a difference is the route's, not the kernels'."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def _body(allocation="scalenet_tiny", norm="FrozenBN"):
    torch.manual_seed(0)
    return random_norms(ScaleNet(allocation, norm=norm, freeze_at=0)).cuda()


def route_results(body, x, mode, training, dtype):
    """Outputs (as float32) and gradients of `body` on x by route `mode`, under autocast to `dtype`
    (none for float32)."""
    set_fast_path(body, mode).zero_grad()
    with torch.set_grad_enabled(training), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        outputs = body(x)
    assert {o.dtype for o in outputs.values()} == {dtype}
    if training:
        weighted_sum(outputs).backward()
    return {k: v.float() for k, v in outputs.items()}, gradients(body) if training else {}


def low_precision_errors(body, dtype, training, seeds=(0, 1, 2), size=(96, 128)):
    """{route: summed relative error against the float32 plain forward over the input seeds}, for the
    outputs and, in training, the gradients: each route's own rounding, which a direct comparison of
    the two low-precision routes would double."""
    device = next(body.parameters()).device
    errors = {"off": 0.0, "on": 0.0}
    for seed in seeds:
        x = torch.randn(2, 3, *size, device=device, generator=torch.Generator(device).manual_seed(seed))
        reference, reference_grads = route_results(body, x, "off", training, torch.float32)
        for mode in errors:
            outputs, grads = route_results(body, x, mode, training, dtype)
            errors[mode] += max(relative_error(outputs[k], reference[k]) for k in reference)
            if training:
                errors[mode] += max(relative_error(grads[k], reference_grads[k]) for k in reference_grads)
    return errors


@pytest.mark.parametrize("training", [False, True])
def test_the_rewrites_equal_the_plain_forward_on_cuda_in_float32(exact_cuda, training):
    body = _body().train(training)
    x = torch.randn(2, 3, 96, 128, device="cuda")
    (plain, plain_grads), (fast, fast_grads) = (
        route_results(body, x, m, training, torch.float32) for m in ("off", "on")
    )
    assert all(relative_error(fast[k], plain[k]) <= 1e-5 for k in plain)
    if training:
        assert max(relative_error(fast_grads[k], plain_grads[k]) for k in plain_grads) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
def test_the_rewrites_are_as_close_to_float32_as_the_plain_forward_under_autocast(exact_cuda, dtype, training):
    errors = low_precision_errors(_body().train(training), dtype, training)
    assert errors["on"] <= 1.5 * errors["off"] + 1e-6, errors


def test_the_default_on_cuda_is_the_plain_forward():
    body = _body().eval()
    x = torch.randn(1, 3, 64, 96, device="cuda")
    with torch.no_grad():
        auto = body(x)
        plain = set_fast_path(copy.deepcopy(body), "off")(x)
    assert all(torch.equal(auto[k], plain[k]) for k in plain)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_no_host_synchronisation_after_warm_up(mode):
    body = set_fast_path(_body(), mode).eval()
    x = torch.randn(1, 3, 96, 128, device="cuda")
    with torch.no_grad():
        body(x)  # warm-up: kernel choice, the cached checks of which resizes replicate
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            body(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
