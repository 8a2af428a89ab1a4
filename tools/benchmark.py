#!/usr/bin/env python
"""Backbone params, FLOPs and (with --speed / --train-speed) speed and memory of detection configs.

    python tools/benchmark.py configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml \
        configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml --sizes 224x224 800x1344 --markdown

    python tools/benchmark.py configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml \
        configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml --sizes 224x224 --speed 160x160 800x1344 \
        --train-speed 512x768 --threads 1

Models are built without loading weights (they change neither params, FLOPs nor speed), on
the GPU when there is one. --speed and --train-speed run every model in one process, in
interleaved rounds, and give ratios to the first config (put the ResNet twin first to read
"ScaleNet / ResNet").
"backbone" is the bottom-up network (ScaleNet or ResNet, without FPN), the part in which
twins differ; FLOPs are counted by fvcore at batch 1, one fused multiply-add = one flop
(the convention of the ResNet and ScaleNet papers). 800x1344 is an 800x1333 COCO input
after detectron2 pads it to a multiple of 32.
"""

import argparse
import copy
import json
import os
import statistics
import sys

import torch

from scalenet_d2.atomic import bytes_writer, write_atomically
from scalenet_d2.engine import resolve_allocation
from scalenet_d2.utils.comparison import format_table
from scalenet_d2.utils.profiling import (
    backbone_stats,
    machine_description,
    peak_bytes,
    tensor_peak_bytes,
    tensor_peak_sites,
    time_interleaved,
)

REPORT = []  # every timed row, for --json


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 800x1344") from None
    return h, w


def config_model_cfg(config_file, opts=()):
    from detectron2.config import get_cfg

    from scalenet_d2.config import add_scalenet_config

    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def config_model(config_file, opts=(), with_cfg=False):
    from detectron2.modeling import build_model

    cfg = config_model_cfg(config_file, opts)
    resolve_allocation(cfg)
    model = build_model(cfg).eval()
    return (model, cfg) if with_cfg else model


def inference_runs(model, size, compile_fair, batch=1, amp=False):
    """(label, callable) of each way to run a model's bottom-up backbone in eval on `batch` images
    (with amp, under autocast): "shipped" as users run it by default (ScaleNet: MODEL.SCALENET.FAST_PATH
    "auto"; ResNet: as built), "on" (ScaleNet with every exact rewrite, FAST_PATH "on"),
    "fair" with the same execution settings on both (norms folded into the convs, channels_last,
    oneDNN's conv kernel on CPU: ScaleNet's default path, profiling.folded_resnet for ResNet),
    "plain" (ScaleNet's plain forward) and, with --compile, "fair, torch.compile"."""
    from scalenet_d2.modeling.scalenet import ScaleNet, set_fast_path
    from scalenet_d2.utils.profiling import autocast, folded_resnet

    body = getattr(model.backbone, "bottom_up", model.backbone)
    device = next(body.parameters()).device
    x = torch.randn(batch, 3, *size, device=device)
    x_last = x.contiguous(memory_format=torch.channels_last)
    scalenet = isinstance(body, ScaleNet)
    # ScaleNet "on": every rewrite on every device and input size, as folded_resnet is for ResNet
    fair = (set_fast_path(copy.deepcopy(body), "on") if scalenet else folded_resnet(body)).to(
        memory_format=torch.channels_last
    )
    runs = [("shipped", body, x), ("fair", fair, x_last)]
    if scalenet:
        runs.append(("on", set_fast_path(copy.deepcopy(body), "on"), x))
        runs.append(("plain", set_fast_path(copy.deepcopy(body), "off"), x))
    if compile_fair:
        runs.append(("fair, torch.compile", torch.compile(fair), x_last))

    def call(module, inputs):
        def run():
            with autocast(device, amp):
                return module(inputs)

        return run

    return [(label, call(module, inputs)) for label, module, inputs in runs]


def training_runs(config_file, opts, size, batch_size, amp=False):
    """(label, callable, held bytes) of a whole detector's training step (forward, backward, and
    the config's SGD; with amp, as AMPTrainer) on `batch_size` synthetic images of `size`: "shipped"
    as built, "fair" (model in channels_last, the execution setting both families can share in
    training) and, for ScaleNet, "on" and "plain" (MODEL.SCALENET.FAST_PATH on / off)."""
    from detectron2.solver import build_optimizer

    from scalenet_d2.utils.profiling import damp_norms, held_bytes, synthetic_detection_batch, training_step

    runs = []
    variants = [("shipped", torch.contiguous_format, []), ("fair", torch.channels_last, [])]
    if "SCALENET" in config_model_cfg(config_file, opts).MODEL.BACKBONE.NAME.upper():
        variants += [(mode, torch.contiguous_format, ["MODEL.SCALENET.FAST_PATH", mode]) for mode in ("on", "off")]
    for label, memory_format, extra in variants:
        label = "plain" if label == "off" else label
        model, cfg = config_model(config_file, list(opts) + extra, with_cfg=True)
        damp_norms(model).to(memory_format=memory_format).train()  # untrained: keep features finite
        optimizer = build_optimizer(cfg, model)
        for group in optimizer.param_groups:  # the first warm-up iteration's: repeated steps on one batch stay finite
            group["lr"] *= cfg.SOLVER.WARMUP_FACTOR
        batch = synthetic_detection_batch(batch_size, *size, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        step = training_step(model, optimizer, batch, amp)
        step()  # creates the gradients and momentum buffers, held from then on
        runs.append((label, step, held_bytes(model, optimizer)))
    return runs


def print_runs(args, title, runs_per_config, held_per_run, device):
    """One table: median and spread of each run's seconds, its peak memory, and ratios to the
    first config's run of the same label and to its shipped run. On CPU, two peaks: the resident
    set and the tensors' own bytes."""
    labels = [(os.path.relpath(config), label) for config, runs in runs_per_config for label, _ in runs]
    calls = [run for _, runs in runs_per_config for _, run in runs]
    seconds = time_interleaved(calls, args.rounds, device)
    measures = [peak_bytes] + ([tensor_peak_bytes] if device.type == "cpu" else [])
    peaks = [
        [
            float("nan") if peak is None else peak / 2**20
            for peak in (measure(run, device, held) for measure in measures)
        ]
        for run, held in zip(calls, held_per_run)
    ]
    twin = {
        label: (statistics.median(t), peak)
        for (config, label), t, peak in zip(labels, seconds, peaks)
        if config == labels[0][0]
    }
    header = ["config", "run", "median s", "min-max s", "/ twin, same run", "/ twin shipped"]
    header += ["peak RSS MiB", "RSS / twin, same run", "tensor peak MiB", "tensors / twin, same run"]
    if device.type != "cpu":
        header[6:] = ["peak MiB", "peak / twin, same run"]
    header.append("held MiB")
    rows = []
    for (config, label), t, peak, held in zip(labels, seconds, peaks, held_per_run):
        # ResNet has one forward: ScaleNet's "on" and "plain" rows compare with it as shipped
        twin_time, twin_peak = twin.get(label, twin["shipped"])
        median = statistics.median(t)
        row = [
            config,
            label,
            f"{median:.4f}",
            f"{min(t):.4f}-{max(t):.4f}",
            f"{median / twin_time:.3f}",
            f"{median / twin['shipped'][0]:.3f}",
        ]
        for ours, theirs in zip(peak, twin_peak):
            row += [f"{ours:.1f}", f"{ours / theirs:.3f}"]
        rows.append(row + [f"{held / 2**20:.1f}"])
        REPORT.append({"table": title, **dict(zip(header, rows[-1])), "seconds": t})
    print(f"\n{title}\n")
    print("\n".join(format_table(header, rows, args.markdown)))
    if args.peak_sites:
        for (config, label), run in zip(labels, calls):
            peak, op, alive = tensor_peak_sites(run)
            print(
                f"\n{config} {label}: {peak / 2**20:.1f} MiB of tensors made in the call at the peak, at {op}; alive:"
            )
            print("\n".join(f"    {size / 2**20:8.1f} MiB  {what}" for size, what in alive))


def print_speed(args, models):
    device = next(models[0].parameters()).device
    for size in args.speed or []:
        runs_per_config, held = [], []
        for config, model in zip(args.configs, models):
            runs = inference_runs(model, size, args.compile, args.batch, args.amp)
            runs_per_config.append((config, runs))
            body = getattr(model.backbone, "bottom_up", model.backbone)
            held += [sum(p.numel() * p.element_size() for p in body.parameters())] * len(runs)
        h, w = size
        with torch.no_grad():
            amp = ", AMP" if args.amp else ""
            title = f"Backbone inference: eval forward of the bottom-up network, batch {args.batch} at {h}x{w}{amp}"
            print_runs(args, title, runs_per_config, held, device)
    if args.train_speed:
        runs_per_config, held = [], []
        for config in args.configs:
            runs = training_runs(config, args.opts, args.train_speed, args.train_batch, args.amp)
            runs_per_config.append((config, [(label, step) for label, step, _ in runs]))
            held += [bytes_held for _, _, bytes_held in runs]
        h, w = args.train_speed
        title = (
            f"Detector training step: forward, backward and SGD of the whole model, batch {args.train_batch} at {h}x{w}"
            + (", AMP" if args.amp else "")
        )
        print_runs(args, title, runs_per_config, held, device)
    print(
        f"\n{device}, {args.rounds} interleaved rounds after one warm-up, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}. Ratios are to the first config (the twin): to its run of the same name, else "
        "(ScaleNet's on and plain, which ResNet has not) to its shipped run. Peaks: memory at its highest during "
        "one more, untimed, call, with what is held between calls (held: weights; in training also gradients and SGD "
        "momentum); GPU: "
        "torch.cuda.max_memory_allocated; CPU: the resident set (RSS, what the C allocator holds too) and the "
        "tensors' own bytes (from the profiler's allocation records)."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config files")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(224, 224), (800, 1344)], help="HxW inputs")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--speed",
        type=parse_size,
        nargs="+",
        metavar="HxW",
        help="also time each backbone's eval forward at these inputs (shipped, fair, on, plain), with peak memory",
    )
    parser.add_argument(
        "--train-speed",
        type=parse_size,
        metavar="HxW",
        help="also time a training step of each whole detector on images of this size (shipped, fair), "
        "with peak memory",
    )
    parser.add_argument("--train-batch", type=int, default=2, help="images per training step for --train-speed")
    parser.add_argument("--batch", type=int, default=1, help="images per eval forward for --speed")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="run --speed / --train-speed under autocast (float16 on CUDA, bfloat16 on CPU)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every timed row to this JSON file (a new file)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows to --speed (slow to compile)")
    parser.add_argument(
        "--peak-sites",
        action="store_true",
        help="after each table, where each run's tensor peak is: the op, and the largest tensors alive then with "
        "their call sites in scalenet_d2",
    )
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per run for --speed / --train-speed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1, as MODEL_ZOO.md's CPU figures)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every config")
    args = parser.parse_args(argv)
    if args.json and os.path.exists(args.json):
        parser.error(f"--json {args.json}: the file exists; name a new one (a report is never replaced)")
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
        models.append(model)
    print("\n".join(format_table(header, rows, args.markdown)))
    print(f"\nmeasured by tools/benchmark.py on {machine_description()}")
    if args.speed or args.train_speed:
        print_speed(args, models)
    if args.json:
        report = {"machine": machine_description(), "argv": sys.argv[1:], "rows": REPORT}
        write_atomically({args.json: bytes_writer((json.dumps(report, indent=2) + "\n").encode())})


if __name__ == "__main__":
    main()
