"""Hooks and writers of the trainer (train_loop.py): the RNG states of every process saved with each
checkpoint, and metrics.json cut back to the iteration a run resumes from."""

import json
import logging
import os
import random
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter

from ..atomic import bytes_writer, write_atomically

__all__ = ["rng_state", "set_rng_state", "RNGStates", "METRICS_WINDOW", "MetricsWriter"]


def rng_state():
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


def set_rng_state(rng):
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class RNGStates(HookBase):
    """Every process's RNG states, gathered to the main process at each iteration that detectron2's
    PeriodicCheckpointer saves (this hook runs just before it), for the checkpoint; on resume each
    process restores its own (`restore`). In DDP each process draws from its own generators (RPN and
    ROI sampling, augmentation), so restoring the main process's everywhere would make every process
    draw the same numbers after a resume."""

    def __init__(self, period: int, max_iter: int):
        self.period, self.max_iter = period, max_iter
        self.by_rank: Optional[List[dict]] = None  # on the main process, after the last gather

    def after_step(self):
        iteration = self.trainer.iter
        if (iteration + 1) % self.period == 0 or iteration >= self.max_iter - 1:  # as PeriodicCheckpointer.step
            self.by_rank = comm.gather(rng_state(), dst=0)

    def saved(self) -> List[dict]:
        """What a checkpoint holds: one state per process (the main process's alone where a
        checkpoint is written outside the checkpointer's schedule)."""
        return self.by_rank if self.by_rank else [rng_state()]

    @staticmethod
    def restore(saved: Union[List[dict], Dict]) -> None:
        """This process's state from a checkpoint's (a dict: a checkpoint that kept the main
        process's only, as before per-process states)."""
        rank, world = comm.get_rank(), comm.get_world_size()
        logger = logging.getLogger(__name__)
        if isinstance(saved, dict):
            saved = [saved]
        if len(saved) != world:
            logger.warning(
                f"The checkpoint holds the RNG states of {len(saved)} process(es) and this run has {world}: "
                "the resumed run's draws differ from those of an uninterrupted one"
            )
        set_rng_state(saved[rank] if rank < len(saved) else saved[0])


METRICS_WINDOW = 20  # detectron2's writers smooth over the last 20 iterations


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
