"""The trainer of train_net.py: detectron2's DefaultTrainer made safe to leave running for days
(checked checkpoints, exact resume in every process, divergence stops), with COCO evaluation that
works without compiled ops and timed inference."""

import logging
import os
import time

import torch
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter
from torch import nn

from ..checkpoint import ScaleNetCheckpointer
from ..data import explain_dataset_failure
from ..data.resumable import NamedMapper, build_resumable_train_loader, start_iterating, stream_loader
from ..evaluation import build_coco_evaluator
from ..modeling.allocation import SEED_PREFIX
from ..neuron_allocation.detection import GammaSparsity, add_gamma_l1
from .hooks import METRICS_WINDOW, MetricsWriter, RNGStates

__all__ = ["TrainingDivergedError", "Trainer", "evaluate"]


class TrainingDivergedError(FloatingPointError):
    """A non-finite loss or gradient; nothing from that iteration on was applied or saved."""


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
        if cfg.MODEL.SCALENET.GAMMA_L1 > 0:  # a seed detector for neuron allocation
            add_gamma_l1(self._trainer.optimizer, self._trainer.model, cfg.MODEL.SCALENET.GAMMA_L1)

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
        built = super().build_hooks()
        self._rng_states = RNGStates(self.cfg.SOLVER.CHECKPOINT_PERIOD, self.max_iter)
        # on every process just before the checkpointer, which only the main process has (and the evaluation)
        later = (hooks.PeriodicCheckpointer, hooks.EvalHook)
        built.insert(next((i for i, h in enumerate(built) if isinstance(h, later)), len(built)), self._rng_states)
        if self.cfg.MODEL.SCALENET.GAMMA_L1 > 0 or self.cfg.MODEL.SCALENET.ALLOCATION.startswith(SEED_PREFIX):
            # before the writers, at their period (detectron2's DefaultTrainer writes every 20 iterations)
            writer = next((i for i, h in enumerate(built) if isinstance(h, hooks.PeriodicWriter)), len(built))
            built.insert(writer, GammaSparsity(self._trainer.model, period=20))
        return built

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
        state["rng"] = self._rng_states.saved()
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
        if resume and self.checkpointer.resumed_from is not None:  # detectron2 counts only a tagged one
            self.start_iter = self.iter + 1
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
            RNGStates.restore(self._restored["rng"])
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
