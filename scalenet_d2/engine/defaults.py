"""Start-up of train_net.py, as detectron2's defaults.py: the config (with resolved weights and
allocation), the checks of every input before any worker starts, the guard that a run never
writes over another's results (and one train_net.py per OUTPUT_DIR at a time), and `setup`. The trainer is in train_loop.py, its hooks in hooks.py.
"""

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..atomic import bytes_writer, write_atomically
from ..checkpoint.checkpointer import CONVERT_COMMAND
from ..checkpoint.sources import weights_source
from ..config import add_scalenet_config
from ..data import check_datasets  # importing it registers the synthetic splits
from ..modeling.allocation import BUNDLED_ALLOCATIONS, SEED_PREFIX
from ..neuron_allocation.detection import gamma_l1_config_problem
from .launch import launch_any

__all__ = [
    "PRETRAINED_ENV",
    "StartupError",
    "resolve_weights",
    "resolve_allocation",
    "build_config",
    "check_inputs",
    "check_output_dir",
    "OutputDirGuard",
    "OutputDirLock",
    "setup",
    "launch_any",
]

PRETRAINED_ENV = "SCALENET_D2_PRETRAINED"


class StartupError(RuntimeError):
    """A problem found before any work starts (missing weights or dataset files)."""


# ----------------------------------------------------------------------------- config


def resolve_weights(cfg, config_file, eval_only=False, required=True):
    """Turns a relative local MODEL.WEIGHTS into an existing path, or (`required`) fails saying how
    to make it.

    Looked up in order: $SCALENET_D2_PRETRAINED/<name> for "pretrained/<name>", then the
    current directory. URLs (http://, detectron2://, ...) and "" (train from scratch) are
    left to detectron2.
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights and eval_only:
        raise StartupError(
            '--eval-only with MODEL.WEIGHTS "" would evaluate an untrained model; pass MODEL.WEIGHTS '
            "<trained detection checkpoint>, e.g. OUTPUT_DIR/model_final.pth of a training run"
        )
    if not weights or "://" in weights:
        return
    candidates = []
    if os.path.isabs(weights):
        candidates.append(weights)
    else:
        env_dir = os.environ.get(PRETRAINED_ENV)
        if env_dir and weights.startswith("pretrained/"):
            candidates.append(os.path.join(env_dir, weights[len("pretrained/") :]))
        candidates.append(os.path.abspath(weights))
    for path in candidates:
        if os.path.isfile(path):
            cfg.MODEL.WEIGHTS = path
            return
    if not required:
        return
    name = os.path.basename(weights)
    looked = ", ".join(dict.fromkeys(candidates))
    if eval_only:
        raise StartupError(
            f"MODEL.WEIGHTS '{weights}' is not a file; looked for: {looked}. --eval-only needs a "
            f"trained detection checkpoint, e.g. OUTPUT_DIR/model_final.pth of a training run."
        )
    source = weights_source(name)
    if source is not None:
        how = f"{name} is {source.origin}; {source.published}. Convert it with\n    {source.convert_command()}"
    else:
        command = CONVERT_COMMAND.format(path="<checkpoint .pth>", stem=os.path.splitext(name)[0])
        how = f"convert an ImageNet checkpoint (ScaleNet, or a ResNet in torchvision's layout) with\n    {command}"
    raise StartupError(
        f"MODEL.WEIGHTS '{weights}' (set by {config_file}) is not a file; looked for: "
        f"{looked}.\nThese are ImageNet weights converted for detectron2: {how}\n"
        f"(docs/model.md, 'Getting ImageNet weights'). Or set {PRETRAINED_ENV}=DIR when they are in DIR/, pass "
        f'MODEL.WEIGHTS /path/to/file, or MODEL.WEIGHTS "" to train from scratch.'
    )


def resolve_allocation(cfg):
    """A MODEL.SCALENET.ALLOCATION file (relative: to the current directory) must exist."""
    alloc = cfg.MODEL.SCALENET.ALLOCATION
    uses_allocation = any(k in cfg.MODEL.BACKBONE.NAME for k in ("scalenet", "resnet_twin"))
    if not uses_allocation or alloc in BUNDLED_ALLOCATIONS or os.path.isabs(alloc) or alloc.startswith(SEED_PREFIX):
        return
    candidates = [os.path.abspath(alloc)]
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
    # A resumed run loads its checkpoint, never MODEL.WEIGHTS, so these need not exist then; where
    # they do, the path is resolved as for a fresh run, so that config.yaml records the same recipe.
    resuming = (
        args.resume
        and os.path.isdir(cfg.OUTPUT_DIR)
        and any(
            f == "last_checkpoint" or (f.startswith("model_") and f.endswith(".pth"))
            for f in os.listdir(cfg.OUTPUT_DIR)
        )
    )
    resolve_weights(cfg, args.config_file, args.eval_only, required=not resuming)
    cfg.freeze()
    return cfg


def check_inputs(cfg, args):
    """Fails at start naming the missing path, instead of deep inside data loading."""
    problem = None if args.eval_only else gamma_l1_config_problem(cfg)
    if problem:
        raise StartupError(problem)
    names = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    try:
        check_datasets(names)
    except (FileNotFoundError, KeyError) as e:
        raise StartupError(e.args[0] if e.args else str(e)) from None


def check_output_dir(cfg, args):
    """A training run never replaces another's results: without --resume, OUTPUT_DIR must hold
    no checkpoints. Called once, before any process starts."""
    out = cfg.OUTPUT_DIR
    if args.eval_only or args.resume or not os.path.isdir(out):
        return
    found = sorted(
        f for f in os.listdir(out) if f == "last_checkpoint" or (f.startswith("model_") and f.endswith(".pth"))
    )
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise StartupError(
            f"OUTPUT_DIR {os.path.abspath(out)} holds another run's checkpoints ({shown}); pass --resume to "
            "continue that run, or set OUTPUT_DIR to a new folder"
        )


LOCK_FILE = ".train_net.lock"


class OutputDirLock:
    """One train_net.py per OUTPUT_DIR at a time: a second one (a relaunched job while the first
    still runs, an --eval-only into a training run) is refused naming the holder. The file
    OUTPUT_DIR/.train_net.lock holds the host, pid and SLURM job id of the process that launched
    the run (on the first machine only: its other processes and machines run under it). A lock is
    stale, and taken over, where its process is gone from this host, or its SLURM job is this job
    (requeued: the earlier attempt is over) or no longer running; where that cannot be told (another
    host, no squeue), the message says how to remove it."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.held = self.created = False

    @staticmethod
    def _me() -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def acquire(self) -> "OutputDirLock":
        folder = os.path.dirname(self.path)
        self.created = not os.path.isdir(folder)  # then an empty folder goes with the lock
        os.makedirs(folder, exist_ok=True)
        for _ in range(3):  # a takeover can race another process's; a few tries settle it
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise StartupError(self._in_use(holder)) from None
                logging.getLogger(__name__).warning(f"{self.path}: taking over a stale lock ({holder})")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._me(), f)
            self.held = True
            return self
        raise StartupError(f"{self.path}: could not be created (another process keeps taking it); try again")

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            if self.created:
                with contextlib.suppress(OSError):  # not empty: the run's files stay
                    os.rmdir(os.path.dirname(self.path))
        self.held = False

    def _holder(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except (OSError, ValueError):  # cut short by a kill while it was written: nobody holds it
            return None
        return holder if isinstance(holder, dict) else None

    def _stale(self, holder: dict) -> bool:
        job = holder.get("slurm_job_id")
        if job and job == os.environ.get("SLURM_JOB_ID"):
            return True  # this job, requeued: its earlier attempt is over
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, another user's
                return False
            return False
        if job and shutil.which("squeue"):
            proc = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True)
            return proc.returncode == 0 and proc.stdout.strip() not in ("RUNNING", "PENDING", "COMPLETING", "SUSPENDED")
        return False

    def _in_use(self, holder: dict) -> str:
        job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
        return (
            f"OUTPUT_DIR {os.path.dirname(os.path.abspath(self.path))} is in use by another train_net.py (host "
            f"{holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('started')}); wait for it to "
            f"end, or, if it is not running any more, remove {self.path}"
        )


class OutputDirGuard:
    """Puts OUTPUT_DIR back as it was when a run fails before it starts working.

    detectron2's default_setup writes config.yaml and log.txt, and its writers create
    metrics.json and a TensorBoard file, before the model is built and the weights are
    checked; a run that then fails (a mismatching checkpoint, a broken annotation file) would
    otherwise leave another run's config.yaml replaced. `restore()` puts config.yaml back,
    cuts log.txt back to its old length, removes the files this run created and the folder
    if this run created it.
    """

    def __init__(self, output_dir):
        self.output_dir = output_dir
        self.existed = bool(output_dir) and os.path.isdir(output_dir)
        self.names = set(os.listdir(output_dir)) if self.existed else set()
        self.saved = {}
        for name in ("config.yaml", "log.txt"):
            path = os.path.join(output_dir, name)
            if name in self.names and os.path.isfile(path):
                with open(path, "rb") as f:
                    self.saved[name] = f.read() if name == "config.yaml" else os.path.getsize(path)

    def restore(self, files=None):
        """Everything as it was; or only `files` (names) put back."""
        if not self.output_dir or not comm.is_main_process() or not os.path.isdir(self.output_dir):
            return
        if not self.existed and files is None:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for name in files or os.listdir(self.output_dir):
            path = os.path.join(self.output_dir, name)
            old = self.saved.get(name)
            if isinstance(old, bytes):
                write_atomically({path: bytes_writer(old)})
            elif isinstance(old, int):
                if os.path.isfile(path) and os.path.getsize(path) > old:
                    os.truncate(path, old)
            elif name not in self.names and os.path.isfile(path):
                os.remove(path)


def setup(args):
    cfg = build_config(args)
    default_setup(cfg, args)
    # default_setup logs detectron2's and fvcore's loggers; ours (weights' provenance, hooks) go to log.txt too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="scalenet_d2", abbrev_name="sd2")
    check_inputs(cfg, args)
    return cfg
