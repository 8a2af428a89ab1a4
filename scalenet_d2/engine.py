"""The parts of train_net.py that a detectron2 project would otherwise copy: start-up checks,
the trainer (ScaleNetCheckpointer, COCO evaluation that works without compiled ops), the
run records that tools/compare.py reads, and launching on machines with or without CUDA.
"""
import contextlib
import json
import logging
import os
import platform
import resource
import socket
import statistics
import time
import weakref
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import detectron2
import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_setup, launch

from .allocation import BUNDLED_ALLOCATIONS
from .checkpoint import ScaleNetCheckpointer
from .config import add_scalenet_config
from .data import check_datasets  # importing it registers the synthetic splits
from .evaluation import build_coco_evaluator

REPO_ROOT = str(Path(__file__).resolve().parents[1])
PRETRAINED_ENV = "SCALENET_D2_PRETRAINED"
logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A problem found before any work starts (missing weights or dataset files)."""


# ----------------------------------------------------------------------------- config


def resolve_weights(cfg, config_file, eval_only=False):
    """Turns a relative local MODEL.WEIGHTS into an existing path, or fails saying how to make it.

    Looked up in order: $SCALENET_D2_PRETRAINED/<name> for "pretrained/<name>", then the
    current directory, then the repository root. URLs (http://, detectron2://, ...) and ""
    (train from scratch) are left to detectron2.
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights or "://" in weights:
        return
    candidates = []
    if os.path.isabs(weights):
        candidates.append(weights)
    else:
        env_dir = os.environ.get(PRETRAINED_ENV)
        if env_dir and weights.startswith("pretrained/"):
            candidates.append(os.path.join(env_dir, weights[len("pretrained/"):]))
        candidates += [os.path.abspath(weights), os.path.join(REPO_ROOT, weights)]
    for path in candidates:
        if os.path.isfile(path):
            cfg.MODEL.WEIGHTS = path
            return
    name = os.path.basename(weights)
    looked = ", ".join(dict.fromkeys(candidates))
    if eval_only:
        raise StartupError(
            f"MODEL.WEIGHTS '{weights}' is not a file; looked for: {looked}. --eval-only needs a "
            f"trained detection checkpoint, e.g. OUTPUT_DIR/model_final.pth of a training run."
        )
    if "scalenet" in cfg.MODEL.BACKBONE.NAME:
        how = (
            f"convert the published ImageNet ScaleNet checkpoint with\n"
            f"    python tools/convert_scalenet_to_d2.py <published {os.path.splitext(name)[0]} .pth> pretrained/{name}"
        )
    else:
        how = (
            "convert torchvision's ImageNet ResNet (RGB input, same normalisation as the ScaleNet\n"
            "weights) with detectron2's tools/convert-torchvision-to-d2.py:\n"
            f"    python convert-torchvision-to-d2.py <torchvision resnet .pth> pretrained/{name}"
        )
    raise StartupError(
        f"MODEL.WEIGHTS '{weights}' (set by {config_file}) is not a file; looked for: "
        f"{looked}.\nThese are ImageNet weights converted for detectron2: {how}\n"
        f"(README, 'Converting ImageNet checkpoints'). Or set {PRETRAINED_ENV}=DIR when they are in DIR/, pass "
        f"MODEL.WEIGHTS /path/to/file, or MODEL.WEIGHTS \"\" to train from scratch."
    )


def resolve_allocation(cfg):
    """A relative MODEL.SCALENET.ALLOCATION file is looked up in the current directory, then the repo."""
    alloc = cfg.MODEL.SCALENET.ALLOCATION
    uses_allocation = any(k in cfg.MODEL.BACKBONE.NAME for k in ("scalenet", "resnet_twin"))
    if not uses_allocation or alloc in BUNDLED_ALLOCATIONS or os.path.isabs(alloc):
        return
    candidates = [os.path.abspath(alloc), os.path.join(REPO_ROOT, alloc)]
    for path in candidates:
        if os.path.isfile(path):
            cfg.MODEL.SCALENET.ALLOCATION = path
            return
    raise StartupError(
        f"MODEL.SCALENET.ALLOCATION '{alloc}' is neither a bundled allocation "
        f"({', '.join(BUNDLED_ALLOCATIONS)}) nor a file; looked for: {', '.join(dict.fromkeys(candidates))}"
    )


def build_config(args, announce=False):
    cfg = get_cfg()
    add_scalenet_config(cfg)  # before merging, so MODEL.SCALENET.* keys are known
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # Same configs on GPU clusters and on a laptop: fall back to the CPU, and say so.
        if announce:
            print(f"train_net.py: no CUDA device here, running on CPU (MODEL.DEVICE was {cfg.MODEL.DEVICE})")
        cfg.MODEL.DEVICE = "cpu"
    resolve_allocation(cfg)
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not resuming:  # a resumed run loads last_checkpoint, never MODEL.WEIGHTS
        resolve_weights(cfg, args.config_file, args.eval_only)
    cfg.freeze()
    return cfg


def check_inputs(cfg, args):
    """Fails at start naming the missing path, instead of deep inside data loading."""
    names = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    try:
        check_datasets(names)
    except (FileNotFoundError, KeyError) as e:
        raise StartupError(e.args[0] if e.args else str(e)) from None


def setup(args):
    cfg = build_config(args)
    default_setup(cfg, args)
    check_inputs(cfg, args)
    return cfg


# ----------------------------------------------------------------------------- trainer


class _TimedModel(nn.Module):
    """Wraps a model to time its forward passes during evaluation (pure compute, no loading)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seconds, self.images = [], []

    def forward(self, inputs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = self.model(inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)
        self.images.append(len(inputs))
        return outputs

    def seconds_per_image(self):
        # Skip warm-up iterations as detectron2's inference_on_dataset does (first 5).
        skip = min(5, len(self.seconds) - 1)
        n = sum(self.images[skip:])
        return (sum(self.seconds[skip:]) / n if n else None), n


class Trainer(DefaultTrainer):
    last_results = None
    last_inference = (None, 0)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_coco_evaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        # Same files and resume logic as detectron2's DetectionCheckpointer, but a checkpoint
        # that does not fit the model fails naming the key and both shapes.
        self.checkpointer = ScaleNetCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        timed = _TimedModel(model)
        results = super().test(cfg, timed, evaluators)
        cls.last_results, cls.last_inference = results, timed.seconds_per_image()
        return results


# ----------------------------------------------------------------------------- run records


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

    model = getattr(model, "module", model)  # DDP
    body = getattr(model.backbone, "bottom_up", model.backbone)
    stats = {"backbone_params": sum(p.numel() for p in body.parameters()), "backbone_flops": {}}
    was_training = body.training
    body.eval()
    try:
        device = next(body.parameters()).device
        for h, w in sizes:
            with torch.no_grad():
                fca = FlopCountAnalysis(_Outputs(body), torch.zeros(1, 3, h, w, device=device))
                fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
                stats["backbone_flops"][f"{h}x{w}"] = float(fca.total())
    finally:
        body.train(was_training)
    return stats


def train_seconds_per_iter(output_dir):
    """Median of detectron2's per-iteration 'time' in metrics.json (first logged window dropped)."""
    path = os.path.join(output_dir, "metrics.json")
    times = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    entry = json.loads(line)
                    if "time" in entry:
                        times.append(entry["time"])
    if len(times) > 1:
        times = times[1:]
    return (statistics.median(times) if times else None), len(times)


def write_run_files(cfg, args, model, results, training):
    """eval_results.json and run_info.json in OUTPUT_DIR (main process only)."""
    out = cfg.OUTPUT_DIR
    if results is not None:
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump({"datasets": list(cfg.DATASETS.TEST), "results": results}, f, indent=2)
    info_path = os.path.join(out, "run_info.json")
    info = {}
    if os.path.isfile(info_path):  # --eval-only into a training dir keeps the training fields
        with open(info_path) as f:
            info = json.load(f)
    mem, mem_kind = peak_memory()  # before the FLOP count below runs the backbone again
    size = cfg.INPUT.MIN_SIZE_TEST
    info.update(
        {
            "config_file": os.path.abspath(args.config_file),
            "opts": list(args.opts),
            "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "backbone_arch": backbone_arch(cfg),
            "machine": machine_description(),
            "torch": torch.__version__,
            "detectron2": detectron2.__version__,
            "flops_note": "fvcore FlopCountAnalysis of the bottom-up backbone (no FPN), batch 1; "
            "1 fused multiply-add = 1 flop",
        }
    )
    info.update(backbone_stats(model, [(224, 224), (size, size)]))
    sec, n = Trainer.last_inference
    info.update({"inference_s_per_image": sec, "inference_images_timed": n})
    if training:
        s_iter, windows = train_seconds_per_iter(out)
        info.update(
            {
                "train_s_per_iter": s_iter,
                "train_logged_windows": windows,
                "weights": cfg.MODEL.WEIGHTS,
                "num_processes": comm.get_world_size(),
                "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
                "max_iter": cfg.SOLVER.MAX_ITER,
                "train_peak_memory_mb": mem,
                "train_peak_memory_kind": mem_kind,
            }
        )
    else:
        # "weights" and "num_processes" stay those of the training run (its s/iter depends on them).
        info.update(
            {
                "eval_peak_memory_mb": mem,
                "eval_peak_memory_kind": mem_kind,
                "eval_weights": cfg.MODEL.WEIGHTS,
                "eval_num_processes": comm.get_world_size(),
            }
        )
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)


def backbone_arch(cfg):
    alloc = os.path.splitext(os.path.basename(cfg.MODEL.SCALENET.ALLOCATION))[0]
    if "scalenet" in cfg.MODEL.BACKBONE.NAME:
        return f"ScaleNet ({alloc})"
    if "resnet_twin" in cfg.MODEL.BACKBONE.NAME:
        return f"ResNet twin of {alloc}"
    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        r = cfg.MODEL.RESNETS
        return f"ResNet-{r.DEPTH} (stem {r.STEM_OUT_CHANNELS}, res2 {r.RES2_OUT_CHANNELS})"
    return cfg.MODEL.BACKBONE.NAME


# ----------------------------------------------------------------------------- launching


@contextlib.contextmanager
def _cpu_ddp():
    # detectron2's create_ddp_model passes device_ids=[local_rank], which DDP rejects for CPU
    # modules; None is the CPU form. Patched only inside CPU workers started below.
    import detectron2.engine.defaults as d2_defaults

    original = d2_defaults.create_ddp_model

    def create_cpu_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_cpu_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args):
    rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank, timeout=timedelta(minutes=30))
    if hasattr(comm, "create_local_process_group"):  # detectron2 after v0.6
        comm.create_local_process_group(num_per_machine)
    else:  # v0.6: the same groups, set the way its launch() does
        for i in range(world_size // num_per_machine):
            group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
    # No oversubscription, and never more threads than OMP_NUM_THREADS (or torch's default) gives.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // num_per_machine)))
    comm.synchronize()
    with _cpu_ddp():
        main_func(*args)


def launch_any(main_func, args):
    """detectron2's launch(); on a machine without CUDA, the same process layout over gloo.

    detectron2 v0.6's launch() requires CUDA and NCCL, so several CPU processes (useful to
    test distributed code paths without GPUs) are started here with torch's mp.spawn and
    the gloo backend, exactly one process per "GPU" as --num-gpus says.
    """
    world_size = args.num_gpus * args.num_machines
    if world_size <= 1 or torch.cuda.is_available():
        return launch(
            main_func,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    dist_url = args.dist_url
    if dist_url == "auto":
        assert args.num_machines == 1, "--dist-url auto works on one machine only"
        with socket.socket() as s:
            s.bind(("", 0))
            dist_url = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    mp.spawn(
        _cpu_worker,
        nprocs=args.num_gpus,
        args=(main_func, world_size, args.num_gpus, args.machine_rank, dist_url, (args,)),
        daemon=False,
    )
