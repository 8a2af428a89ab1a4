#!/usr/bin/env python
"""Side-by-side table of detection runs (e.g. ScaleNet vs its ResNet twin).

    python tools/compare.py output/demo/scalenet_tiny output/demo/resnet_tiny
    python tools/compare.py RUN_A RUN_B --markdown          # for papers and MODEL_ZOO.md

Each argument is an OUTPUT_DIR written by train_net.py: it reads eval_results.json (COCO
box AP, AP50, AP75, APs, APm, APl), run_info.json (backbone params and FLOPs, inference
s/image, peak memory, machine) and metrics.json (train s/iter). With exactly two runs a
column gives the difference, first minus second.
"""

import argparse
import os

from scalenet_d2.atomic import bytes_writer, write_atomically
from scalenet_d2.engine.run_record import RunRecordError, load_run
from scalenet_d2.utils.comparison import render


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="output directories of train_net.py")
    parser.add_argument("--names", nargs="+", help="column names (default: directory names)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.runs):
        parser.error(f"--names has {len(args.names)} names for {len(args.runs)} runs")
    try:
        runs = [load_run(d) for d in args.runs]
    except RunRecordError as e:
        parser.exit(2, f"compare.py: error: {e}\n")
    names = args.names or [os.path.basename(os.path.normpath(d)) for d in args.runs]
    text = render(runs, names, markdown=args.markdown)
    print(text)
    if args.output:
        write_atomically({args.output: bytes_writer((text + "\n").encode("utf-8"))})
    return text


if __name__ == "__main__":
    main()
