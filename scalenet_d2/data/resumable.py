"""A training data stream that a resumed run continues exactly where the interrupted one stopped.

detectron2's TrainingSampler restarts its stream on resume, and its augmentations draw from
the process-wide RNGs, so a resumed run sees other images with other flips than an
uninterrupted one. Here the stream is a function of (seed, position):

- position p (counting over all ranks: rank r reads r, r + world, ...) is image
  `order(p // N)[p % N]` of the N training images, each epoch in a permutation drawn from
  (seed, epoch), as TrainingSampler's shuffled epochs;
- the mapper (augmentations) runs with Python's, NumPy's and torch's RNGs seeded from
  (seed, p) and then restored, so a sample does not depend on which worker or run made it,
  and the trainer's own RNG stream is untouched.

Resuming at iteration k replays detectron2's aspect-ratio grouping over the images'
width/height (no image is read): the rank's images left waiting in a group at iteration k
are fed again first, then the stream continues. On CPU with NUM_WORKERS 0 this gives the
uninterrupted run's batches exactly (tested).

A training image that cannot be loaded stops the run, naming the file and the dataset: a
silently skipped image would change the recipe.
"""

import contextlib
import copy
import logging
import random
import re
from typing import List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data.build import _train_loader_from_config, build_batch_data_loader, build_detection_train_loader
from detectron2.data.common import AspectRatioGroupedDataset, DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler

from .boxes import drop_negative_boxes

__all__ = [
    "DatasetError",
    "image_failure",
    "NamedMapper",
    "TrainStream",
    "StreamSampler",
    "build_resumable_train_loader",
    "stream_loader",
    "start_iterating",
]

logger = logging.getLogger(__name__)


def without_worker_traceback(message: str, error_name: str) -> str:
    """The message of an exception raised in a DataLoader worker, without the traceback torch puts
    before it when it raises it again in the main process (as `error_name`(that text))."""
    match = re.fullmatch(
        rf"Caught {error_name} in (DataLoader worker process \d+)\.\nOriginal Traceback.*?", message, re.S
    )
    marker = f"{error_name}: "
    if match is None or marker not in message:
        return message
    return f"{message.rsplit(marker, 1)[1].strip()} (in {match.group(1)})"


class DatasetError(RuntimeError):
    """A training image or annotation that cannot be used; the message names the file and dataset."""

    def __init__(self, message: str):
        super().__init__(without_worker_traceback(message, type(self).__name__))


def image_failure(names: str, use: str, record: dict, error: Exception) -> str:
    """What a mapper that failed on a dataset record (a truncated image, ...) tells the user."""
    return (
        f"{names}: cannot load {use} image {record.get('file_name', '?')} (image_id {record.get('image_id', '?')}): "
        f"{type(error).__name__}: {error}. Fix or remove the file, or its annotation entry"
    )


class NamedMapper:
    """A dataset mapper whose failure on an image raises DatasetError naming the file, its image id
    and the dataset (detectron2's test loader would pass on PIL's error alone)."""

    def __init__(self, mapper, dataset_name: str, use: str = "evaluation"):
        self.mapper, self.dataset_name, self.use = mapper, dataset_name, use

    def __call__(self, record: dict):
        try:
            return self.mapper(record)
        except Exception as e:
            raise DatasetError(image_failure(f"dataset '{self.dataset_name}'", self.use, record, e)) from e


@contextlib.contextmanager
def _seeded_rngs(*key: int):
    """Python's, NumPy's and torch's CPU RNG seeded from `key` inside, as they were outside."""
    seeds = np.random.SeedSequence([int(k) for k in key]).generate_state(2)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(int(seeds[0]))
        np.random.seed(int(seeds[1]))
        torch.manual_seed(int(seeds[0]))
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class TrainStream(Dataset):
    """Stream position -> mapped training sample (see the module docstring)."""

    def __init__(self, dataset_dicts: Sequence[dict], mapper, seed: int, dataset_names: Sequence[str] = ()):
        if not len(dataset_dicts):
            raise DatasetError(f"training datasets {', '.join(dataset_names) or '?'} hold no images")
        # serialised once, as detectron2's loader does: workers share it instead of copying Python objects
        self.dicts = DatasetFromList(dataset_dicts, copy=False) if isinstance(dataset_dicts, list) else dataset_dicts
        self.mapper = mapper
        self.seed = int(seed)
        self.names = ", ".join(dataset_names) or "the training set"
        self._epoch, self._order = None, None

    def __len__(self):
        return len(self.dicts)

    def with_seed(self, seed: int) -> "TrainStream":
        """The same images and mapper, another seed."""
        other = copy.copy(self)
        other.seed, other._epoch, other._order = int(seed), None, None
        return other

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dicts))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dicts))
        return int(self._order[offset])

    def __getitem__(self, position: int):
        index = self.index(position)
        for attempt in range(10):
            record = self.dicts[index]
            with _seeded_rngs(self.seed, position, attempt):
                try:
                    sample = self.mapper(record)
                except Exception as e:
                    raise DatasetError(image_failure(self.names, "training", record, e)) from e
            if sample is not None:
                return sample
            # the mapper declined this image (as detectron2's MapDataset allows): another one, deterministically
            index = int(np.random.default_rng([self.seed, position, attempt]).integers(len(self.dicts)))
        raise DatasetError(f"{self.names}: the mapper returned None for 10 images in a row at position {position}")

    def resume_point(self, iterations: int, batch_size: int, rank: int, world: int, grouping: bool):
        """(positions to feed first, next position) for rank `rank` after `iterations` batches."""
        if iterations <= 0:
            return [], rank
        if not grouping:
            return [], rank + iterations * batch_size * world
        if any("width" not in self.dicts[i] or "height" not in self.dicts[i] for i in range(min(100, len(self)))):
            logger.warning(
                f"{self.names}: records lack width/height, so the aspect-ratio groups at the resumed iteration cannot "
                "be rebuilt; the stream continues after the images consumed, without the few left waiting in a group"
            )
            return [], rank + iterations * batch_size * world
        buckets: Tuple[List[int], List[int]] = ([], [])
        position, done = rank, 0
        while done < iterations:
            record = self.dicts[self.index(position)]
            bucket = buckets[0 if record["width"] > record["height"] else 1]  # as AspectRatioGroupedDataset
            bucket.append(position)
            position += world
            if len(bucket) == batch_size:
                done += 1
                bucket.clear()
        return sorted(buckets[0] + buckets[1]), position


class StreamSampler(Sampler):
    """Positions `first`, then start, start + step, ... for ever."""

    def __init__(self, first: Sequence[int], start: int, step: int):
        self.first, self.start, self.step = list(first), int(start), int(step)

    def __iter__(self):
        yield from self.first
        position = self.start
        while True:
            yield position
            position += self.step


def build_resumable_train_loader(cfg, seed: int, start_iter: int = 0, mapper=None):
    """detectron2's training loader for `cfg`, over a TrainStream from iteration `start_iter`,
    without boxes of negative size (boxes.py).

    Only for DATALOADER.SAMPLER_TRAIN TrainingSampler (the other samplers are not a plain
    shuffle); with another one this returns detectron2's own loader, which restarts its
    stream on resume (logged)."""
    try:
        args = _train_loader_from_config(cfg, mapper)
    except Exception as e:
        from . import explain_dataset_failure  # the package imports this module

        raise explain_dataset_failure(cfg.DATASETS.TRAIN, e) from e
    names = cfg.DATASETS.TRAIN
    dataset = drop_negative_boxes(args["dataset"], names, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        logger.warning(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: using detectron2's loader, whose data order "
            "restarts when a run is resumed"
        )
        return build_detection_train_loader(cfg, mapper=args["mapper"], dataset=dataset)
    return stream_loader(cfg, TrainStream(dataset, args["mapper"], seed, names), start_iter)


def stream_loader(cfg, stream: TrainStream, start_iter: int = 0):
    """detectron2's batched loader over `stream` from iteration `start_iter`, for this rank.
    The loader keeps the stream (`loader.stream`): a resumed run reuses its dataset instead
    of loading the annotations again."""
    world, rank = comm.get_world_size(), comm.get_rank()
    batch, grouping = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.ASPECT_RATIO_GROUPING
    first, start = stream.resume_point(start_iter, batch // world, rank, world, grouping)
    loader = build_batch_data_loader(
        stream,
        StreamSampler(first, start, world),
        batch,
        aspect_ratio_grouping=grouping,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    loader.stream = stream
    return loader


def start_iterating(loader):
    """An iterator over `loader` whose torch DataLoader has started now.

    Starting a DataLoader draws its base seed from torch's global RNG. detectron2's
    aspect-ratio grouping starts it lazily, at the first batch; a resumed run restores the
    RNG after calling this, so that draw does not shift the RNG stream of the model."""
    if isinstance(loader, AspectRatioGroupedDataset) and isinstance(loader.dataset, DataLoader):
        loader.dataset = iter(loader.dataset)
    return iter(loader)
