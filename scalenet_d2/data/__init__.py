"""Datasets: the built-in synthetic set, and start-up checks for file-based ones like COCO.

Importing this module registers the synthetic splits (``synthetic.SPLITS``) with
detectron2. COCO itself is registered by detectron2 (``detectron2.data.datasets.builtin``)
under $DETECTRON2_DATASETS, as in any detectron2 project.
"""

import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .resumable import DatasetError
from .synthetic import CLASSES, SPLITS, cache_root, ensure_split, split_paths

__all__ = [
    "register_synthetic_datasets",
    "check_datasets",
    "check_annotation_file",
    "explain_dataset_failure",
    "DatasetError",
    "CLASSES",
    "SPLITS",
    "ensure_split",
]

_D2_DATASETS_ENV = "DETECTRON2_DATASETS"


def register_synthetic_datasets(cache_dir=None):
    """Registers every synthetic split as a COCO-format detectron2 dataset.

    Loading a split generates it first when the cache has none (see ``ensure_split``);
    the metadata matches what ``register_coco_instances`` sets, plus the class names,
    so ``COCOEvaluator`` works on it directly. Calling it again re-registers the splits
    (e.g. after changing the cache directory).
    """
    root = cache_root(cache_dir)  # resolved now, so loading and metadata always agree
    for name in SPLITS:
        json_file, image_root = split_paths(name, root)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda name=name: load_coco_json(*ensure_split(name, root), name))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASSES))},
            synthetic_cache_root=root,
        )


def _coco_hint(name):
    if not name.startswith("coco_"):
        return ""
    root = os.environ.get(_D2_DATASETS_ENV)
    where = f"${_D2_DATASETS_ENV}={root}" if root else f"${_D2_DATASETS_ENV} unset, so ./datasets"
    return (
        f" detectron2 registers COCO under ${_D2_DATASETS_ENV} ({where}, resolved to "
        f"{os.path.abspath(os.path.expanduser(root or 'datasets'))}) and expects "
        "coco/annotations/instances_{train,val}2017.json and coco/{train,val}2017/ there; "
        "see https://github.com/facebookresearch/detectron2/blob/main/datasets/README.md"
    )


def check_datasets(names):
    """Fails at start, not mid-run, when a dataset's files are missing.

    Synthetic splits are generated here if needed. For any other registered dataset whose
    metadata has ``json_file``/``image_root`` (COCO and other COCO-format sets), both must
    exist; the error names the dataset, the field, the path and, for COCO, the env var.
    """
    for name in names:
        if name in SPLITS:
            ensure_split(name, _cache_dir_of(name))
            continue
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"dataset '{name}' is not registered with detectron2; registered COCO-format "
                f"sets include {sorted(n for n in DatasetCatalog.list() if n.startswith('coco_2017'))} "
                f"and the built-in {sorted(SPLITS)}"
            )
        meta = MetadataCatalog.get(name)
        for field in ("json_file", "image_root"):
            path = getattr(meta, field, None)
            if path and not os.path.exists(path):
                raise FileNotFoundError(
                    f"dataset '{name}': its {field} {os.path.abspath(path)} does not exist." + _coco_hint(name)
                )


def check_annotation_file(json_file, dataset="", for_training=True):
    """Raises DatasetError naming the file, the field and what was expected when a COCO-format
    annotation file cannot be used: invalid JSON (with its position), another top-level type,
    no images, no annotations (for training)."""
    where = f"dataset '{dataset}': annotation file {json_file}" if dataset else f"annotation file {json_file}"
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (byte {e.pos})")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where} is not UTF-8 text (byte {e.start}); expected COCO-format JSON")
    if not isinstance(data, dict):
        raise DatasetError(
            f"{where}: the top level is a JSON {type(data).__name__}; expected an object with "
            '"images", "annotations" and "categories" (COCO format)'
        )
    for field in ("images", "annotations", "categories") if for_training else ("images", "categories"):
        value = data.get(field)
        if not isinstance(value, list) or (field != "categories" and not value):
            got = (
                "missing"
                if field not in data
                else f"a {type(value).__name__} of length {len(value)}"
                if hasattr(value, "__len__")
                else repr(value)
            )
            raise DatasetError(f'{where}: "{field}" is {got}; expected a non-empty list (COCO format)')


def explain_dataset_failure(names, error, for_training=True):
    """A DatasetError for `error` raised while loading `names`: the annotation file's problem
    when one is found, else the original error with the datasets named."""
    for name in names:
        json_file = MetadataCatalog.get(name).get("json_file", None) if name in DatasetCatalog.list() else None
        if json_file and os.path.isfile(json_file):
            check_annotation_file(json_file, name, for_training)
    return DatasetError(f"loading dataset(s) {', '.join(names)} failed: {type(error).__name__}: {error}")


def _cache_dir_of(name):
    # The cache root the split was registered with, so checks and loading agree.
    return MetadataCatalog.get(name).get("synthetic_cache_root", None)


register_synthetic_datasets()
