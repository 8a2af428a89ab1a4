"""What a run or a benchmark reports about the model and the machine: backbone params and
FLOPs (fvcore), peak memory, and a one-line description of the machine."""

import os
import platform
import resource
import socket

import torch
from torch import nn

__all__ = ["machine_description", "peak_memory", "backbone_stats", "FLOPS_NOTE"]

FLOPS_NOTE = "fvcore FlopCountAnalysis of the bottom-up backbone (no FPN), batch 1; 1 fused multiply-add = 1 flop"


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"CPU: {cpu}, {os.cpu_count()} logical cores (torch threads: {torch.get_num_threads()})"
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

    from .scalenet import plain_forward

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
