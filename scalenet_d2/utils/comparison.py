"""Tables: detection runs side by side (tools/compare.py, tools/run_demo.py) and benchmark rows."""

import math

__all__ = ["AP_KEYS", "build_rows", "format_table", "render"]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
        rows.append(
            (
                f"backbone GFLOPs @{size}",
                [r["flops"].get(size) / 1e9 if r["flops"].get(size) else None for r in runs],
                "g",
            )
        )
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
    and the others right-aligned."""
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
