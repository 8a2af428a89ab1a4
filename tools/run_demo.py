#!/usr/bin/env python
"""The main demo: ScaleNet vs ResNet detection on the built-in synthetic dataset, on a CPU.

    python tools/run_demo.py            # the demo (minutes; see docs/training.md, "The main job")
    python tools/run_demo.py --quick    # smoke run: a few iterations on the tiny split

It generates the synthetic shapes once (cached, see scalenet_d2/data/synthetic.py), then
trains and evaluates a tiny ScaleNet-FPN and its ResNet twin from scratch with train_net.py,
one after the other, showing detectron2's progress lines (iteration, losses, ETA), and ends
with tools/compare.py's table and the trained backbones' speed at the demo's image size and at a
COCO-sized input (both also in OUTPUT/comparison.md), and pictures, named at the end:
OUTPUT/loss_curves.png (both runs' training loss), OUTPUT/ap_comparison.png and
OUTPUT/detections.png (validation images: ground truth and both models' detections).
OUTPUT is output/demo (output/demo_quick with --quick), or output/demo-2, -3, ... when that
exists: a run never replaces another's results.
"""

import argparse
import os
import time

import torch

from scalenet_d2.atomic import bytes_writer, write_atomically
from scalenet_d2.data.synthetic import ensure_split
from scalenet_d2.engine.run_record import load_run
from scalenet_d2.utils.comparison import format_table, render
from scalenet_d2.utils.demo_runs import fresh_output_dir, run_train_net
from scalenet_d2.utils.pictures import (
    draw_ground_truth,
    draw_predictions,
    load_predictor,
    plot_ap_comparison,
    plot_loss_curves,
    read_rgb,
    side_by_side,
)
from scalenet_d2.utils.profiling import eval_seconds, machine_description

# train_net.py and the configs sit beside tools/ in the project's checkout
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = (
    ("scalenet_tiny", "configs/Synthetic/faster_rcnn_Stiny_FPN.yaml"),
    ("resnet_tiny", "configs/Synthetic/faster_rcnn_Rtiny_FPN.yaml"),
)
QUICK_OPTS = [
    "DATASETS.TRAIN",
    '("synthetic_shapes_tiny_train",)',
    "DATASETS.TEST",
    '("synthetic_shapes_tiny_val",)',
    "SOLVER.MAX_ITER",
    "6",
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.STEPS",
    "()",
]
# the backbone speed rows: the demo's image size and an 800x1333 COCO image padded to a multiple of 32
SPEED_SIZES = ((160, 160), (800, 1344))


def backbone_speed_table(seconds, names, rounds, markdown=False):
    """The trained bodies' eval forward (`eval_seconds`) at the demo's image size and at a COCO-sized
    input, batch 1, against the twin: the detector's own inference time at 160x160 is mostly what
    is not the body."""
    header = ["backbone eval forward, batch 1", *(f"{n} s" for n in names), f"{names[0]} / {names[1]}"]
    rows = [
        [f"{h}x{w}{note}", *(f"{t:.4f}" for t in seconds[(h, w)]), f"{seconds[(h, w)][0] / seconds[(h, w)][1]:.2f}"]
        for (h, w), note in zip(SPEED_SIZES, (" (the demo's images)", " (a COCO image, padded)"))
    ]
    note = (
        f"median of {rounds} interleaved rounds after a warm-up, torch threads {torch.get_num_threads()}; "
        f"{machine_description()}"
    )
    return "\n".join(format_table(header, rows, markdown)) + "\n\n" + note


def make_pictures(out_dir, run_dirs, names, runs, predictors, split, images=4):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    loss = plot_loss_curves(run_dirs, names, os.path.join(out_dir, "loss_curves.png"))
    ap = plot_ap_comparison(runs, names, os.path.join(out_dir, "ap_comparison.png"))
    metadata = MetadataCatalog.get(split)
    rows = []
    for record in DatasetCatalog.get(split)[:images]:
        image = read_rgb(record["file_name"])
        rows.append([draw_ground_truth(record, metadata)] + [draw_predictions(p, image) for p in predictors])
    titles = ["ground truth"] + [f"{name} (score >= 0.5)" for name in names]
    detections = side_by_side(rows, titles, os.path.join(out_dir, "detections.png"))
    return loss, ap, detections


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", help="a new folder (default: output/demo, or output/demo_quick with --quick, or -2, -3, ...)"
    )
    parser.add_argument("--quick", action="store_true", help="a few iterations on the tiny split (smoke test)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch CPU threads per run (default 1: more threads than free cores slow these "
        "small models down many times over on a shared CPU)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides passed to both runs")
    args = parser.parse_args(argv)
    if args.output_dir and os.path.exists(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} exists: a run never replaces another's results")
    # a smoke run never replaces the results of a full one
    args.output_dir = args.output_dir or fresh_output_dir(
        os.path.join(REPO_ROOT, "output", "demo_quick" if args.quick else "demo")
    )
    print(f"output: {args.output_dir}", flush=True)

    start = time.time()
    splits = (
        ("synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val")
        if args.quick
        else ("synthetic_shapes_train", "synthetic_shapes_val")
    )
    print("synthetic shapes: generated on first use (about 30 s), then reused from the cache", flush=True)
    for split in splits:
        json_file, _ = ensure_split(split)
        print(f"dataset {split}: {os.path.dirname(json_file)}", flush=True)

    extra = (QUICK_OPTS if args.quick else []) + list(args.opts)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    run_dirs = [
        run_train_net(name, config, os.path.join(args.output_dir, name), extra, env, REPO_ROOT) for name, config in RUNS
    ]

    runs, names = [load_run(d) for d in run_dirs], [n for n, _ in RUNS]
    predictors = [
        load_predictor(os.path.join(d, "config.yaml"), os.path.join(d, "model_final.pth"), ["MODEL.DEVICE", "cpu"])
        for d in run_dirs
    ]
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 7
    print(f"\n=== ScaleNet vs ResNet on the synthetic shapes (total {time.time() - start:.0f} s)\n")
    seconds = eval_seconds([p.model.backbone.bottom_up for p in predictors], SPEED_SIZES, rounds)
    print(render(runs, names))
    print("\n" + backbone_speed_table(seconds, names, rounds))
    md = render(runs, names, markdown=True) + "\n\n" + backbone_speed_table(seconds, names, rounds, markdown=True)
    write_atomically({os.path.join(args.output_dir, "comparison.md"): bytes_writer((md + "\n").encode("utf-8"))})
    print(f"\n(Markdown version: {os.path.join(args.output_dir, 'comparison.md')})")
    print("\nPictures:")
    for path in make_pictures(args.output_dir, run_dirs, names, runs, predictors, splits[1]):
        print(f"  {path}")


if __name__ == "__main__":
    main()
