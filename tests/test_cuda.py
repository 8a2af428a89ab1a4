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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
def test_the_rewrites_equal_the_plain_forward_on_cuda(exact_cuda, dtype, training):
    body = _body().train(training)
    x = torch.randn(2, 3, 96, 128, device="cuda")
    reference = None
    results = {}
    for mode in ("off", "on"):
        set_fast_path(body, mode).zero_grad()
        with torch.set_grad_enabled(training), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            outputs = body(x)
        assert {o.dtype for o in outputs.values()} == {dtype}
        if training:
            weighted_sum(outputs).backward()
        results[mode] = ({k: v.float() for k, v in outputs.items()}, gradients(body) if training else {})
    if dtype != torch.float32:  # against float32: the rewrites no further from it than the plain forward
        set_fast_path(body, "off").zero_grad()
        with torch.set_grad_enabled(training):
            outputs = body(x)
        if training:
            weighted_sum(outputs).backward()
        reference = (outputs, gradients(body) if training else {})
    (plain, plain_grads), (fast, fast_grads) = results["off"], results["on"]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert all(relative_error(fast[k], plain[k]) <= tolerance for k in plain)
    if training:
        assert max(relative_error(fast_grads[k], plain_grads[k]) for k in plain_grads) <= tolerance
    if reference is not None:
        error = {
            name: max(relative_error(out[k], reference[0][k]) for k in out)
            for name, out in (("off", plain), ("on", fast))
        }
        assert error["on"] <= 1.5 * error["off"] + 1e-6, error


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
