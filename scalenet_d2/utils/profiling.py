"""What a run or a benchmark reports about the model and the machine: backbone params and
FLOPs (fvcore), peak memory, and a one-line description of the machine."""

import ctypes
import os
import platform
import resource
import socket
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "machine_description",
    "cpu_instruction_sets",
    "peak_memory",
    "backbone_stats",
    "folded_resnet",
    "time_interleaved",
    "eval_seconds",
    "peak_bytes",
    "tensor_peak_bytes",
    "tensor_peak_sites",
    "synthetic_detection_batch",
    "training_step",
    "held_bytes",
    "damp_norms",
    "FLOPS_NOTE",
]

FLOPS_NOTE = "fvcore FlopCountAnalysis of the bottom-up backbone (no FPN), batch 1; 1 fused multiply-add = 1 flop"


# /proc/cpuinfo flags that decide which oneDNN kernels run (and so CPU speed ratios)
_ISA_FLAGS = (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx_tile"))


def cpu_instruction_sets() -> str:
    """The instruction sets oneDNN's kernels depend on, present or not, e.g. "AVX2 yes, AVX-512 no,
    AVX-512 BF16 no, AMX no; torch CPU kernels: AVX2" (flags from /proc/cpuinfo, where Linux has it)."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return f"instruction sets unknown; torch CPU kernels: {capability}"
    found = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in _ISA_FLAGS)
    return f"{found}; torch CPU kernels: {capability}"


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = (
        f"CPU: {cpu} ({cpu_instruction_sets()}), {os.cpu_count()} logical cores "
        f"(torch threads: {torch.get_num_threads()})"
    )
    if torch.cuda.is_available():
        desc = f"GPU: {torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}; {desc}"
    return f"{desc}; host {socket.gethostname()}"


def peak_memory():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU: torch.cuda.max_memory_allocated, rank 0"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "CPU: max RSS of the rank-0 process"


class _Outputs(nn.Module):
    """Backbones return a dict; fvcore traces tensors or tuples more reliably."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return tuple(self.body(x).values())


def backbone_stats(model, sizes):
    """Params and fvcore FLOPs (one fused multiply-add = one flop) of the bottom-up network.

    The bottom-up network (ScaleNet or ResNet, without FPN) is the part that differs between
    twins; FLOPs are reported for each (H, W) in ``sizes`` with batch size 1.
    """
    from fvcore.nn import FlopCountAnalysis

    from ..modeling.scalenet import plain_forward

    model = getattr(model, "module", model)  # DDP
    body = getattr(model.backbone, "bottom_up", model.backbone)
    stats = {"backbone_params": sum(p.numel() for p in body.parameters()), "backbone_flops": {}}
    was_training = body.training
    body.eval()
    try:
        device = next(body.parameters()).device
        for h, w in sizes:
            with torch.no_grad(), plain_forward(body):  # the paper's count: norms included
                fca = FlopCountAnalysis(_Outputs(body), torch.zeros(1, 3, h, w, device=device))
                fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
                stats["backbone_flops"][f"{h}x{w}"] = float(fca.total())
    finally:
        body.train(was_training)
    return stats


class _FoldedConv(nn.Module):
    """A detectron2 Conv2d with its frozen norm folded in, run by ScaleNet's conv (`scalenet.conv2d`)."""

    def __init__(self, conv):
        from ..modeling.fast_paths import fold_norm, frozen_statistics

        super().__init__()
        if (
            conv.groups != 1
            or conv.dilation != (1, 1)
            or conv.stride[0] != conv.stride[1]
            or conv.padding[0] != conv.padding[1]
            or conv.activation is not None
        ):
            raise ValueError(
                f"folded_resnet: a conv with groups/dilation/anisotropic stride or padding/activation: {conv}"
            )
        if conv.norm is not None and not frozen_statistics(conv.norm):
            raise ValueError(f"folded_resnet: {conv.norm} has no frozen statistics (FrozenBN or eval-mode BN)")
        weight, bias = fold_norm(conv, conv.norm) if conv.norm is not None else (conv.weight, conv.bias)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.stride, self.padding = conv.stride[0], conv.padding[0]

    def forward(self, x, relu=False, add=None, into_add=False):
        from ..modeling.cpu_kernels import conv2d

        return conv2d(x, self.weight, self.bias, self.stride, self.padding, relu, add, into_add)


class _FoldedStem(nn.Module):
    """detectron2's BasicStem, folded, its ReLU inside the conv."""

    def __init__(self, stem):
        super().__init__()
        self.conv1 = _FoldedConv(stem.conv1)

    def forward(self, x):
        return F.max_pool2d(self.conv1(x, relu=True), kernel_size=3, stride=2, padding=1)


class _FoldedBottleneck(nn.Module):
    """detectron2's BottleneckBlock, folded, with ScaleNet's fast path's fusions: the ReLUs and
    the residual add inside the convs (into the shortcut conv's fresh output where there is one)."""

    def __init__(self, block):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (_FoldedConv(c) for c in (block.conv1, block.conv2, block.conv3))
        self.shortcut = None if block.shortcut is None else _FoldedConv(block.shortcut)

    def forward(self, x):
        out = self.conv2(self.conv1(x, relu=True), relu=True)
        if self.shortcut is None:
            return self.conv3(out, relu=True, add=x)
        return self.conv3(out, relu=True, add=self.shortcut(x), into_add=True)


def folded_resnet(body: nn.Module) -> nn.Module:
    """A copy of a detectron2 ResNet (bottleneck blocks) for inference with the execution settings
    of ScaleNet's fast eval path: each frozen norm folded into its conv, and on CPU, for
    channels_last inputs, oneDNN's conv kernel with the ReLUs and residual adds fused into the
    convs (`scalenet.conv2d`). The "fair" reference of tools/benchmark.py."""
    import copy

    from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock

    folded = copy.deepcopy(body).eval()
    if not isinstance(folded.stem, BasicStem):
        raise ValueError(f"folded_resnet: expected detectron2's BasicStem, got {type(folded.stem).__name__}")
    folded.stem = _FoldedStem(folded.stem)
    for stage in folded.stages:
        for index, block in enumerate(stage):
            if not isinstance(block, BottleneckBlock):
                raise ValueError(f"folded_resnet: expected detectron2's BottleneckBlock, got {type(block).__name__}")
            stage[index] = _FoldedBottleneck(block)
    return folded


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(runs, rounds, device):
    """Seconds of each of `runs` (callables), `rounds` times each after one warm-up call, in
    interleaved rounds within one process, so that a change of load on the machine affects all
    alike; on CUDA timed by CUDA events. Returns one list of seconds per run."""
    for run in runs:  # warm-up: allocator, oneDNN / cuDNN kernel choice, lazy state
        run()
    seconds = [[] for _ in runs]
    for _ in range(rounds):
        for run, times in zip(runs, seconds):
            _synchronize(device)
            if device.type == "cuda":  # the GPU's own clock: what the kernels took, launches included
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
                continue
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return seconds


def eval_seconds(modules, sizes, rounds, batch=1):
    """{(H, W): [median seconds per module]} of each module's eval forward without autograd on
    `batch` random images of each size, the modules timed in interleaved rounds (time_interleaved)."""
    found = {}
    for height, width in sizes:
        calls = []
        for module in modules:
            device = next(module.parameters()).device
            x = torch.randn(batch, 3, height, width, device=device)
            calls.append(lambda module=module, x=x: module(x))
        with torch.no_grad():
            seconds = time_interleaved(calls, rounds, device)
        found[(height, width)] = [statistics.median(t) for t in seconds]
    return found


def _resident_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_bytes(run, device, held=0):
    """Peak memory of one call of `run`: `held` (the bytes of what it keeps between calls, e.g.
    weights, gradients and optimizer state) plus the most it takes on top during the call.
    GPU: torch.cuda.max_memory_allocated over what was allocated before. CPU (Linux): the peak
    resident set over the one before, freed memory first handed back to the system (malloc_trim)
    and the peak reset (/proc/self/clear_refs); None where that is not available."""
    if device.type == "cuda":
        _synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        _synchronize(device)
        return held + torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        before = _resident_bytes("VmRSS")
    except OSError:
        return None
    run()
    return held + _resident_bytes("VmHWM") - before


def tensor_peak_bytes(run, device, held=0):
    """Peak tensor memory of one call of `run`: `held` plus the most bytes of tensors allocated
    during the call and alive at once (what torch.cuda.max_memory_allocated measures on a GPU, where
    this is peak_bytes). CPU: from the allocations the profiler records; unlike the resident set,
    it leaves out what the C allocator keeps back. None where this torch's profiler does not say."""
    if device.type == "cuda":
        return peak_bytes(run, device, held)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        changes = [(e.start_ns(), e.nbytes()) for e in sorted(events, key=lambda e: e.start_ns())]
    except AttributeError:
        return None
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return held + peak


def tensor_peak_sites(run, top=8):
    """Where one call of `run` reaches its tensor peak: (peak bytes, the op at the peak with its call
    site, [(bytes, what) of the largest tensors alive then]). Every new storage an op makes during
    the call is counted until it is freed, with the op, its shape and the innermost call sites in
    scalenet_d2 and detectron2; views and in-place results (which share an input's storage) are not new."""
    import traceback
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    def site():
        frames = [
            f
            for f in traceback.extract_stack()
            if f.filename != __file__
            and any(f"{os.sep}{p}{os.sep}" in f.filename for p in ("scalenet_d2", "detectron2"))
        ]
        return " < ".join(f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}" for f in frames[::-1][:3])

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.current, self.peak, self.at_peak = {}, 0, 0, None

        def _free(self, key):
            self.current -= self.live.pop(key, (0, None))[0]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)
            }
            for t in torch.utils._pytree.tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in inputs or key in self.live or storage.nbytes() == 0:
                    continue
                where = site()
                self.live[key] = (storage.nbytes(), f"{func} {tuple(t.shape)} @ {where}")
                weakref.finalize(storage, self._free, key)
                self.current += storage.nbytes()
                if self.current > self.peak:
                    self.peak = self.current
                    self.at_peak = (f"{func} @ {where}", sorted(self.live.values(), reverse=True)[:top])
            return out

    with Recorder() as recorder:
        run()
    return recorder.peak, recorder.at_peak[0], recorder.at_peak[1]


def synthetic_detection_batch(batch_size, height, width, num_classes, seed=0):
    """detectron2 training inputs (image, instances) of fixed size and content: random pixels and
    4 random boxes per image, the same for every model given the same seed."""
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        corners = torch.rand(4, 2, 2, generator=generator) * torch.tensor([width, height])
        boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values + 16], dim=1)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, num_classes, (4,), generator=generator)
        batch.append({"image": image, "height": height, "width": width, "instances": instances})
    return batch


def autocast(device, enabled):
    """torch.autocast as SOLVER.AMP runs it: float16 on CUDA (bfloat16 on CPU, which has no fast float16)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def training_step(model, optimizer, batch, amp=False):
    """One detectron2 training step as SimpleTrainer (amp: AMPTrainer) runs it: losses, backward,
    optimizer step. Returns a callable, for time_interleaved and peak_bytes."""

    from detectron2.utils.events import EventStorage

    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step():
        with EventStorage(0), autocast(device, amp):  # the losses log to the storage
            losses = model(batch)
        optimizer.zero_grad(set_to_none=False)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def held_bytes(model, optimizer):
    """Bytes of the parameters, their gradients and the optimizer's state tensors."""
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def damp_norms(model):
    """Norm scales of 0.2 instead of 1 in an untrained model: with FrozenBN and no ImageNet
    weights the features of a deep body otherwise grow through every residual add (S101
    diverges at once) and every box scores as background."""
    from detectron2.layers import FrozenBatchNorm2d

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
                module.weight.fill_(0.2)
    return model
