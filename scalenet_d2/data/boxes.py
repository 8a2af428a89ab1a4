"""Boxes with a negative width or height in training annotations.

detectron2 neither refuses nor drops them: its transforms take the min and max of a box's
transformed corners, so a box [x, y, -w, h] trains as the box from x - w to x, its mirror about
its corner. They are annotation errors; training here drops them (an image left with no
non-crowd box is then dropped too where DATALOADER.FILTER_EMPTY_ANNOTATIONS says so, as
detectron2 does), and logs once per dataset how many, naming the first annotation.
"""

import json
import logging
import os
from typing import List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["negative_size", "drop_negative_boxes"]

logger = logging.getLogger(__name__)


def negative_size(annotation: dict) -> bool:
    """Whether an annotation's upright box (XYWH_ABS or XYXY_ABS) has a negative width or height.
    Plain arithmetic: it runs over every training annotation at the start of a run."""
    box, mode = annotation.get("bbox"), annotation.get("bbox_mode")
    if box is None or len(box) != 4:
        return False
    if mode == BoxMode.XYWH_ABS:
        return box[2] < 0 or box[3] < 0
    if mode == BoxMode.XYXY_ABS:
        return box[2] < box[0] or box[3] < box[1]
    return False


def drop_negative_boxes(dataset_dicts: Sequence[dict], names: Sequence[str], filter_empty: bool) -> List[dict]:
    """`dataset_dicts` (detectron2's training records of datasets `names`) without the boxes of
    negative size; the records are not changed in place (a registered dataset may hand out the
    same objects again). Logs a warning per dataset that had any. A torch Dataset (which
    detectron2 main passes on from a dataset registered as one) is returned as it is."""
    if not isinstance(dataset_dicts, list):
        return dataset_dicts
    kept_records, dropped = [], 0
    for record in dataset_dicts:
        annotations = record.get("annotations")
        if not annotations or not any(negative_size(a) for a in annotations):
            kept_records.append(record)
            continue
        kept = [a for a in annotations if not negative_size(a)]
        dropped += len(annotations) - len(kept)
        if filter_empty and not any(a.get("iscrowd", 0) == 0 for a in kept):
            continue
        kept_records.append(dict(record, annotations=kept))
    if dropped:
        for name in names:
            count, first = _negative_boxes_of(name)
            if count:
                logger.warning(
                    f"dataset '{name}': dropped {count} boxes with a negative width or height from training (first: "
                    f"{first}); expected [x, y, width, height] with width, height >= 0 (detectron2 would have "
                    "trained on each one mirrored about its corner)"
                )
    return kept_records


def _negative_boxes_of(name: str) -> Tuple[int, str]:
    """(how many, the first, in words) of the boxes of negative size in dataset `name`: read from
    its COCO json file, the only place that keeps annotation ids, where it has one."""
    json_file = MetadataCatalog.get(name).get("json_file", None) if name in DatasetCatalog.list() else None
    if json_file and os.path.isfile(json_file):
        with open(json_file) as f:
            annotations = json.load(f).get("annotations", [])
        bad = [a for a in annotations if negative_size(dict(a, bbox_mode=BoxMode.XYWH_ABS))]
        if not bad:
            return 0, ""
        return len(bad), f"annotation id {bad[0].get('id')} of image id {bad[0].get('image_id')}, bbox {bad[0]['bbox']}"
    bad = [(r, a) for r in DatasetCatalog.get(name) for a in r.get("annotations", ()) if negative_size(a)]
    if not bad:
        return 0, ""
    record, annotation = bad[0]
    which = f"annotation id {annotation['id']}" if "id" in annotation else "an annotation"
    return len(bad), f"{which} of image id {record.get('image_id')}, bbox {list(annotation['bbox'])}"
