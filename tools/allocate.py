#!/usr/bin/env python
r"""Turn a trained over-complete seed ScaleNet into an allocation file (data-driven neuron allocation).

Every block of stage k keeps the N_k SA neurons with the largest |BN gamma| (divided by their cost^A with
--cost-exponent A), N_k = ceil(m x planes_k);
the kept count per scale is the block's allocation. Budget: --width-multiplier m (1.36 gives
ScaleNet-50 widths 88/175/349/697, 1.0 gives ScaleNet-50-light widths 64/128/256/512), or
--target-gflops G (the largest m whose FLOPs at 224x224 do not exceed G).

    python tools/allocate.py output/seed50/model_final.pth --width-multiplier 1.36 \
        --output scalenet50_mine.json --chart scalenet50_mine.png --inherit-weights scalenet50_mine_init.pth

All outputs are written together, atomically, after every check has passed: an error leaves none.
"""

import argparse
import os
import sys

from scalenet_d2.atomic import bytes_writer, torch_writer, write_atomically
from scalenet_d2.checkpoint.classifier import ALLOCATION_KEY, ClassifierCheckpointError
from scalenet_d2.modeling.classification import ScaleNetClassifier
from scalenet_d2.neuron_allocation.pruning import (
    NeuronAllocationError,
    allocate_from_checkpoint,
    format_summary,
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
        "--inherit-weights",
        help="also write the seed's kept neurons as classifier weights (to fine-tune with train_classifier.py --init-weights)",
    )
    return p.parse_args(argv)


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
    )
    allocation = result.allocation

    # Build every output in memory (and check it) before anything touches the disk.
    writers = {args.output: bytes_writer(allocation.to_json().encode("utf-8"))}
    if args.chart:
        writers[args.chart] = bytes_writer(plot_allocation(allocation))
    if args.inherit_weights:
        state_dict = inherit_weights(result.seed.state_dict, result.seed.allocation, result.selection)
        model = ScaleNetClassifier(allocation, num_classes=result.seed.num_classes)
        model.load_state_dict(state_dict, strict=True)  # the weights fit the allocation just made
        writers[args.inherit_weights] = torch_writer(
            {"model": state_dict, ALLOCATION_KEY: allocation.to_dict(), "inherited_from": result.seed.sha256}
        )
    write_atomically(writers)

    budget = allocation.provenance["budget"]
    print(format_summary(allocation, result.seed.num_classes))
    print(f"seed {result.seed.path} ({result.seed.allocation.name}, sha256 {result.seed.sha256[:12]}...)")
    if "target_gflops" in budget:
        nxt = budget["next_step_flops_224"]
        print(
            f"FLOPs target {budget['target_gflops']:g} G -> width multiplier {budget['width_multiplier']:.4f}"
            + (f" (next neuron step: {nxt / 1e9:.4f} G)" if nxt else " (the whole seed)")
        )
    print(f"stage widths {allocation.provenance['stage_widths']}")
    for o in outputs:
        print(f"wrote {o}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (NeuronAllocationError, ClassifierCheckpointError) as e:
        sys.exit(f"allocate.py: error: {e}")
