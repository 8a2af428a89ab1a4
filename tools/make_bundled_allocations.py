#!/usr/bin/env python
"""Write scalenet_d2/allocations/*.json, the bundled allocations, reproducibly.

The four published allocations are read from the published row-format files (the
authors' release, not part of this repository), checked against the per-stage widths the
paper's release implies (every block of a stage has the same c1+c2+c4+c7), and written in
the project format with their provenance. The tiny allocation is hand-made.

    python tools/make_bundled_allocations.py --published-dir ../shared/reference/allocations
    python tools/make_bundled_allocations.py --published-dir ... --check   # files up to date?
"""

import argparse
import sys
from pathlib import Path

from scalenet_d2.modeling.allocation import BUNDLED_DIR, Allocation, StageAllocation, load_allocation

PAPER = (
    'Y. Li, Z. Kuang, Y. Chen, W. Zhang, "Data-Driven Neuron Allocation for Scale Aggregation '
    'Networks", CVPR 2019 (arXiv:1904.09460)'
)

# name: (c1+c2+c4+c7 of every block of res2..res5, ImageNet top-1/top-5 error of the release)
PUBLISHED = {
    "scalenet50": ((88, 175, 349, 697), (22.02, 6.05)),
    "scalenet50_light": ((64, 128, 256, 512), (22.80, 6.57)),
    "scalenet101": ((86, 171, 341, 682), (20.82, 5.42)),
    "scalenet152": ((90, 179, 358, 715), (20.06, 5.18)),
}


def published_allocation(published_dir: Path, name: str) -> Allocation:
    path = published_dir / f"{name}.json"
    rows = load_allocation(str(path))  # the published row format, validated
    stage_sums, (top1, top5) = PUBLISHED[name]
    for stage, expected in zip(rows.stages, stage_sums):
        for b, widths in enumerate(stage.blocks):
            if sum(widths) != expected:
                raise SystemExit(
                    f"{path}: block {stage.name}.{b} widths {widths} sum to {sum(widths)}; expected {expected}"
                )
    return Allocation(
        name=name,
        stem_channels=rows.stem_channels,
        stages=rows.stages,
        provenance={
            "source": PAPER,
            "published_file": path.name,
            "note": (
                "Widths and sides transcribed unchanged from the allocation file of the authors' public "
                "ScaleNet release (row format [c1, c2, c4, c7, side]) by tools/make_bundled_allocations.py. "
                "Stem 64 and planes 64/128/256/512 are those of ResNet, as in the release."
            ),
            "stage_width_sums": list(stage_sums),
            "imagenet_error_top1_top5": [top1, top5],
        },
    )


def tiny_allocation() -> Allocation:
    # One block per stage, every scale present (so res5's scale-7 branch is 1x1), widths
    # summing to planes: a ScaleNet small enough for tests and the CPU demo.
    stages = tuple(
        StageAllocation(name, planes, side, ((planes // 2, planes // 4, planes // 8, planes // 8),))
        for name, planes, side in zip(("res2", "res3", "res4", "res5"), (8, 16, 32, 64), (56, 28, 14, 7))
    )
    return Allocation(
        name="scalenet_tiny",
        stem_channels=16,
        stages=stages,
        provenance={"source": "hand-made for tests and the CPU demo", "note": "not a published network"},
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published-dir", type=Path, required=True, help="folder of the published allocation files")
    parser.add_argument("--out-dir", type=Path, default=BUNDLED_DIR)
    parser.add_argument("--check", action="store_true", help="only check that the files in --out-dir are up to date")
    args = parser.parse_args(argv)

    allocations = [published_allocation(args.published_dir, name) for name in PUBLISHED] + [tiny_allocation()]
    stale = []
    for allocation in allocations:
        path = args.out_dir / f"{allocation.name}.json"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != allocation.to_json():
                stale.append(str(path))
        else:
            allocation.save(path)
            print(f"wrote {path}: depth {allocation.depth}, blocks {allocation.blocks_per_stage}")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
