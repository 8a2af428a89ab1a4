#!/usr/bin/env python
"""Backbone params, FLOPs and (with --speed) speed of detection configs, on the models they build.

    python tools/benchmark.py configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml \
        configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml --sizes 224x224 800x1344 --markdown

    python tools/benchmark.py configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml \
        configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml --sizes 224x224 --speed 800x1344

Models are built without loading weights (they change neither params, FLOPs nor speed), on
the GPU when there is one. --speed times the backbones in one process, as ratios to the
first config (put the ResNet first to read "ScaleNet time / ResNet time").
"backbone" is the bottom-up network (ScaleNet or ResNet, without FPN), the part in which
twins differ; FLOPs are counted by fvcore at batch 1, one fused multiply-add = one flop
(the convention of the ResNet and ScaleNet papers). 800x1344 is an 800x1333 COCO input
after detectron2 pads it to a multiple of 32.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from scalenet_d2.comparison import format_table
from scalenet_d2.engine import resolve_allocation
from scalenet_d2.profiling import backbone_stats, machine_description


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 800x1344") from None
    return h, w


def config_model(config_file, opts=()):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from scalenet_d2.config import add_scalenet_config

    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    resolve_allocation(cfg)
    return build_model(cfg).eval()


def speed_variants(model):
    """(label, body, memory format) of each way to time a model's bottom-up backbone: "shipped"
    as users run it by default (ScaleNet: norms folded in eval), "plain" (ScaleNet: its plain
    forward), and "channels_last" (a copy in that memory format, input too)."""
    from scalenet_d2.scalenet import ScaleNet, set_norm_folding

    body = getattr(model.backbone, "bottom_up", model.backbone)
    variants = [("shipped", body, torch.contiguous_format)]
    if isinstance(body, ScaleNet):
        variants.append(("plain", set_norm_folding(copy.deepcopy(body), False), torch.contiguous_format))
    variants.append(("channels_last", copy.deepcopy(body).to(memory_format=torch.channels_last), torch.channels_last))
    return variants


def time_bodies(bodies, size, rounds):
    """Seconds of each forward of each (label, body, memory format) at batch 1: in interleaved
    rounds within one process, so that a change of load on the machine affects all alike."""
    device = next(bodies[0][1].parameters()).device
    inputs = [torch.randn(1, 3, *size, device=device).to(memory_format=fmt) for _, _, fmt in bodies]
    seconds = [[] for _ in bodies]
    with torch.no_grad():
        for (_, body, _), x in zip(bodies, inputs):  # warm-up: allocator, cuDNN autotuning
            body(x)
        for _ in range(rounds):
            for (_, body, _), x, times in zip(bodies, inputs, seconds):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                body(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config files")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(224, 224), (800, 1344)], help="HxW inputs")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--speed",
        type=parse_size,
        metavar="HxW",
        help="also time each backbone's forward at this input (shipped, plain, channels_last), "
        "as a ratio to the first config's shipped run",
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed forwards per backbone for --speed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1, as MODEL_ZOO.md's CPU figures)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every config")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    size_names = [f"{h}x{w}" for h, w in args.sizes]
    header = ["config", "backbone params (M)"] + [f"backbone GFLOPs @{s}" for s in size_names] + ["model params (M)"]
    rows, models = [], []
    for config in args.configs:
        model = config_model(config, args.opts)
        s = backbone_stats(model, args.sizes)
        rows.append(
            [os.path.relpath(config)]
            + [f"{s['backbone_params'] / 1e6:.2f}"]
            + [f"{s['backbone_flops'][n] / 1e9:.2f}" for n in size_names]
            + [f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"]
        )
        print(" ".join(rows[-1]), file=sys.stderr, flush=True)  # progress: big models take a while
        if args.speed:
            models.append(model)
    print("\n".join(format_table(header, rows, args.markdown)))
    print(f"\nmeasured by tools/benchmark.py on {machine_description()}")
    if args.speed:
        print_speed(args, models)


def print_speed(args, models):
    bodies, labels = [], []
    for config, model in zip(args.configs, models):
        for label, body, fmt in speed_variants(model):
            bodies.append((label, body, fmt))
            labels.append((os.path.relpath(config), label))
    seconds = time_bodies(bodies, args.speed, args.rounds)
    reference = statistics.median(seconds[0])
    header = ["config", "backbone run", "median s", "min-max s", "median / first config shipped"]
    rows = [
        [
            config,
            label,
            f"{statistics.median(t):.4f}",
            f"{min(t):.4f}-{max(t):.4f}",
            f"{statistics.median(t) / reference:.3f}",
        ]
        for (config, label), t in zip(labels, seconds)
    ]
    print()
    print("\n".join(format_table(header, rows, args.markdown)))
    device = next(bodies[0][1].parameters()).device
    print(
        f"\nspeed: backbone forward at {args.speed[0]}x{args.speed[1]}, batch 1, eval mode, {device}, "
        f"{args.rounds} interleaved rounds, torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
