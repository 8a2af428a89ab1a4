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


def time_backbones(models, size, rounds):
    """Median seconds of one forward of each model's bottom-up backbone at batch 1.

    The backbones run in interleaved rounds within one process, so that a change of load on
    the machine affects all of them alike; the first config is the reference of the ratios.
    """
    bodies = [getattr(m.backbone, "bottom_up", m.backbone) for m in models]
    device = next(bodies[0].parameters()).device
    x = torch.randn(1, 3, *size, device=device)
    seconds = [[] for _ in bodies]
    with torch.no_grad():
        for body in bodies:  # warm-up: allocator, cuDNN autotuning
            body(x)
        for _ in range(rounds):
            for body, times in zip(bodies, seconds):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                body(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in seconds]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config files")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(224, 224), (800, 1344)], help="HxW inputs")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--speed",
        type=parse_size,
        metavar="HxW",
        help="also time each backbone's forward at this input, as a ratio to the first config",
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed forwards per backbone for --speed")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every config")
    args = parser.parse_args(argv)

    size_names = [f"{h}x{w}" for h, w in args.sizes]
    header = ["config", "backbone params (M)"] + [f"backbone GFLOPs @{s}" for s in size_names] + ["model params (M)"]
    if args.speed:
        header += [f"backbone s @{args.speed[0]}x{args.speed[1]}", "time / first config's"]
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
    if args.speed:
        seconds = time_backbones(models, args.speed, args.rounds)
        for row, sec in zip(rows, seconds):
            row += [f"{sec:.4f}", f"{sec / seconds[0]:.2f}"]
    print("\n".join(format_table(header, rows, args.markdown)))
    note = f"measured by tools/benchmark.py on {machine_description()}"
    if args.speed:
        note += f"; speed: median of {args.rounds} interleaved forwards at batch 1, eval mode, {models[0].device}"
    print(f"\n{note}")


if __name__ == "__main__":
    main()
