"""Training a ScaleNet classifier on ImageFolder (ImageNet-layout) data: the over-complete seed
of data-driven neuron allocation, the final network of an allocation, or that network's ResNet
twin by the same recipe (tools/train_classifier.py).

Single process, or one process per GPU under torchrun. Per-iteration learning rate from torch's
schedulers (linear warm-up, then cosine or steps). Checkpoints: `classifier_checkpoint`.
"""

import contextlib
import datetime
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from ..checkpoint import EXPECTED_INPUT
from ..checkpoint.classifier import (
    CHECKPOINT,
    FINAL,
    classifier_state,
    load_init_weights,
    load_training_state,
    save_classifier_checkpoint,
)
from ..data.resumable import without_worker_traceback
from ..modeling.allocation import load_allocation
from ..modeling.classification import ResNetTwinClassifier, ScaleNetClassifier
from .pruning import sa_gamma_l1, seed_allocation

__all__ = ["DatasetError", "build_lr_scheduler", "ClassifierTrainer", "train_classifier"]

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message names the folder and the expected layout."""

    def __init__(self, message: str):
        super().__init__(without_worker_traceback(message, type(self).__name__))


# ----------------------------------------------------------------------------- distributed


def setup_distributed(device_arg):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def all_reduce_sum(values, device, world):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- data


class NamedImageFolder(ImageFolder):
    """torchvision's ImageFolder whose unreadable image (truncated, not an image) fails naming its file."""

    def __getitem__(self, index):
        try:
            return super().__getitem__(index)
        except Exception as e:
            raise DatasetError(
                f"image {self.samples[index][0]} (sample {index} of {self.root}) cannot be read: "
                f"{type(e).__name__}: {e}; expected an image file PIL can decode. Fix or remove the file"
            ) from e


def image_folder(root, split, transform):
    layout = f"{root}/{split}/<class>/<image> (ImageNet layout: one folder per class)"
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root} does not exist; expected {layout}")
    if not os.path.isdir(path):
        raise DatasetError(f"dataset folder {root} has no '{split}' folder; expected {layout}")
    try:
        ds = NamedImageFolder(path, transform)
    except (OSError, RuntimeError) as e:  # no class folders, no images, permission denied
        raise DatasetError(f"dataset folder {path} cannot be used: {e}; expected {layout}") from e
    try:
        ds.loader(ds.samples[0][0])  # fail now, not in a worker hours later, if images can't be decoded
    except Exception as e:
        raise DatasetError(f"image {ds.samples[0][0]} in dataset folder {path} cannot be read: {e}") from e
    return ds


def build_data(args, world, rank):
    from torchvision import transforms

    # the pixel normalisation the converted weights assume (EXPECTED_INPUT), on 0-1 images
    mean = [m / 255 for m in EXPECTED_INPUT["MODEL.PIXEL_MEAN"]]
    std = [s / 255 for s in EXPECTED_INPUT["MODEL.PIXEL_STD"]]
    norm = transforms.Normalize(mean, std)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(args.image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(int(round(args.image_size / 0.875))),
            transforms.CenterCrop(args.image_size),
            transforms.ToTensor(),
            norm,
        ]
    )
    train = image_folder(args.data, "train", train_tf)
    val = image_folder(args.data, "val", val_tf) if os.path.isdir(os.path.join(args.data, "val")) else None
    if val is not None and val.classes != train.classes:
        raise DatasetError(
            f"dataset folder {args.data}: val/ has classes {val.classes[:5]}... ({len(val.classes)}) but train/ has "
            f"{train.classes[:5]}... ({len(train.classes)}); expected the same class folders"
        )
    if len(train) < args.batch_size * world:
        raise DatasetError(
            f"dataset folder {args.data}/train has {len(train)} images, fewer than one global batch "
            f"({args.batch_size} x {world} processes); expected more images or a smaller --batch-size"
        )
    # The order of an epoch depends on (seed, epoch) only, in one process as in many; workers are
    # started per epoch and seeded from the per-epoch RNG (ClassifierTrainer._run_epoch), so a run
    # resumed at an epoch's end draws what an uninterrupted one would.
    train_sampler = DistributedSampler(train, world, rank, shuffle=True, seed=args.seed)
    kw = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)
    train_loader = DataLoader(train, args.batch_size, sampler=train_sampler, drop_last=True, **kw)
    val_loader = None
    if val is not None:
        val_sampler = DistributedSampler(val, world, rank, shuffle=False) if world > 1 else None
        val_loader = DataLoader(val, args.batch_size, shuffle=False, sampler=val_sampler, **kw)
    return train, train_loader, train_sampler, val_loader


# ----------------------------------------------------------------------------- schedule + eval


@contextlib.contextmanager
def _steps_before_any_optimizer_step():
    """Silences torch's warning for scheduler steps taken, on purpose, before the first optimizer step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
        yield


def build_lr_scheduler(optimizer, schedule: str, total_iters: int, warmup_iters: int, steps_iters=()):
    """Per-iteration schedule: linear warm-up over `warmup_iters`, then cosine to 0 over the
    rest, or x0.1 at each of `steps_iters` (counted from the start of training)."""
    main_iters = max(1, total_iters - warmup_iters)
    if schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_iters)
    else:
        milestones = sorted(max(1, s - warmup_iters) for s in steps_iters)
        main = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    if warmup_iters <= 0:
        return main
    with _steps_before_any_optimizer_step():  # SequentialLR steps its first scheduler at once
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup_iters)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_iters])


@torch.no_grad()
def evaluate(model, loader, device, world):
    """Top-1/top-5 accuracy (%). Under DistributedSampler a few images may count twice (padding)."""
    model.eval()
    c1 = c5 = n = 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == targets[:, None]
        c1 += hit[:, :1].sum().item()
        c5 += hit.any(dim=1).sum().item()
        n += targets.numel()
    c1, c5, n = all_reduce_sum([c1, c5, n], device, world)
    model.train()
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "images": int(n)}


@contextlib.contextmanager
def log_to_file(path, enabled):
    handler = None
    if enabled:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


# ----------------------------------------------------------------------------- training


@dataclass
class _Progress:
    epoch: int = 0  # epochs done
    iteration: int = 0
    metrics: Optional[dict] = None


class ClassifierTrainer:
    """Everything one training run needs, built from the command-line arguments; `train()` runs it.

    Everything that can fail on bad input (data, allocation, weights, resume file) fails while
    this is constructed, before the output folder is touched.
    """

    def __init__(self, args):
        self.args = args
        self.world, self.rank, self.device = setup_distributed(args.device)
        torch.manual_seed(args.seed + self.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.train_set, self.train_loader, self.train_sampler, self.val_loader = build_data(args, self.world, self.rank)
        if args.allocation:
            self.allocation, self.seed_meta = load_allocation(args.allocation), None
        else:
            # a twin takes only stem, widths and blocks from it: a seed's twin is ResNet-<depth>
            base = args.base or args.depth
            self.allocation = seed_allocation(base, args.multiplier)
            meta = {"allocation": self.allocation.to_dict(), "multiplier": args.multiplier, "base": str(base)}
            self.seed_meta = None if args.resnet_twin else meta
        self.network = "resnet_twin" if args.resnet_twin else "scalenet"
        norm = "SyncBN" if (args.sync_bn and self.world > 1) else "BN"
        classes = len(self.train_set.classes)
        net = ResNetTwinClassifier if args.resnet_twin else ScaleNetClassifier
        self.model = net(self.allocation, num_classes=classes, norm=norm).to(self.device)
        if args.init_weights:
            load_init_weights(self.model, args.init_weights)

        self.base_lr = args.lr if args.lr is not None else 0.1 * args.batch_size * self.world / 256  # linear scaling
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=self.base_lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        # loss scaling only for float16 (GPU); CPU autocast uses bfloat16, which needs none
        self.scaler = torch.amp.GradScaler("cuda", enabled=args.amp and self.device.type == "cuda")
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.iters_per_epoch = len(self.train_loader)
        total = args.epochs * self.iters_per_epoch
        steps = args.lr_steps or [args.epochs * f for f in (0.3, 0.6, 0.9)]
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            args.lr_schedule,
            total,
            round(args.warmup_epochs * self.iters_per_epoch),
            [round(s * self.iters_per_epoch) for s in steps],
        )
        self.stop_at = total if args.max_iters is None else min(total, args.max_iters)
        self.progress = _Progress(metrics={})
        self.resumed_from = None
        self._resume()
        self.train_model = self.model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def _resume(self):
        args = self.args
        path = os.path.join(args.output_dir, CHECKPOINT) if args.resume == "auto" else args.resume
        if not path or (args.resume == "auto" and not os.path.isfile(path)):
            return  # --resume without a path and no checkpoint yet: a fresh start
        state = load_training_state(path, self.allocation, self.network)
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # a partly done epoch (a --max-iters stop) is redone from its start; the schedule follows
        # the iteration. Checkpoints written at an epoch's end resume exactly (see build_data).
        self.progress = _Progress(
            int(state["epoch"]), int(state["epoch"]) * self.iters_per_epoch, dict(state.get("metrics") or {})
        )
        with _steps_before_any_optimizer_step():  # the schedule back to where it was
            for _ in range(self.progress.iteration):
                self.scheduler.step()
        self.resumed_from = path

    def _state(self, **extra):
        return classifier_state(
            self.model,
            self.allocation,
            self.seed_meta,
            self.train_set.classes,
            vars(self.args),
            self.progress.metrics,
            network=self.network,
            **extra,
        )

    def _step(self, images, targets, criterion):
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.args.amp):
            loss = criterion(self.train_model(images), targets)
        total = loss.float()
        if self.args.gamma_l1 > 0:
            total = total + self.args.gamma_l1 * sa_gamma_l1(self.model)
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"loss is {total.item()} at iteration {self.progress.iteration}; lower --lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss

    def _run_epoch(self, epoch, criterion, clock):
        """One epoch, or its part up to stop_at; True when the epoch was completed."""
        self.train_sampler.set_epoch(epoch)
        # augmentations and worker seeds: from (seed, epoch, rank), not from what ran before
        torch.manual_seed(int(np.random.SeedSequence([self.args.seed, epoch, self.rank]).generate_state(1)[0]))
        self.train_model.train()
        args, p = self.args, self.progress
        for i, (images, targets) in enumerate(self.train_loader):
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self._step(images, targets, criterion)
            p.iteration += 1
            if self.rank == 0 and (p.iteration % args.log_period == 0 or p.iteration == self.stop_at):
                start_time, start_iter = clock
                per_iter = (time.perf_counter() - start_time) / max(1, p.iteration - start_iter)
                eta = datetime.timedelta(seconds=int(per_iter * (self.stop_at - p.iteration)))
                logger.info(
                    f"epoch {epoch + 1}/{args.epochs} iter {i + 1}/{self.iters_per_epoch} (total {p.iteration}/"
                    f"{self.stop_at}) loss {loss.item():.4f} lr {lr:.4g} "
                    f"{args.batch_size * self.world / per_iter:.1f} img/s eta {eta}"
                )
            if p.iteration >= self.stop_at:
                return i + 1 == self.iters_per_epoch
        return True

    def train(self) -> str:
        """Trains to --epochs (or --max-iters); returns the path of the latest checkpoint."""
        args, p = self.args, self.progress
        criterion = nn.CrossEntropyLoss()
        kind = "ResNet twin of" if self.network == "resnet_twin" else "seed" if self.seed_meta else "network"
        logger.info(
            f"training {kind} {self.allocation.name!r} ({len(self.train_set.classes)} classes, {len(self.train_set)} "
            f"images) on {self.world} x {self.device.type}, global batch {args.batch_size * self.world}, lr "
            f"{self.base_lr:g} {args.lr_schedule}, wd {args.weight_decay:g}, gamma-l1 {args.gamma_l1:g}, amp {args.amp}"
            + (f", initialised from {args.init_weights}" if args.init_weights else "")
        )
        if self.resumed_from:
            logger.info(f"resumed from {self.resumed_from}: {p.epoch} epochs done")
        clock = (time.perf_counter(), p.iteration)
        while p.epoch < args.epochs and p.iteration < self.stop_at:
            finished = self._run_epoch(p.epoch, criterion, clock)
            if finished and self.val_loader is not None:
                p.metrics = evaluate(self.train_model, self.val_loader, self.device, self.world)
                logger.info(
                    f"epoch {p.epoch + 1} val top-1 {p.metrics['top1']:.2f}% top-5 {p.metrics['top5']:.2f}% "
                    f"({p.metrics['images']} images)"
                )
            p.epoch += int(finished)
            if self.rank == 0:
                state = self._state(
                    epoch=p.epoch,
                    iteration=p.iteration,
                    optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(),
                )
                save_classifier_checkpoint(state, os.path.join(args.output_dir, CHECKPOINT))
        if self.rank == 0 and p.epoch >= args.epochs:
            save_classifier_checkpoint(
                self._state(epoch=p.epoch, iteration=p.iteration), os.path.join(args.output_dir, FINAL)
            )
            logger.info(f"wrote {os.path.join(args.output_dir, FINAL)}")
        if self.rank == 0:
            logger.info(f"checkpoint {os.path.join(args.output_dir, CHECKPOINT)} (iteration {p.iteration})")
        if self.world > 1:
            dist.barrier()
        return os.path.join(args.output_dir, CHECKPOINT)


def train_classifier(args) -> str:
    """Run the training the arguments of tools/train_classifier.py describe."""
    trainer = ClassifierTrainer(args)
    try:
        with log_to_file(os.path.join(args.output_dir, "log.txt"), enabled=trainer.rank == 0):
            return trainer.train()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
