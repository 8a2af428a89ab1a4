#!/usr/bin/env python
r"""Train a ScaleNet classifier on ImageFolder (ImageNet-layout) data.

Trains the over-complete seed network of data-driven neuron allocation (default), or, with
--allocation, the final network from an allocation file (from scratch, or from the seed's kept
neurons with --init-weights). Checkpoints are published-layout classifier weights.

With --resnet-twin it trains the ResNet twin of --allocation (or ResNet-<--depth>) by exactly the
same recipe and data pipeline, so that both arms of a detection comparison start from ImageNet
weights trained alike. Either checkpoint converts with tools/convert_scalenet_to_d2.py.

    # one process (CPU or one GPU)
    python tools/train_classifier.py /data/imagenet --depth 50 --output-dir output/seed50
    # 8 GPUs
    torchrun --nproc_per_node 8 tools/train_classifier.py /data/imagenet --depth 50 --batch-size 32 \
        --output-dir output/seed50
    # resume after a stop
    torchrun --nproc_per_node 8 tools/train_classifier.py /data/imagenet ... --resume

Data: DATA/train/<class>/<image> and optionally DATA/val/<class>/<image> (evaluated after each
epoch). Pixels are normalised as the converted ImageNet weights expect (see docs/model.md).
"""

import argparse
import logging
import sys

from scalenet_d2.checkpoint.classifier import CHECKPOINT, ClassifierCheckpointError
from scalenet_d2.modeling.allocation import AllocationError
from scalenet_d2.neuron_allocation.pruning import SEED_BLOCKS, NeuronAllocationError
from scalenet_d2.neuron_allocation.training import DatasetError, train_classifier


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
    net.add_argument(
        "--resnet-twin",
        action="store_true",
        help="train the ResNet twin of --allocation (or ResNet-<depth>) instead: torchvision's layout, same recipe",
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
    if args.resnet_twin and (args.base or args.multiplier != 1.0):
        p.error("--resnet-twin trains the twin of --allocation or --depth; --base/--multiplier only describe seeds")
    if args.resnet_twin and args.gamma_l1:
        p.error("--gamma-l1 penalises the SA-branch BN gammas of a ScaleNet seed; a ResNet twin has none")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    return train_classifier(args)


if __name__ == "__main__":
    try:
        main()
    except (DatasetError, AllocationError, ClassifierCheckpointError, NeuronAllocationError) as e:
        sys.exit(f"train_classifier.py: error: {e}")
