"""The built-in synthetic detection dataset: deterministic, varied, cached once, registered."""

import itertools
import json
import os

import numpy as np
import pytest

from scalenet_d2.data import synthetic as S


def _box_iou(a, b):
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = min(ax0 + aw, bx0 + bw) - max(ax0, bx0)
    ih = min(ay0 + ah, by0 + bh) - max(ay0, by0)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


@pytest.fixture(scope="module")
def train_sample():
    spec = S.SPLITS["synthetic_shapes_train"]
    return spec, [S.draw_image(spec, i) for i in range(150)]


def test_drawing_is_deterministic():
    spec = S.SPLITS["synthetic_shapes_train"]
    for i in (0, 7):
        img1, anns1 = S.draw_image(spec, i)
        img2, anns2 = S.draw_image(spec, i)
        assert np.array_equal(img1, img2) and anns1 == anns2
    # Different images differ.
    assert not np.array_equal(S.draw_image(spec, 0)[0], S.draw_image(spec, 1)[0])


def test_content_classes_scales_overlap(train_sample):
    spec, sample = train_sample
    anns = [a for _, image_anns in sample for a in image_anns]
    assert len(anns) >= 2 * len(sample), "expected several objects per image"
    # Every class, in every COCO size range (area = box area).
    seen = {(a["category_id"], "s" if a["area"] < 32**2 else "m" if a["area"] < 96**2 else "l") for a in anns}
    for cat in range(1, len(S.CLASSES) + 1):
        for size in "sm":
            assert (cat, size) in seen, f"class {S.CLASSES[cat - 1]} never {size}"
    assert sum(a["area"] >= 96**2 for a in anns) >= 10, "too few large objects for a meaningful APl"
    overlapping_images = 0
    for img, image_anns in sample:
        assert img.shape == (spec.image_size, spec.image_size, 3) and img.dtype == np.uint8
        for a in image_anns:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= spec.image_size and y + h <= spec.image_size
            assert w >= 8 and h >= 8 and a["area"] == w * h and a["iscrowd"] == 0
        ious = [_box_iou(p["bbox"], q["bbox"]) for p, q in itertools.combinations(image_anns, 2)]
        assert all(v <= S.MAX_IOU + 0.05 for v in ious)  # +0.05: tight boxes vs placement boxes
        overlapping_images += any(v > 0 for v in ious)
    assert overlapping_images >= 0.2 * len(sample), "expected some overlapping objects"


def test_boxes_are_tight(train_sample):
    # On isolated rectangles (no other box overlaps them), the box's first column is object
    # colour and the column just left of the box is not: the box is neither loose nor cut.
    _, sample = train_sample
    good = total = 0
    for img, anns in sample:
        img = img.astype(float)
        for a in anns:
            x, y, w, h = a["bbox"]
            others = [b for b in anns if b is not a and _box_iou(a["bbox"], b["bbox"]) > 0]
            if others or a["category_id"] != 1 or w < 16 or h < 16 or x == 0:
                continue
            inside = img[y + 2 : y + h - 2, x + 2 : x + w - 2].reshape(-1, 3).mean(0)
            first = img[y + 2 : y + h - 2, x].mean(0)
            outside = img[y + 2 : y + h - 2, x - 1].mean(0)
            total += 1
            good += np.abs(first - inside).max() < 15 and np.abs(outside - inside).max() > 30
    assert total >= 5 and good >= 0.9 * total, f"{good} of {total} rectangles have a tight left edge"


def test_split_is_cached_atomically_and_reused(tmp_path):
    json_file, image_root = S.ensure_split("synthetic_shapes_tiny_val", tmp_path)
    with open(json_file) as f:
        coco = json.load(f)
    spec = S.SPLITS["synthetic_shapes_tiny_val"]
    assert len(coco["images"]) == spec.num_images
    assert [c["name"] for c in coco["categories"]] == list(S.CLASSES)
    assert coco["info"]["generator_version"] == S.GENERATOR_VERSION
    assert all(os.path.isfile(os.path.join(image_root, im["file_name"])) for im in coco["images"])
    assert {a["image_id"] for a in coco["annotations"]} <= {im["id"] for im in coco["images"]}
    # No temporary directory left behind; a second call reuses the files as they are.
    assert [p.name for p in (tmp_path / "synthetic_shapes").iterdir()] == [os.path.basename(os.path.dirname(json_file))]
    mtime = os.path.getmtime(json_file)
    assert S.ensure_split("synthetic_shapes_tiny_val", tmp_path) == (json_file, image_root)
    assert os.path.getmtime(json_file) == mtime
    # Same content from a fresh generation elsewhere: pixels and annotations.
    other_json, other_root = S.ensure_split("synthetic_shapes_tiny_val", tmp_path / "other")
    with open(other_json) as f:
        assert json.load(f) == coco
    from PIL import Image

    for im in coco["images"]:
        a = np.asarray(Image.open(os.path.join(image_root, im["file_name"])))
        b = np.asarray(Image.open(os.path.join(other_root, im["file_name"])))
        assert np.array_equal(a, b)


def test_hand_edited_cache_is_refused(tmp_path):
    json_file, _ = S.ensure_split("synthetic_shapes_tiny_val", tmp_path)
    with open(json_file) as f:
        coco = json.load(f)
    coco["info"]["spec"]["num_images"] = 3
    with open(json_file, "w") as f:
        json.dump(coco, f)
    with pytest.raises(
        RuntimeError, match=r"annotations\.json: info\.generator_version/spec .* expected .*num_images': 8"
    ):
        S.ensure_split("synthetic_shapes_tiny_val", tmp_path)


def test_spec_change_uses_another_cache_directory():
    a = S.SyntheticSplit(num_images=8, seed=3)
    b = S.SyntheticSplit(num_images=9, seed=3)
    assert a.key() != b.key()


def test_registered_with_detectron2(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from scalenet_d2.data import register_synthetic_datasets

    try:
        register_synthetic_datasets(tmp_path)
        dicts = DatasetCatalog.get("synthetic_shapes_tiny_val")  # generates on first use
        assert len(dicts) == S.SPLITS["synthetic_shapes_tiny_val"].num_images
        assert os.path.isfile(dicts[0]["file_name"]) and dicts[0]["file_name"].startswith(str(tmp_path))
        cats = {a["category_id"] for d in dicts for a in d["annotations"]}
        assert cats <= set(range(len(S.CLASSES)))  # contiguous ids for detectron2
        meta = MetadataCatalog.get("synthetic_shapes_tiny_val")
        assert meta.thing_classes == list(S.CLASSES)
        assert meta.evaluator_type == "coco" and os.path.isfile(meta.json_file)
    finally:
        register_synthetic_datasets()  # back to the default cache for other tests


def test_missing_coco_names_path_and_env(tmp_path):
    from detectron2.data import MetadataCatalog

    from scalenet_d2.data import check_datasets

    meta = MetadataCatalog.get("coco_2017_val")
    if os.path.exists(meta.json_file):
        pytest.skip("COCO is installed here")
    with pytest.raises(FileNotFoundError) as e:
        check_datasets(["coco_2017_val"])
    msg = str(e.value)
    assert "coco_2017_val" in msg and "json_file" in msg and os.path.abspath(meta.json_file) in msg
    assert "DETECTRON2_DATASETS" in msg
    with pytest.raises(KeyError, match="not registered"):
        check_datasets(["no_such_dataset"])
