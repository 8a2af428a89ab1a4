#!/usr/bin/env python
r"""Train a ScaleNet classifier on ImageFolder (ImageNet-layout) data.

Trains the over-complete seed network of data-driven neuron allocation (default), or, with
--allocation, the final network from an allocation file (from scratch, or from the seed's kept
neurons with --init-weights). Checkpoints are published-layout classifier weights.

    # one process (CPU or one GPU)
    python tools/train_seed.py /data/imagenet --depth 50 --output-dir output/seed50
    # 8 GPUs
    torchrun --nproc_per_node 8 tools/train_seed.py /data/imagenet --depth 50 --batch-size 32 \
        --output-dir output/seed50
    # resume after a stop
    torchrun --nproc_per_node 8 tools/train_seed.py /data/imagenet ... --resume

Data: DATA/train/<class>/<image> and optionally DATA/val/<class>/<image> (evaluated after each
epoch). Input normalisation is the standard PyTorch ImageNet recipe (RGB, mean 0.485/0.456/0.406,
std 0.229/0.224/0.225): the ScaleNet release does not state its own.
"""

import argparse
import contextlib
import datetime
import logging
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalenet_d2.allocation import Allocation, load_allocation  # noqa: E402
from scalenet_d2.atomic import atomic_torch_save  # noqa: E402
from scalenet_d2.checkpoint import check_published_state_dict  # noqa: E402
from scalenet_d2.classification import ScaleNetClassifier  # noqa: E402
from scalenet_d2.neuron_allocation import (  # noqa: E402
    ALLOCATION_KEY,
    SEED_BLOCKS,
    SEED_KEY,
    extract_state_dict,
    sa_gamma_l1,
    seed_allocation,
)

logger = logging.getLogger("train_seed")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT = "checkpoint.pth"  # latest state, with optimizer; rewritten atomically after every epoch
FINAL = "model_final.pth"  # weights only, written when all epochs are done


class DatasetError(ValueError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset root with train/<class>/<image> (and optional val/<class>/<image>)")
    net = p.add_argument_group("network")
    net.add_argument(
        "--depth", type=int, default=50, choices=sorted(SEED_BLOCKS), help="seed depth (ResNet block counts)"
    )
    net.add_argument(
        "--base",
        help="take the seed's depth, stem, planes and sides from this allocation (name or file) instead of --depth",
    )
    net.add_argument(
        "--multiplier", type=float, default=1.0, help="seed width per scale = multiplier x the stage's ResNet width"
    )
    net.add_argument("--allocation", help="train this allocation (name or file) instead of a seed: the final network")
    net.add_argument(
        "--init-weights", help="initialise from these weights (e.g. tools/allocate.py --inherit-weights) to fine-tune"
    )
    net.add_argument("--sync-bn", action="store_true", help="SyncBN across processes")
    opt = p.add_argument_group("recipe")
    opt.add_argument("--epochs", type=int, default=100)
    opt.add_argument("--batch-size", type=int, default=64, help="images per process (global batch = this x processes)")
    opt.add_argument("--lr", type=float, help="peak learning rate; default 0.1 x global batch / 256")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--lr-schedule", choices=("cosine", "step"), default="cosine")
    opt.add_argument(
        "--lr-steps",
        type=float,
        nargs="+",
        help="step schedule: epochs where lr drops 10x (default 30%%/60%%/90%% of --epochs)",
    )
    opt.add_argument("--warmup-epochs", type=float, default=0.0, help="linear lr warm-up")
    opt.add_argument("--weight-decay", type=float, default=1e-4)
    opt.add_argument(
        "--gamma-l1",
        type=float,
        default=0.0,
        help="L1 penalty on the SA-branch BN gammas (network slimming; e.g. 1e-5); 0 = off",
    )
    opt.add_argument(
        "--amp", action="store_true", help="mixed precision (float16 + loss scaling on GPU, bfloat16 on CPU)"
    )
    opt.add_argument("--image-size", type=int, default=224, help="training crop side")
    opt.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", default="output/seed")
    run.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help=f"resume from this checkpoint; without a path: OUTPUT_DIR/{CHECKPOINT} if present",
    )
    run.add_argument("--workers", type=int, default=8, help="data loader processes per training process")
    run.add_argument("--max-iters", type=int, help="stop after this many iterations in total (smoke tests)")
    run.add_argument("--log-period", type=int, default=50)
    run.add_argument("--device", help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.allocation and (args.base or args.multiplier != 1.0):
        p.error("--allocation trains a given allocation; --base/--multiplier only describe seeds")
    return args


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


def image_folder(root, split, transform):
    from torchvision.datasets import ImageFolder

    layout = f"{root}/{split}/<class>/<image> (ImageNet layout: one folder per class)"
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root} does not exist; expected {layout}")
    if not os.path.isdir(path):
        raise DatasetError(f"dataset folder {root} has no '{split}' folder; expected {layout}")
    try:
        ds = ImageFolder(path, transform)
    except (OSError, RuntimeError) as e:  # no class folders, no images, permission denied
        raise DatasetError(f"dataset folder {path} cannot be used: {e}; expected {layout}") from e
    try:
        ds.loader(ds.samples[0][0])  # fail now, not in a worker hours later, if images can't be decoded
    except Exception as e:
        raise DatasetError(f"image {ds.samples[0][0]} in dataset folder {path} cannot be read: {e}") from e
    return ds


def build_data(args, world, rank):
    from torchvision import transforms

    norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
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
    train_sampler = DistributedSampler(train, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
    kw = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available(), persistent_workers=args.workers > 0)
    train_loader = DataLoader(
        train, args.batch_size, shuffle=train_sampler is None, sampler=train_sampler, drop_last=True, **kw
    )
    val_loader = None
    if val is not None:
        val_sampler = DistributedSampler(val, world, rank, shuffle=False) if world > 1 else None
        val_loader = DataLoader(val, args.batch_size, shuffle=False, sampler=val_sampler, **kw)
    return train, train_loader, train_sampler, val_loader


# ----------------------------------------------------------------------------- schedule + eval


def learning_rate(args, base_lr, epoch_float):
    if epoch_float < args.warmup_epochs:
        return base_lr * max(epoch_float, 1e-3) / args.warmup_epochs
    if args.lr_schedule == "cosine":
        t = (epoch_float - args.warmup_epochs) / max(1e-8, args.epochs - args.warmup_epochs)
        return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, t)))
    steps = args.lr_steps or [args.epochs * f for f in (0.3, 0.6, 0.9)]
    return base_lr * 0.1 ** sum(epoch_float >= s for s in steps)


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


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    world, rank, device = setup_distributed(args.device)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stdout,
        force=True,
    )
    torch.manual_seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Everything that can fail on bad input happens before the output folder is touched.
    data = build_data(args, world, rank)
    num_classes = len(data[0].classes)
    if args.allocation:
        allocation, seed_meta = load_allocation(args.allocation), None
    else:
        base = args.base or args.depth
        allocation = seed_allocation(base, args.multiplier)
        seed_meta = {"allocation": allocation.to_dict(), "multiplier": args.multiplier, "base": str(base)}
    norm = "SyncBN" if (args.sync_bn and world > 1) else "BN"
    model = ScaleNetClassifier(allocation, num_classes=num_classes, norm=norm).to(device)
    if args.init_weights:
        load_init_weights(model, args.init_weights)

    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")

    base_lr = args.lr if args.lr is not None else 0.1 * args.batch_size * world / 256  # linear scaling rule
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # loss scaling only for float16 (GPU); CPU autocast uses bfloat16, which needs none
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")

    try:
        with log_to_file(os.path.join(args.output_dir, "log.txt"), enabled=rank == 0):
            return train(args, world, rank, device, model, allocation, seed_meta, optimizer, scaler, base_lr, data)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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


def train(args, world, rank, device, model, allocation, seed_meta, optimizer, scaler, base_lr, data):
    train_set, train_loader, train_sampler, val_loader = data
    global_batch = args.batch_size * world
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    start_epoch, metrics = 0, {}
    resume = os.path.join(args.output_dir, CHECKPOINT) if args.resume == "auto" else args.resume
    if resume and os.path.isfile(resume):  # (--resume without a path and no checkpoint yet: a fresh start)
        start_epoch, metrics = load_resume(resume, model, optimizer, scaler, allocation)
        logger.info(f"resumed from {resume}: {start_epoch} epochs done")

    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    criterion = nn.CrossEntropyLoss()
    kind = "seed" if seed_meta else "network"
    logger.info(
        f"training {kind} {allocation.name!r} ({len(train_set.classes)} classes, {len(train_set)} images) on {world} x {device.type}, "
        f"global batch {global_batch}, lr {base_lr:g} {args.lr_schedule}, wd {args.weight_decay:g}, gamma-l1 {args.gamma_l1:g}"
        f", amp {args.amp}" + (f", initialised from {args.init_weights}" if args.init_weights else "")
    )

    iters_per_epoch = len(train_loader)
    iteration = start_epoch * iters_per_epoch  # a partly done epoch is redone from its start
    stop_at = args.epochs * iters_per_epoch
    if args.max_iters is not None:
        stop_at = min(stop_at, args.max_iters)
    run_start, run_start_iter = time.perf_counter(), iteration
    done = iteration >= stop_at
    for epoch in range(start_epoch, args.epochs):
        if done:
            break
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        train_model.train()
        finished_epoch = True
        for i, (images, targets) in enumerate(train_loader):
            lr = learning_rate(args, base_lr, epoch + i / iters_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                loss = criterion(train_model(images), targets)
            total = loss.float()
            if args.gamma_l1 > 0:
                total = total + args.gamma_l1 * sa_gamma_l1(model)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"loss is {total.item()} at epoch {epoch} iteration {iteration}; lower --lr or check the data"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            iteration += 1
            if rank == 0 and (iteration % args.log_period == 0 or iteration == stop_at):
                per_iter = (time.perf_counter() - run_start) / max(1, iteration - run_start_iter)
                eta = datetime.timedelta(seconds=int(per_iter * (stop_at - iteration)))
                logger.info(
                    f"epoch {epoch + 1}/{args.epochs} iter {i + 1}/{iters_per_epoch} (total {iteration}/{stop_at}) "
                    f"loss {loss.item():.4f} lr {lr:.4g} {global_batch / per_iter:.1f} img/s eta {eta}"
                )
            if iteration >= stop_at:
                done = True
                finished_epoch = i + 1 == iters_per_epoch
                break
        if finished_epoch and val_loader is not None:
            metrics = evaluate(train_model, val_loader, device, world)
            logger.info(
                f"epoch {epoch + 1} val top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% ({metrics['images']} images)"
            )
        if rank == 0:
            state = checkpoint_state(model, allocation, seed_meta, train_set.classes, args, metrics)
            state.update(
                epoch=epoch + 1 if finished_epoch else epoch,
                iteration=iteration,
                optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(),
            )
            atomic_torch_save(state, os.path.join(args.output_dir, CHECKPOINT))
    if rank == 0 and iteration >= args.epochs * iters_per_epoch:
        state = checkpoint_state(model, allocation, seed_meta, train_set.classes, args, metrics)
        state.update(epoch=args.epochs, iteration=iteration)
        atomic_torch_save(state, os.path.join(args.output_dir, FINAL))
        logger.info(f"wrote {os.path.join(args.output_dir, FINAL)}")
    if rank == 0:
        logger.info(f"checkpoint {os.path.join(args.output_dir, CHECKPOINT)} (iteration {iteration})")
    if world > 1:
        dist.barrier()
    return os.path.join(args.output_dir, CHECKPOINT)


def checkpoint_state(model, allocation, seed_meta, classes, args, metrics):
    state = {
        "model": model.state_dict(),  # published ImageNet layout
        ALLOCATION_KEY: allocation.to_dict(),
        "classes": list(classes),
        "metrics": dict(metrics),
        "args": dict(vars(args)),
    }
    if seed_meta:
        state[SEED_KEY] = seed_meta  # marks a seed network for tools/allocate.py
    return state


def load_init_weights(model, path):
    source = f"--init-weights {path}"
    sd = extract_state_dict(torch.load(path, map_location="cpu", weights_only=True), source)
    check_published_state_dict(sd, model.allocation, source)  # every key but fc.*, shape by shape
    expected_fc = {k: tuple(v.shape) for k, v in model.fc.state_dict(prefix="fc.").items()}
    found_fc = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("fc.")}
    if found_fc != expected_fc:
        raise ValueError(f"{source}: classifier {found_fc}; the model expects {expected_fc} (number of classes differs)")
    model.load_state_dict(sd)


def load_resume(path, model, optimizer, scaler, allocation):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or ALLOCATION_KEY not in state:
        raise ValueError(f"--resume {path}: no field '{ALLOCATION_KEY}'; expected a checkpoint written by train_seed.py")
    saved = Allocation.from_dict(state[ALLOCATION_KEY], source=f"{path}:{ALLOCATION_KEY}")
    if not saved.same_network(allocation):
        raise ValueError(
            f"--resume {path}: field '{ALLOCATION_KEY}' is allocation {saved.name!r}, not the requested {allocation.name!r}; "
            "expected the same --depth/--base/--multiplier/--allocation as the run that wrote it"
        )
    model.load_state_dict(state["model"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]), dict(state.get("metrics") or {})


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # DatasetError, AllocationError, ... are ValueErrors
        sys.exit(f"train_seed.py: error: {e}")
