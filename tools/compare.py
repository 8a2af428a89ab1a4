#!/usr/bin/env python
"""Compare detection runs (e.g. ScaleNet against its ResNet twin): one run per column, or arms
of several runs (seeds) with mean, spread and the difference's 95% interval.

    python tools/compare.py output/demo/scalenet_tiny output/demo/resnet_tiny
    python tools/compare.py RUN_A RUN_B --markdown          # for papers and MODEL_ZOO.md
    python tools/compare.py --arm ScaleNet-50 out/S50_s1 out/S50_s2 out/S50_s3 \\
                            --arm ResNet-50 out/R50_s1 out/R50_s2 out/R50_s3 --plot ap.png

Each OUTPUT_DIR is one written by train_net.py: it reads eval_results.json (COCO box AP, AP50,
AP75, APs, APm, APl), run_info.json (backbone params and FLOPs, inference s/image, peak memory,
machine), metrics.json (train s/iter) and config.yaml (the seed; runs whose configs differ
beyond the seed, and between arms beyond the backbone keys, are refused, naming the keys).

One run per column: with exactly two, a column gives the difference, first minus second. Arms:
per metric each arm's mean ± standard deviation (n); for two arms the difference of the means
with its 95% interval, paired by seed where both arms ran the same fixed seeds (SEED >= 0),
else Welch's t; and a sentence for the primary metric (box AP, and mask AP) saying whether the
interval includes 0; the other AP rows are exploratory. Non-finite values are counted apart, a
folder given twice, a repeated seed and runs evaluated differently are refused
(docs/training.md, "Comparing runs").
"""

import argparse
import os

from scalenet_d2.atomic import bytes_writer, write_atomically
from scalenet_d2.engine.run_record import RunRecordError, load_run
from scalenet_d2.utils.comparison import ComparisonError, render_arms
from scalenet_d2.utils.pictures import PictureError, plot_arm_spread


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="OUTPUT_DIR", help="output directories of train_net.py, one per arm")
    parser.add_argument(
        "--arm", nargs="+", action="append", metavar=("NAME", "OUTPUT_DIR"), help="an arm: its name and its runs"
    )
    parser.add_argument("--names", nargs="+", help="column names of the OUTPUT_DIR runs (default: directory names)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--output", help="also write the table to this file")
    parser.add_argument("--plot", metavar="PNG", help="draw box AP per arm: each run, each arm's mean and interval")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.arm):
        parser.error("give OUTPUT_DIR runs, or --arm NAME OUTPUT_DIR [OUTPUT_DIR ...] at least twice, not both")
    if args.arm:
        short = [arm[0] for arm in args.arm if len(arm) < 2]
        if short:
            parser.error(f"--arm {short[0]}: expected a name, then at least one OUTPUT_DIR")
        dirs = {arm[0]: arm[1:] for arm in args.arm}
        if len(dirs) < len(args.arm):
            parser.error("--arm: two arms have the same name")
    else:
        if args.names and len(args.names) != len(args.runs):
            parser.error(f"--names has {len(args.names)} names for {len(args.runs)} runs")
        names = args.names or [os.path.basename(os.path.normpath(d)) for d in args.runs]
        dirs = {name: [d] for name, d in zip(names, args.runs)}
    try:
        arms = {name: [load_run(d) for d in runs] for name, runs in dirs.items()}
        text = render_arms(arms, markdown=args.markdown)
        if args.plot:
            plot_arm_spread(arms, args.plot)
    except (RunRecordError, ComparisonError, PictureError) as e:
        parser.exit(2, f"compare.py: error: {e}\n")
    print(text)
    if args.output:
        write_atomically({args.output: bytes_writer((text + "\n").encode("utf-8"))})
    if args.plot:
        print(f"Wrote {args.plot}")
    return text


if __name__ == "__main__":
    main()
