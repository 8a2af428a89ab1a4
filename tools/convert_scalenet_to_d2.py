#!/usr/bin/env python
"""Convert a published ScaleNet ImageNet checkpoint into detectron2's pickle format.

    python tools/convert_scalenet_to_d2.py scalenet50.pth scalenet50_d2.pkl
    python tools/convert_scalenet_to_d2.py IN.pth OUT.pkl --allocation path/to/allocation.json

IN: a state_dict in the published layout (conv1, bn1, layer1..layer4, fc), bare or under
"state_dict" or "model", with or without a DataParallel "module." prefix. The allocation
is inferred from the weight shapes unless given; the checkpoint is checked against it.
The ImageNet classifier (fc) is dropped. Load OUT with MODEL.WEIGHTS OUT; the tool prints
the config lines to use, the input normalisation included.
"""

import argparse
import sys

from scalenet_d2.checkpoint import CheckpointMismatchError, convert_published_checkpoint
from scalenet_d2.modeling.allocation import AllocationError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="published checkpoint (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    parser.add_argument(
        "--allocation", default=None, help="bundled allocation name or allocation file (default: infer from shapes)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle arbitrary objects in IN (only for trusted files; by default only tensors and plain containers)",
    )
    args = parser.parse_args(argv)
    try:
        convert_published_checkpoint(
            args.input, args.output, allocation=args.allocation, allow_pickle=args.allow_pickle
        )
    except (CheckpointMismatchError, AllocationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
