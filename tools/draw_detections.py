#!/usr/bin/env python
"""Draws a trained detector's detections on your images, with detectron2's Visualizer.

    python tools/draw_detections.py --config-file configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml \
        --weights output/s50/model_final.pth --input photo.jpg more_photos/ --output output/drawn_s50

One PNG per input image is written to the output folder, named after the image; existing
files are never replaced. The weights load through the strict checkpointer (wrong weights are
an error, not a warning). Class names come from the config's first test dataset.
"""

import argparse
import os
import sys

from scalenet_d2.checkpoint import CheckpointMismatchError
from scalenet_d2.utils.pictures import (
    PictureError,
    draw_predictions,
    image_paths,
    image_png,
    load_predictor,
    read_rgb,
    save_png,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the yaml config the weights were trained with")
    parser.add_argument("--weights", required=True, help="a trained model (model_final.pth of train_net.py)")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders of images")
    parser.add_argument("--output", required=True, help="folder for the drawn images (created if missing)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.DEVICE cpu")
    args = parser.parse_args(argv)
    try:
        paths = image_paths(args.input)
        targets = [os.path.join(args.output, os.path.splitext(os.path.basename(p))[0] + ".png") for p in paths]
        taken = [t for t in targets if os.path.exists(t)]
        if taken:
            raise PictureError(f"{taken[0]} exists ({len(taken)} outputs do): choose another --output folder")
        if len(set(targets)) != len(targets):
            raise PictureError("two inputs share a name (e.g. a.jpg and a.png): their drawings would collide")
        predictor = load_predictor(args.config_file, args.weights, args.opts)
        for path, target in zip(paths, targets):
            save_png(target, image_png(draw_predictions(predictor, read_rgb(path), args.score_threshold)))
            print(target, flush=True)
    except (PictureError, CheckpointMismatchError) as e:
        sys.exit(f"draw_detections.py: error: {e}")
    return targets


if __name__ == "__main__":
    main()
