#!/usr/bin/env python
r"""Turn a trained over-complete seed ScaleNet into an allocation file (data-driven neuron allocation).

The seed is a classifier (tools/train_classifier.py) or a seed detector (a train_net.py checkpoint
of a MODEL.SCALENET.ALLOCATION "seed:..." config, recognised by its keys): detection-aware allocation.

Every block of stage k keeps the N_k SA neurons with the largest |BN gamma| (divided by their cost^A with
--cost-exponent A), N_k = ceil(m x planes_k);
the kept count per scale is the block's allocation. Budget: --width-multiplier m (1.36 gives
ScaleNet-50 widths 88/175/349/697, 1.0 gives ScaleNet-50-light widths 64/128/256/512), or
--target-gflops G (the largest m whose FLOPs at 224x224 do not exceed G).

    python tools/allocate.py output/seed50/model_final.pth --width-multiplier 1.36 \
        --output scalenet50_mine.json --chart scalenet50_mine.png --inherit-weights scalenet50_mine_init.pth
    # from a seed detector, at the FLOPs of ScaleNet-50 counted at a detection input size
    python tools/allocate.py output/seed50_coco/model_final.pth --target-gflops 82.7 --flops-size 800x1344 \
        --output scalenet50_coco.json --inherit-weights scalenet50_coco_init.pth

All outputs are written together, atomically, after every check has passed: an error leaves none.
"""

import argparse
import os
import sys

from scalenet_d2.atomic import bytes_writer, torch_writer, write_atomically
from scalenet_d2.checkpoint.classifier import ALLOCATION_KEY, ClassifierCheckpointError
from scalenet_d2.modeling.allocation import AllocationError, load_allocation
from scalenet_d2.modeling.classification import ScaleNetClassifier
from scalenet_d2.neuron_allocation.pruning import (
    NeuronAllocationError,
    allocate_from_checkpoint,
    format_summary,
    inherit_detector_weights,
    inherit_weights,
    plot_allocation,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "seed_checkpoint",
        help="trained seed (tools/train_classifier.py checkpoint.pth / model_final.pth, or a published-layout state_dict)",
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--width-multiplier", type=float, help="neurons kept per block = ceil(this x the stage's ResNet width)"
    )
    budget.add_argument(
        "--target-gflops", type=float, help="FLOPs budget at 224x224 (multiply-accumulates, like the paper's 3.8 G)"
    )
    p.add_argument(
        "--flops-size",
        metavar="HxW",
        help="count --target-gflops at this input size (e.g. 800x1344, a detection input) instead of 224x224",
    )
    p.add_argument(
        "--cost-exponent",
        type=float,
        default=0.0,
        metavar="A",
        help="rank neurons by |gamma| / cost^A, cost = a branch neuron's multiply-adds at 224x224; "
        "0 (default) ranks by |gamma| as the paper; A > 0 favours the cheaper, coarser scales",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="allocate even from a seed whose branch BN gammas are all equal (untrained: the ranking is tie-break order)",
    )
    p.add_argument("--output", required=True, help="allocation file to write (project JSON format)")
    p.add_argument("--name", help="allocation name (default: the output file's stem)")
    p.add_argument("--chart", help="PNG chart of neurons per scale for every block")
    p.add_argument(
        "--chart-beside",
        metavar="ALLOCATION",
        help="in the chart, this allocation (name or file, same blocks) beside the new one, e.g. the ImageNet one",
    )
    p.add_argument(
        "--inherit-weights",
        help="also write the seed's kept neurons: classifier weights (train_classifier.py --init-weights), or for a "
        "seed detector a detectron2 checkpoint of the pruned detector (train_net.py MODEL.WEIGHTS)",
    )
    args = p.parse_args(argv)
    if args.flops_size is not None:
        try:
            h, w = (int(v) for v in args.flops_size.lower().split("x"))
            assert h > 0 and w > 0
        except (ValueError, AssertionError):
            p.error(f"--flops-size {args.flops_size!r}: expected HEIGHTxWIDTH in pixels, e.g. 800x1344")
        args.flops_size = (h, w)
    return args


def main(argv=None):
    args = parse_args(argv)
    outputs = [o for o in (args.output, args.chart, args.inherit_weights) if o]
    if len({os.path.abspath(o) for o in outputs}) != len(outputs):
        raise NeuronAllocationError(f"--output, --chart and --inherit-weights must be different files, got {outputs}")
    if os.path.abspath(args.seed_checkpoint) in {os.path.abspath(o) for o in outputs}:
        raise NeuronAllocationError(f"output would overwrite the seed checkpoint {args.seed_checkpoint}")
    for o in outputs:
        folder = os.path.dirname(os.path.abspath(o))
        if not os.path.isdir(folder):
            raise NeuronAllocationError(f"output {o}: folder {folder} does not exist")

    name = args.name or os.path.splitext(os.path.basename(args.output))[0]
    result = allocate_from_checkpoint(
        args.seed_checkpoint,
        args.width_multiplier,
        args.target_gflops,
        name=name,
        force=args.force,
        cost_exponent=args.cost_exponent,
        flops_size=args.flops_size,
    )
    allocation = result.allocation

    # Build every output in memory (and check it) before anything touches the disk.
    writers = {args.output: bytes_writer(allocation.to_json().encode("utf-8"))}
    if args.chart:
        others = [load_allocation(args.chart_beside)] if args.chart_beside else []
        writers[args.chart] = bytes_writer(plot_allocation(allocation, others=others))
    if args.inherit_weights and result.seed.detector is not None:
        state_dict = inherit_detector_weights(result.seed, result.selection)
        writers[args.inherit_weights] = torch_writer(
            {"model": state_dict, ALLOCATION_KEY: allocation.to_dict(), "inherited_from": result.seed.sha256}
        )
    elif args.inherit_weights:
        state_dict = inherit_weights(result.seed.state_dict, result.seed.allocation, result.selection)
        model = ScaleNetClassifier(allocation, num_classes=result.seed.num_classes)
        model.load_state_dict(state_dict, strict=True)  # the weights fit the allocation just made
        writers[args.inherit_weights] = torch_writer(
            {"model": state_dict, ALLOCATION_KEY: allocation.to_dict(), "inherited_from": result.seed.sha256}
        )
    write_atomically(writers)

    budget = allocation.provenance["budget"]
    print(format_summary(allocation, result.seed.num_classes))
    kind = "seed detector" if result.seed.detector is not None else "seed"
    print(f"{kind} {result.seed.path} ({result.seed.allocation.name}, sha256 {result.seed.sha256[:12]}...)")
    if "target_gflops" in budget:
        at = f" at {'x'.join(map(str, budget['flops_size']))}" if "flops_size" in budget else ""
        nxt = next(v for k, v in budget.items() if k.startswith("next_step_flops_"))
        print(
            f"FLOPs target {budget['target_gflops']:g} G{at} -> width multiplier {budget['width_multiplier']:.4f}"
            + (f" (next neuron step: {nxt / 1e9:.4f} G)" if nxt else " (the whole seed)")
        )
    print(f"stage widths {allocation.provenance['stage_widths']}")
    for o in outputs:
        print(f"wrote {o}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (NeuronAllocationError, ClassifierCheckpointError, AllocationError) as e:
        sys.exit(f"allocate.py: error: {e}")
