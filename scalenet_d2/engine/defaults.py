"""The parts of train_net.py that a detectron2 project would otherwise copy: start-up checks,
the trainer (ScaleNetCheckpointer, COCO evaluation that works without compiled ops, timed
inference) and `launch_any` (detectron2's launch, also on CPU-only machines).
"""

import json
import logging
import os
import random
import shutil
import time

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from torch import nn

from ..atomic import bytes_writer, write_atomically
from ..checkpoint import ScaleNetCheckpointer
from ..config import add_scalenet_config
from ..data import check_datasets, explain_dataset_failure  # importing it registers the synthetic splits
from ..data.resumable import NamedMapper, build_resumable_train_loader, start_iterating, stream_loader
from ..evaluation import build_coco_evaluator
from ..modeling.allocation import BUNDLED_ALLOCATIONS
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
    "setup",
    "TrainingDivergedError",
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
        f"(docs/model.md, 'Converting ImageNet checkpoints'). Or set {PRETRAINED_ENV}=DIR when they are in DIR/, pass "
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


def _rng_state():
    """Every RNG the training step draws from, as tensors and plain numbers (weights_only loads it)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng = {
        "python": [version, torch.tensor(state, dtype=torch.int64), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng):
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


METRICS_WINDOW = 20  # detectron2's writers smooth over the last 20 iterations


class TrainingDivergedError(FloatingPointError):
    """A non-finite loss or gradient; nothing from that iteration on was applied or saved."""


class MetricsWriter(JSONWriter):
    """detectron2's JSONWriter (metrics.json) that a resumed run can cut back to the iteration it
    resumes from, so every iteration appears once."""

    def __init__(self, json_file, window_size=20):
        super().__init__(json_file, window_size)
        self.path = json_file

    def drop_from(self, iteration):
        self._file_handle.close()
        kept, dropped, broken = [], 0, 0
        if os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:  # a line cut short when the run was killed
                        broken += 1
                        continue
                    if entry.get("iteration", -1) < iteration:
                        kept.append(line if line.endswith("\n") else line + "\n")
                    else:
                        dropped += 1
            write_atomically({self.path: bytes_writer("".join(kept).encode())})
        if dropped or broken:
            logging.getLogger(__name__).info(
                f"{self.path}: dropped {dropped} entries of iterations >= {iteration} (to be redone)"
                + (f" and {broken} unreadable lines" if broken else "")
            )
        self._file_handle = open(self.path, "a")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer made safe to leave running for days:

    - ScaleNetCheckpointer: weights checked on every load, checkpoints written atomically,
      resume from the newest intact checkpoint;
    - a checkpoint holds the optimizer and LR scheduler (also on detectron2 versions whose
      trainer left them out), the RNG states and the data stream's seed; the training data
      is a TrainStream, so a resumed run continues the data exactly;
    - metrics.json is cut back to the resumed iteration, so each iteration appears once;
    - a non-finite loss (detectron2's check) or gradient (checked before each optimizer
      step) stops training before the step, naming the iteration and the last good checkpoint;
    - the project's evaluator; evaluations keep their results (`self.results`) and time the
      forward (`self.inference`).
    """

    def __init__(self, cfg):
        self.results = None  # of the last evaluation
        self.inference = (None, 0)  # (seconds per image, images timed) of the last evaluation
        self._restored = {}
        super().__init__(cfg)
        self._trainer.optimizer.register_step_pre_hook(self._check_gradients)

    @classmethod
    def build_train_loader(cls, cfg):
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return build_resumable_train_loader(cfg, seed)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        try:
            return build_detection_test_loader(
                cfg, dataset_name, mapper=NamedMapper(DatasetMapper(cfg, is_train=False), dataset_name)
            )
        except Exception as e:
            raise explain_dataset_failure([dataset_name], e, for_training=False) from e

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # the tasks from the config, so that mask AP is reported (as NaN) even with no detections
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return build_coco_evaluator(dataset_name, output_dir=output_folder, tasks=tasks)

    def build_hooks(self):
        self.checkpointer = ScaleNetCheckpointer(
            self.checkpointer.model,
            self.cfg.OUTPUT_DIR,
            allow_partial=self.cfg.MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS,
            **self.checkpointer.checkpointables,
        )
        return super().build_hooks()

    def build_writers(self):
        return [
            CommonMetricPrinter(self.max_iter),
            MetricsWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self):
        state = super().state_dict()
        state.setdefault("_trainer", self._trainer.state_dict())  # older detectron2 leaves the optimizer out
        state["rng"] = _rng_state()
        stream = getattr(self._trainer.data_loader, "stream", None)
        if stream is not None:  # a resumed run rebuilds the same stream, also with a random SEED
            state["data"] = {"seed": stream.seed}
        storage = getattr(self, "storage", None)
        if storage is not None:  # the recent scalars, so the smoothed values logged after a resume are the same
            state["metrics"] = {
                name: [[float(v), int(i)] for v, i in history.values()[-METRICS_WINDOW:]]
                for name, history in storage.histories().items()
            }
        return state

    def load_state_dict(self, state):
        TrainerBase.load_state_dict(self, state)  # iteration, hooks (the LR scheduler)
        if "_trainer" in state:
            self._trainer.load_state_dict(state["_trainer"])  # optimizer (and AMP's grad scaler)
        self._restored = {k: state[k] for k in ("rng", "data", "metrics") if k in state}

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if resume and self.start_iter == self.max_iter:  # finished: nothing trains that would write model_final
            self.checkpointer.rewrite_final()
        if self.start_iter == 0:
            return
        for writer in (w for h in self._hooks if isinstance(h, hooks.PeriodicWriter) for w in h._writers):
            if isinstance(writer, MetricsWriter):
                writer.drop_from(self.start_iter)
        stream = getattr(self._trainer.data_loader, "stream", None)
        if stream is not None:  # else a sampler other than TrainingSampler: detectron2's own loader
            stream = stream.with_seed(self._restored.get("data", {}).get("seed", stream.seed))
            self._trainer.data_loader = stream_loader(self.cfg, stream, self.start_iter)
        loader = self._trainer.data_loader
        # started now, before the RNGs are restored: starting draws a seed from torch's RNG
        if hasattr(self._trainer, "_data_loader_iter_obj"):
            self._trainer._data_loader_iter_obj = start_iterating(loader)
        else:
            self._trainer._data_loader_iter = start_iterating(loader)
        if "rng" in self._restored:
            _set_rng_state(self._restored["rng"])
        else:
            logging.getLogger(__name__).warning("The checkpoint holds no RNG state: the resumed run's draws differ")

    def before_train(self):
        super().before_train()
        for name, values in self._restored.get("metrics", {}).items():
            for value, iteration in values:
                self.storage.histories()[name].update(value, iteration)  # a defaultdict

    # ------------------------------------------------------------------ divergence
    def _check_gradients(self, optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        # one fused pass and one host sync per step (the norm of a tensor with nan/inf is not finite)
        norms = (
            torch._foreach_norm(grads)
            if hasattr(torch, "_foreach_norm")
            else [torch.linalg.vector_norm(g) for g in grads]
        )
        if bool(torch.stack(norms).isfinite().all()):
            return
        names = {id(p): n for n, p in self._trainer.model.named_parameters()}
        bad = [
            names.get(id(p), "?")
            for g in optimizer.param_groups
            for p in g["params"]
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        ]
        raise FloatingPointError(
            f"Gradient of {bad[0]} ({len(bad)} parameters in all) became infinite or NaN at iteration={self.iter}!"
        )

    def train(self):
        try:
            return super().train()
        except FloatingPointError as e:
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
            raise TrainingDivergedError(
                f"training diverged at iteration {self.iter}: {e} The step was not applied and nothing non-finite was "
                f"saved; the last good checkpoint is {last or 'none (none written yet)'}. Lower SOLVER.BASE_LR or "
                "lengthen SOLVER.WARMUP_ITERS, then --resume from it or start again."
            ) from e

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
