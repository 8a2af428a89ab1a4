"""The parts of train_net.py that a detectron2 project would otherwise copy: start-up checks,
the trainer (ScaleNetCheckpointer, COCO evaluation that works without compiled ops, timed
inference) and `launch_any` (detectron2's launch, also on CPU-only machines).
"""

import os
import time
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from torch import nn

from .allocation import BUNDLED_ALLOCATIONS
from .checkpoint import ScaleNetCheckpointer
from .config import add_scalenet_config
from .cpu_launch import launch_any
from .data import check_datasets  # importing it registers the synthetic splits
from .evaluation import build_coco_evaluator

__all__ = [
    "PRETRAINED_ENV",
    "StartupError",
    "resolve_weights",
    "resolve_allocation",
    "build_config",
    "check_inputs",
    "check_output_dir",
    "setup",
    "Trainer",
    "evaluate",
    "launch_any",
]

PRETRAINED_ENV = "SCALENET_D2_PRETRAINED"


class StartupError(RuntimeError):
    """A problem found before any work starts (missing weights or dataset files)."""


# ----------------------------------------------------------------------------- config


def resolve_weights(cfg, config_file, eval_only=False):
    """Turns a relative local MODEL.WEIGHTS into an existing path, or fails saying how to make it.

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
        f'MODEL.WEIGHTS /path/to/file, or MODEL.WEIGHTS "" to train from scratch.'
    )


def resolve_allocation(cfg):
    """A MODEL.SCALENET.ALLOCATION file (relative: to the current directory) must exist."""
    alloc = cfg.MODEL.SCALENET.ALLOCATION
    uses_allocation = any(k in cfg.MODEL.BACKBONE.NAME for k in ("scalenet", "resnet_twin"))
    if not uses_allocation or alloc in BUNDLED_ALLOCATIONS or os.path.isabs(alloc):
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
    """detectron2's DefaultTrainer with the project's evaluator and strict checkpointer; its
    evaluations keep their results (`self.results`) and time the forward (`self.inference`)."""

    def __init__(self, cfg):
        self.results = None  # of the last evaluation
        self.inference = (None, 0)  # (seconds per image, images timed) of the last evaluation
        super().__init__(cfg)

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

    def test(self, cfg, model, evaluators=None):
        """DefaultTrainer.test (called by its EvalHook), timing the forward passes."""
        self.results, self.inference = evaluate(cfg, model, evaluators)
        return self.results


def evaluate(cfg, model, evaluators=None):
    """Evaluate on cfg.DATASETS.TEST as DefaultTrainer.test does, with the project's evaluator.
    Returns (results, (seconds per image, images timed))."""
    timed = _TimedModel(model)
    results = super(Trainer, Trainer).test(cfg, timed, evaluators)
    return results, timed.seconds_per_image()
