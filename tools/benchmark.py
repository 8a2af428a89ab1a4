#!/usr/bin/env python
"""Backbone params and FLOPs of detection configs, measured on the model the config builds.

    python tools/benchmark.py configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml \
        configs/COCO-Detection/faster_rcnn_R50_FPN_1x.yaml --sizes 224x224 800x1344 --markdown

The model is built on the CPU without loading weights (they do not change params or FLOPs).
"backbone" is the bottom-up network (ScaleNet or ResNet, without FPN), the part in which
twins differ; FLOPs are counted by fvcore at batch 1, one fused multiply-add = one flop
(the convention of the ResNet and ScaleNet papers). 800x1344 is an 800x1333 COCO input
after detectron2 pads it to a multiple of 32.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalenet_d2.engine import backbone_stats, machine_description, resolve_allocation  # noqa: E402


def parse_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected HxW, e.g. 800x1344") from None
    return h, w


def config_stats(config_file, sizes, opts=()):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from scalenet_d2.config import add_scalenet_config

    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    resolve_allocation(cfg)
    model = build_model(cfg)
    stats = backbone_stats(model, sizes)
    stats["model_params"] = sum(p.numel() for p in model.parameters())
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="config files")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(224, 224), (800, 1344)], help="HxW inputs")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every config")
    args = parser.parse_args(argv)

    size_names = [f"{h}x{w}" for h, w in args.sizes]
    header = ["config", "backbone params (M)"] + [f"backbone GFLOPs @{s}" for s in size_names] + ["model params (M)"]
    rows = []
    for config in args.configs:
        s = config_stats(config, args.sizes, args.opts)
        rows.append(
            [os.path.relpath(config)]
            + [f"{s['backbone_params'] / 1e6:.2f}"]
            + [f"{s['backbone_flops'][n] / 1e9:.2f}" for n in size_names]
            + [f"{s['model_params'] / 1e6:.2f}"]
        )
        print(" ".join(rows[-1]), file=sys.stderr, flush=True)  # progress: big models take a while
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        for r in [header] + rows:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"\nmeasured by tools/benchmark.py on {machine_description()}")


if __name__ == "__main__":
    main()
