"""Tables: detection runs side by side (tools/compare.py, tools/run_demo.py) and benchmark rows."""

import math
import os
from typing import Dict, List, Sequence

__all__ = [
    "AP_KEYS",
    "build_rows",
    "format_table",
    "render",
    "TWIN_KEYS",
    "RUN_KEYS",
    "ComparisonError",
    "check_together",
    "check_distinct",
    "PRIMARY_METRICS",
    "render_arms",
]

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
    if any(r.get("mask") for r in runs):
        for key in AP_KEYS:
            rows.append((f"mask {key}", [r["mask"].get(key) for r in runs], 1))
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
    test_sizes = {_test_size(r) for r in runs}
    size = f" at test size {test_sizes.pop()}" if len(test_sizes) == 1 and None not in test_sizes else ""
    rows.append((f"inference s/image (whole detector{size})", [r["inference_s_per_image"] for r in runs], 4))
    kinds = {r["peak_memory_kind"] for r in runs if r["peak_memory_kind"]}
    mem_label = "peak memory (MB)" + (f" [{kinds.pop()}]" if len(kinds) == 1 else "")
    rows.append((mem_label, [r["peak_memory_mb"] for r in runs], 0))
    return rows


def _test_size(run):
    """detectron2's test resize of a run, as "shorter side/longest side" (e.g. 800/1333); None where unknown."""
    cfg = run.get("cfg") or {}
    shorter, longest = cfg.get("INPUT.MIN_SIZE_TEST"), cfg.get("INPUT.MAX_SIZE_TEST")
    return None if shorter is None or longest is None else f"{shorter}/{longest}"


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
            numeric = digits is not None and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b))
            cells.append(_fmt(a - b, digits) if numeric else "")
        table.append([str(c) for c in cells])

    lines = format_table(header, table, markdown)
    notes = []
    datasets = {", ".join(r["datasets"]) for r in runs}
    if len(datasets) == 1:
        kinds = "box and mask" if any(r.get("mask") for r in runs) else "box"
        notes.append(f"COCO {kinds} metrics in % on: {datasets.pop() or '?'}")
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


# -- several runs per arm ---------------------------------------------------------------------

# keys in which two arms may differ (the backbone: tests/test_configs.py checks the twins), and
# those in which any two runs may (where a run is written, with which seed, on which device)
TWIN_KEYS = ("MODEL.BACKBONE.NAME", "MODEL.RESNETS.", "MODEL.SCALENET.", "MODEL.WEIGHTS")
RUN_KEYS = ("OUTPUT_DIR", "SEED", "MODEL.DEVICE", "DATALOADER.NUM_WORKERS")

ARM_METRICS = [(f"box {key}", (lambda r, key=key: r["box"].get(key)), 2) for key in AP_KEYS]
MASK_METRICS = [(f"mask {key}", (lambda r, key=key: r.get("mask", {}).get(key)), 2) for key in AP_KEYS]
ARM_METRICS += [
    ("train s/iter", lambda r: r["train_s_per_iter"], 3),
    ("inference s/image", lambda r: r["inference_s_per_image"], 4),
    ("peak memory (MB)", lambda r: r["peak_memory_mb"], 0),
]


class ComparisonError(ValueError):
    """Runs that cannot be compared; the message names them and the keys in which they differ."""


def _differing(a: dict, b: dict, allowed: Sequence[str]) -> List[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not k.startswith(tuple(allowed))]


def check_together(arms: Dict[str, List[dict]]) -> List[str]:
    """Raises ComparisonError where runs do not belong together: within an arm, their configs
    may differ only in RUN_KEYS (the seed, ...); between arms, also in TWIN_KEYS (the backbone).
    Returns notes on what could not be checked (runs without a config.yaml)."""
    check_distinct(arms)
    evaluation_notes = check_evaluations(arms)
    unchecked = [r["dir"] for runs in arms.values() for r in runs if r.get("cfg") is None]
    notes = evaluation_notes + (
        [f"not checked to be one recipe (no config.yaml): {', '.join(unchecked)}"] if unchecked else []
    )
    arms = {name: [r for r in runs if r.get("cfg") is not None] for name, runs in arms.items()}
    arms = {name: runs for name, runs in arms.items() if runs}
    if not arms:
        return notes
    reference = next(iter(arms.values()))[0]
    for name, runs in arms.items():
        for run in runs:
            for other, allowed, expected in (
                (runs[0], RUN_KEYS, f"the config of arm {name}'s first run, but for the seed"),
                (
                    reference,
                    RUN_KEYS + TWIN_KEYS,
                    f"the first arm's config, but for the seed and {', '.join(TWIN_KEYS)}",
                ),
            ):
                keys = _differing(other["cfg"], run["cfg"], allowed)
                if keys:
                    shown = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                    first = f"{keys[0]}: {other['cfg'].get(keys[0])!r} vs {run['cfg'].get(keys[0])!r}"
                    raise ComparisonError(
                        f"{run['dir']} and {other['dir']} are not one recipe: they differ in {shown} ({first}); "
                        f"expected {expected}"
                    )
    return notes


# what an evaluation evaluated (run_record.evaluation_record) that must be alike for results to be compared
EVALUATION_KEYS = ("datasets", "images", "test_size")


def check_evaluations(arms: Dict[str, List[dict]]) -> List[str]:
    """Raises ComparisonError where runs' results are not of alike evaluations: a run whose
    evaluation was of other weights than its own final model (an --eval-only into its folder), or
    runs evaluated on other test sets, image counts or test sizes. Returns notes on runs whose
    record predates these fields."""
    runs = [r for rs in arms.values() for r in rs]
    unrecorded = [r["dir"] for r in runs if not r.get("evaluation")]
    recorded = [r for r in runs if r.get("evaluation")]
    for run in recorded:
        weights = run["evaluation"].get("weights")
        if weights != "model_final.pth":  # recorded relative to the run's folder where it is in it
            raise ComparisonError(
                f'{run["dir"]}: its results evaluate {weights!r} (field "weights" of eval_results.json), not '
                f"the run's own model_final.pth; evaluate that, or compare the folder --eval-only wrote"
            )
    for run in recorded[1:]:
        for key in EVALUATION_KEYS:
            if run["evaluation"].get(key) != recorded[0]["evaluation"].get(key):
                raise ComparisonError(
                    f"{run['dir']} and {recorded[0]['dir']} were evaluated differently: field {key!r} of "
                    f"eval_results.json is {run['evaluation'].get(key)!r} vs {recorded[0]['evaluation'].get(key)!r}"
                )
    if unrecorded:
        return [f"not checked to be alike evaluations (older records): {', '.join(unrecorded)}"]
    return []


def check_distinct(arms: Dict[str, List[dict]]) -> None:
    """Raises ComparisonError where a run would count twice: a folder given twice (in one arm or
    two), or two runs of one arm with the same fixed seed, which repeat one run rather than sample
    training randomness."""
    seen = {}
    for name, runs in arms.items():
        for run in runs:
            key = os.path.realpath(run["dir"])
            if key in seen:
                raise ComparisonError(
                    f"{run['dir']} is given twice (arms {seen[key]} and {name}): each run may count once"
                )
            seen[key] = name
        seeds = [r.get("seed") for r in runs if isinstance(r.get("seed"), int) and r.get("seed") >= 0]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            dirs = [r["dir"] for r in runs if r.get("seed") == repeated[0]]
            raise ComparisonError(
                f"arm {name}: SEED {repeated[0]} is repeated ({', '.join(dirs)}): runs of one arm must have "
                "different seeds, else they count one run's result twice"
            )


def _paired(first: List[dict], second: List[dict]) -> bool:
    """Both arms ran the same seeds, each once, all fixed (SEED >= 0)."""
    seeds = [[r.get("seed") for r in runs] for runs in (first, second)]
    fixed_and_distinct = all(all(isinstance(x, int) and x >= 0 for x in s) and len(set(s)) == len(s) for s in seeds)
    return fixed_and_distinct and set(seeds[0]) == set(seeds[1])


def _cell(values, digits) -> str:
    from .statistics import finite_values, summarize

    summary, (_, non_finite) = summarize(values), finite_values(values)
    missing = f"; {non_finite} not finite" if non_finite else ""
    if summary is None:
        return f"-{missing}" if missing else "-"
    if isinstance(digits, int) and summary.sd is not None:
        digits = _digits(digits, summary.sd)  # a spread is not shown as 0 where it is not
    spread = f" ± {_fmt(summary.sd, digits)}" if summary.sd is not None else ""
    return f"{_fmt(summary.mean, digits)}{spread} (n={summary.n}{missing})"


def _digits(digits: int, *values: float) -> int:
    """At least `digits` decimals, more where a non-zero value would round to 0 (so that no sign
    is rounded away: 0.0043 is not printed as 0.00), at most 6."""
    while digits < 6 and any(v != 0 and round(abs(v), digits) == 0 for v in values):
        digits += 1
    return digits


def render_arms(arms: Dict[str, List[dict]], markdown: bool = False) -> str:
    """Per metric, each arm's mean ± standard deviation (n); the difference of the first arm and
    each other one with its 95% interval (statistics.py), and a sentence for the primary metrics
    (PRIMARY_METRICS). With one run per arm, the table of `render` and a note that no spread is known."""
    from .statistics import difference

    notes = check_together(arms)
    names = list(arms)
    if all(len(runs) == 1 for runs in arms.values()):
        text = render([runs[0] for runs in arms.values()], names, markdown)
        return text + ("\n\n" if markdown else "\n") + "\n".join(notes + [_NO_SPREAD])
    others = names[1:]  # differences: the first arm against each other one
    paired = {k: _paired(arms[names[0]], arms[k]) for k in others}
    header = [""] + [f"{name} mean ± sd (n)" for name in names]
    for k in others:
        header += [f"diff ({names[0]} - {k})", "95% interval", "method"]
    table, sentences = [], []
    with_masks = any(r.get("mask") for runs in arms.values() for r in runs)
    metrics = ARM_METRICS[: len(AP_KEYS)] + (MASK_METRICS if with_masks else []) + ARM_METRICS[len(AP_KEYS) :]
    for label, value, digits in metrics:
        per_arm = [[value(r) for r in runs] for runs in arms.values()]
        exploratory = label.startswith(("box ", "mask ")) and label not in PRIMARY_METRICS
        row = [label + (" (exploratory)" if exploratory else "")] + [_cell(values, digits) for values in per_arm]
        for k in others:
            pair = (names[0], k)
            keyed = [
                {
                    (r.get("seed") if paired[k] else i): v
                    for i, (r, v) in enumerate(zip(arms[name], per_arm[names.index(name)]))
                }
                for name in pair
            ]
            diff = difference(*keyed, paired=paired[k])
            if diff is None:
                few = "runs" if all(len(arms[name]) < 2 for name in pair) else "finite values"
                row += ["-", "-", f"no spread known (an arm has < 2 {few})"]
            elif not diff.spread_observed:
                d = _digits(digits, diff.mean)
                row += [f"{diff.mean:+.{d}f}", "-", f"no spread observed ({diff.method}): no interval"]
            else:
                d = _digits(digits, diff.mean, diff.low, diff.high)
                row += [f"{diff.mean:+.{d}f}", f"[{diff.low:+.{d}f}, {diff.high:+.{d}f}]", diff.method]
            if label in PRIMARY_METRICS:
                sentences.append(_sentence(label, pair, diff))
        table.append(row)
    kinds = "box and mask" if with_masks else "box"
    notes.append(
        f"COCO {kinds} metrics in % on: {', '.join(sorted({', '.join(r['datasets']) for rs in arms.values() for r in rs}))}"
    )
    notes.append(
        "sd = sample standard deviation over an arm's finite values (seeds); interval: 95%, Student's t. The "
        "intervals cover training randomness (the seeds) on fixed evaluation images, not another choice of images."
    )
    if others:
        primary = " and ".join(m for m in PRIMARY_METRICS if with_masks or m.startswith("box"))
        notes.append(
            f"Primary metric: {primary}; the other AP rows are exploratory. Tested together, six metrics with no true "
            "difference show at least one interval without 0 in about a quarter of studies, so only the primary "
            "metric gets a verdict."
        )
    if len(others) > 1:
        notes.append(
            f"{len(others)} comparisons with {names[0]}: each interval holds at 95% on its own; the chance that at "
            "least one of them misses its true difference is higher."
        )
    machines = {name: sorted({r["machine"] for r in runs}) for name, runs in arms.items()}
    if len({m for ms in machines.values() for m in ms}) > 1:
        notes.append(
            "the runs ran on different machines, so their timings are not comparable: "
            + "; ".join(f"{name}: {', '.join(ms)}" for name, ms in machines.items())
        )
    lines = format_table(header, table, markdown)
    return "\n".join(lines) + "\n\n" + ("\n\n" if markdown else "\n").join(sentences + notes)


_NO_SPREAD = (
    "One run per arm: no spread is known. COCO box AP moves by about 0.2-0.3 between identical runs, so a "
    "difference of that size cannot be told apart; run several seeds and pass them as --arm NAME DIR DIR ..."
)


# the metric that gets a verdict (a sentence): one per task, the others are exploratory
PRIMARY_METRICS = ("box AP", "mask AP")


def _sentence(label: str, names: Sequence[str], diff) -> str:
    if diff is None:
        return f"{label}: no spread is known (an arm has fewer than 2 finite values), so no difference can be shown."
    if not diff.spread_observed:
        return (
            f"{label}: every run gave the same difference ({diff.mean:+.{_digits(2, diff.mean)}f}): no spread "
            "observed, so these runs cannot show whether another seed would differ; run more seeds."
        )
    d = _digits(2, diff.mean, diff.low, diff.high)
    interval = f"[{diff.low:+.{d}f}, {diff.high:+.{d}f}]"
    if diff.includes_zero:
        return (
            f"{label}: the 95% interval of {names[0]} - {names[1]}, {interval}, includes 0: these runs do not "
            f"show a difference in {label} ({diff.method})."
        )
    better = names[0] if diff.mean > 0 else names[1]
    return f"{label}: {better} is higher by {abs(diff.mean):.{d}f} points, 95% interval {interval} ({diff.method})."
