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
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalenet_d2.engine import train_seconds_per_iter  # noqa: E402

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class RunError(RuntimeError):
    pass


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _box_metrics(results):
    """The bbox metrics of the first test set; eval_results.json holds one set or several."""
    if "bbox" in results:
        return results["bbox"]
    for value in results.values():
        if isinstance(value, dict) and "bbox" in value:
            return value["bbox"]
    return {}


def load_run(run_dir):
    """Everything the table needs from one output directory."""
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: not a directory (expected a train_net.py OUTPUT_DIR)")
    info_path = os.path.join(run_dir, "run_info.json")
    eval_path = os.path.join(run_dir, "eval_results.json")
    if not os.path.isfile(info_path) and not os.path.isfile(eval_path):
        raise RunError(
            f"{run_dir}: has neither run_info.json nor eval_results.json; "
            "is it an OUTPUT_DIR of train_net.py (written when a run or --eval-only finishes)?"
        )
    info = _read_json(info_path) if os.path.isfile(info_path) else {}
    evals = _read_json(eval_path) if os.path.isfile(eval_path) else {}
    run = {
        "dir": run_dir,
        "config": os.path.basename(info.get("config_file", "")) or "?",
        "backbone": info.get("backbone_arch") or info.get("backbone", "?"),
        "box": _box_metrics(evals.get("results", {})),
        "datasets": evals.get("datasets", []),
        "params": info.get("backbone_params"),
        "flops": info.get("backbone_flops", {}),
        "train_s_per_iter": info.get("train_s_per_iter") or train_seconds_per_iter(run_dir)[0],
        "ims_per_batch": info.get("ims_per_batch"),
        "num_processes": info.get("num_processes"),
        "inference_s_per_image": info.get("inference_s_per_image"),
        "peak_memory_mb": info.get("train_peak_memory_mb", info.get("eval_peak_memory_mb")),
        "peak_memory_kind": info.get("train_peak_memory_kind", info.get("eval_peak_memory_kind")),
        "machine": info.get("machine", "?"),
    }
    return run


def _fmt(value, digits):
    """digits: decimals, or "g" for 4 significant digits (sizes that span 0.1M to 100M)."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if digits == "g":
        return f"{value:.4g}"
    return f"{value:.{digits}f}"


def build_rows(runs):
    """[(label, [value per run], digits)] with numbers kept numeric for the difference column."""
    rows = [("config", [r["config"] for r in runs], None), ("backbone", [r["backbone"] for r in runs], None)]
    for key in AP_KEYS:
        rows.append((f"box {key}", [r["box"].get(key) for r in runs], 1))
    rows.append(("backbone params (M)", [r["params"] / 1e6 if r["params"] else None for r in runs], "g"))
    sizes = []
    for r in runs:
        sizes += [s for s in r["flops"] if s not in sizes]
    for size in sizes:
        rows.append((f"backbone GFLOPs @{size}", [r["flops"].get(size) / 1e9 if r["flops"].get(size) else None for r in runs], "g"))
    batch = {(r["ims_per_batch"], r["num_processes"]) for r in runs}
    label = "train s/iter"
    if len(batch) == 1 and None not in next(iter(batch)):
        ims, procs = next(iter(batch))
        label += f" ({ims} img/iter, {procs} proc)"
    rows.append((label, [r["train_s_per_iter"] for r in runs], 3))
    rows.append(("inference s/image", [r["inference_s_per_image"] for r in runs], 4))
    kinds = {r["peak_memory_kind"] for r in runs if r["peak_memory_kind"]}
    mem_label = "peak memory (MB)" + (f" [{kinds.pop()}]" if len(kinds) == 1 else "")
    rows.append((mem_label, [r["peak_memory_mb"] for r in runs], 0))
    return rows


def format_table(header, rows, markdown=False):
    """Lines of a table of strings: Markdown, or plain text with the first column left-aligned
    and the others right-aligned. Also used by tools/benchmark.py."""
    if markdown:
        return [
            "| " + " | ".join(header) + " |",
            "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(row) + " |" for row in rows),
        ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt_row(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt_row(header), "  ".join("-" * w for w in widths), *map(fmt_row, rows)]


def render(runs, names, markdown=False):
    rows = build_rows(runs)
    header = ["", *names]
    diff = len(runs) == 2
    if diff:
        header.append(f"diff ({names[0]} - {names[1]})")
    table = []
    for label, values, digits in rows:
        cells = [label] + [v if digits is None else _fmt(v, digits) for v in values]
        if diff:
            a, b = values
            numeric = digits is not None and all(isinstance(v, (int, float)) for v in (a, b))
            cells.append(_fmt(a - b, digits) if numeric else "")
        table.append([str(c) for c in cells])

    lines = format_table(header, table, markdown)
    notes = []
    datasets = {", ".join(r["datasets"]) for r in runs}
    if len(datasets) == 1:
        notes.append(f"COCO box metrics in % on: {datasets.pop() or '?'}")
    machines = {r["machine"] for r in runs}
    if len(machines) == 1:
        notes.append(f"machine: {machines.pop()}")
    else:
        notes += [f"machine of {n}: {r['machine']}" for n, r in zip(names, runs)]
    notes.append(
        "backbone = the bottom-up network without FPN; FLOPs by fvcore at batch 1, "
        "1 fused multiply-add = 1 flop; train s/iter = median of detectron2's per-iteration time."
    )
    # Markdown: one paragraph per note (a single newline would join them).
    return "\n".join(lines) + "\n\n" + ("\n\n" if markdown else "\n").join(notes)


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
    except RunError as e:
        parser.exit(2, f"compare.py: error: {e}\n")
    names = args.names or [os.path.basename(os.path.normpath(d)) for d in args.runs]
    text = render(runs, names, markdown=args.markdown)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
