"""A small synthetic detection dataset that ships as code ("synthetic shapes").

It lets the project's main command train and evaluate a detector with no COCO download:
a deterministic generator draws filled shapes of four classes (rectangle, ellipse,
triangle, cross) in random colours and at three scale bands (COCO's small / medium /
large box areas) on noisy, cluttered backgrounds, with some objects overlapping. Each
split is written once, in COCO json format plus PNG images, to a cache directory and
reused afterwards; ``scalenet_d2.data`` registers the splits with detectron2 under the
names in ``SPLITS``.

Determinism: every image is drawn from ``numpy.random.RandomState([seed, index])``,
whose stream numpy keeps stable across versions, so a split's json and pixels depend
only on ``GENERATOR_VERSION`` and the split's spec. Bump ``GENERATOR_VERSION`` whenever
the drawing code changes: the cache directory name contains it and a hash of the spec,
so a stale cache is never reused.

Instance masks: each annotation's ``segmentation`` is the object's visible pixels (its shape
less the objects drawn over it) as COCO RLE, for Mask R-CNN (``INPUT.MASK_FORMAT: bitmask``).
``area`` stays the box area: COCO's APs / APm / APl thresholds (32^2, 96^2) then split objects
by box size for box and mask AP alike, which is what the scale bands below are built around.

This module does not import detectron2, so the data can be generated without it.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "SPLITS",
    "SyntheticSplit",
    "cache_root",
    "split_dir",
    "split_paths",
    "generate_split",
    "ensure_split",
]

GENERATOR_VERSION = 3  # 3: instance masks (the pixels as in 2)
CLASSES = ("rectangle", "ellipse", "triangle", "cross")
CACHE_ENV = "SCALENET_D2_CACHE"

# Side of the object's box (sqrt of its area), per scale band. The bands keep clear of
# COCO's small/medium/large thresholds (32 and 96 px) so no object sits on a boundary.
SCALE_BANDS = {"small": (12, 28), "medium": (36, 88), "large": (104, 140)}
SCALE_PROBS = {"small": 0.35, "medium": 0.5, "large": 0.15}
# Overlap allowed between a new object and every object already placed: some overlap
# (crowding is part of detection) but no object hidden so much that its box is a guess.
MAX_IOU = 0.3
MAX_COVERED = 0.35  # fraction of an earlier object's box that a later one may cover


@dataclass(frozen=True)
class SyntheticSplit:
    num_images: int
    seed: int
    image_size: int = 160
    max_objects: int = 6

    def key(self):
        """Short hash of everything that determines the split's content."""
        blob = json.dumps({"version": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


SPLITS = {
    # The demo's sets: big enough to train a useful detector in a few CPU minutes.
    "synthetic_shapes_train": SyntheticSplit(num_images=1000, seed=0),
    "synthetic_shapes_val": SyntheticSplit(num_images=200, seed=1),
    # For tests and smoke runs.
    "synthetic_shapes_tiny_train": SyntheticSplit(num_images=16, seed=2),
    "synthetic_shapes_tiny_val": SyntheticSplit(num_images=8, seed=3),
}


def cache_root(cache_dir=None):
    """Where splits are written: ``cache_dir``, else $SCALENET_D2_CACHE, else ~/.cache/scalenet_d2."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    env = os.environ.get(CACHE_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "scalenet_d2")


def _get_split(name):
    try:
        return SPLITS[name]
    except KeyError:
        raise KeyError(f"unknown synthetic split '{name}'; known: {sorted(SPLITS)}") from None


def split_dir(name, cache_dir=None):
    spec = _get_split(name)
    return os.path.join(cache_root(cache_dir), "synthetic_shapes", f"{name}-v{GENERATOR_VERSION}-{spec.key()}")


def split_paths(name, cache_dir=None):
    """(json_file, image_root) of a split; they exist once ``ensure_split`` has run."""
    d = split_dir(name, cache_dir)
    return os.path.join(d, "annotations.json"), os.path.join(d, "images")


# ---------------------------------------------------------------------------- drawing


def _box_iou_and_cover(a, b):
    """IoU of boxes a, b (x0, y0, x1, y1) and the fraction of b that a covers."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0, 0.0
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / area_b


def _random_colour(rng, background, neighbours):
    """A colour that stands out from the background and from overlapping objects."""
    for _ in range(50):
        c = rng.randint(0, 256, size=3)
        if np.linalg.norm(c - background) > 110 and all(np.linalg.norm(c - n) > 80 for n in neighbours):
            return c
    return 255 - background  # complement: always far from the background


def _draw_shape(draw, cls, box, rng, fill):
    x0, y0, x1, y1 = box  # inclusive pixel corners
    w, h = x1 - x0, y1 - y0
    if cls == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif cls == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif cls == "triangle":
        # One vertex on one side of the box, the other two at the opposite corners:
        # the box is the triangle's tight box in all four orientations.
        t = rng.uniform(0.0, 1.0)
        side = rng.randint(4)
        if side == 0:  # apex on top
            pts = [(x0 + t * w, y0), (x0, y1), (x1, y1)]
        elif side == 1:  # apex at the bottom
            pts = [(x0 + t * w, y1), (x0, y0), (x1, y0)]
        elif side == 2:  # apex on the left
            pts = [(x0, y0 + t * h), (x1, y0), (x1, y1)]
        else:  # apex on the right
            pts = [(x1, y0 + t * h), (x0, y0), (x0, y1)]
        draw.polygon(pts, fill=fill)
    elif cls == "cross":
        tw = max(2.0, w * rng.uniform(0.22, 0.38)) / 2
        th = max(2.0, h * rng.uniform(0.22, 0.38)) / 2
        cx = x0 + w * rng.uniform(0.35, 0.65)
        cy = y0 + h * rng.uniform(0.35, 0.65)
        draw.rectangle([x0, cy - th, x1, cy + th], fill=fill)
        draw.rectangle([cx - tw, y0, cx + tw, y1], fill=fill)
    else:
        raise ValueError(f"unknown class {cls!r}")


def _background(rng, size):
    base = rng.randint(0, 256, size=3).astype(np.float32)
    # A random linear gradient, so colour alone does not separate object from background.
    gx, gy = rng.uniform(-60, 60, size=2)
    ramp = np.linspace(-0.5, 0.5, size)[None, :] * gx + np.linspace(-0.5, 0.5, size)[:, None] * gy
    img = base[None, None, :] + ramp[:, :, None]
    return img, base


def draw_image(spec, index):
    """Draws image ``index`` of a split: returns (HxWx3 uint8 array, list of annotations).

    Each annotation is a dict with category_id (1-based), bbox [x, y, w, h] (COCO), area,
    iscrowd and segmentation (the visible pixels, COCO RLE).
    """
    from pycocotools import mask as mask_util

    rng = np.random.RandomState([spec.seed, index])
    size = spec.image_size
    bg, base = _background(rng, size)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)

    # Clutter: thin lines that are not objects.
    for _ in range(rng.randint(0, 3)):
        p = rng.uniform(0, size, size=4)
        draw.line(list(p), fill=tuple(int(v) for v in rng.randint(0, 256, 3)), width=1)

    bands = list(SCALE_BANDS)
    probs = [SCALE_PROBS[b] for b in bands]
    placed, colours, anns, masks = [], [], [], []  # boxes (x0, y0, x1, y1 exclusive), fills, annotations
    n_target = rng.randint(2, spec.max_objects + 1)
    for _ in range(n_target):
        cls_id = rng.randint(len(CLASSES))
        band = bands[rng.choice(len(bands), p=probs)]
        lo, hi = SCALE_BANDS[band]
        hi = min(hi, size - 4)
        side = np.exp(rng.uniform(np.log(lo), np.log(hi)))
        aspect = np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6)))
        w = int(round(min(size - 2, side * np.sqrt(aspect))))
        h = int(round(min(size - 2, side / np.sqrt(aspect))))
        for _attempt in range(20):
            x0 = rng.randint(0, size - w + 1)
            y0 = rng.randint(0, size - h + 1)
            cand = (x0, y0, x0 + w, y0 + h)
            ok = True
            for prev in placed:
                iou, cover = _box_iou_and_cover(cand, prev)
                if iou > MAX_IOU or cover > MAX_COVERED:
                    ok = False
                    break
            if ok:
                break
        else:
            continue
        # Draw the shape alone on a mask to read its exact tight box, then onto the image.
        neighbours = [c for b, c in zip(placed, colours) if _box_iou_and_cover(cand, b)[0] > 0]
        colour = tuple(int(c) for c in _random_colour(rng, base, neighbours))
        mask = Image.new("L", (size, size), 0)
        shape_rng_state = rng.get_state()
        shape_box = (x0, y0, x0 + w - 1, y0 + h - 1)  # inclusive corners
        _draw_shape(ImageDraw.Draw(mask), CLASSES[cls_id], shape_box, rng, 255)
        rng.set_state(shape_rng_state)  # the visible copy makes the same random choices
        _draw_shape(draw, CLASSES[cls_id], shape_box, rng, colour)
        ys, xs = np.nonzero(np.asarray(mask))
        if len(xs) == 0:
            continue
        bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        placed.append(cand)
        colours.append(np.array(colour))
        shape = np.asarray(mask) > 0
        for earlier in masks:  # this shape hides what it is drawn over
            earlier &= ~shape
        masks.append(shape)
        anns.append(
            {
                "category_id": cls_id + 1,
                "bbox": [bx0, by0, bx1 - bx0, by1 - by0],
                "area": (bx1 - bx0) * (by1 - by0),
                "iscrowd": 0,
            }
        )

    for ann, visible in zip(anns, masks):
        rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
        ann["segmentation"] = {"size": [size, size], "counts": rle["counts"].decode("ascii")}

    img = np.asarray(canvas).astype(np.float32)
    img += rng.normal(0, rng.uniform(4, 12), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), anns


# ---------------------------------------------------------------------------- writing


def generate_split(name, out_dir):
    """Writes split ``name`` into ``out_dir`` (images/*.png + annotations.json)."""
    spec = _get_split(name)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(spec.num_images):
        pixels, anns = draw_image(spec, i)
        file_name = f"{i:06d}.png"
        Image.fromarray(pixels).save(os.path.join(out_dir, "images", file_name))
        images.append({"id": i + 1, "file_name": file_name, "height": spec.image_size, "width": spec.image_size})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    coco = {
        "info": {
            "description": f"scalenet_d2 synthetic shapes, split {name}",
            "generator_version": GENERATOR_VERSION,
            "spec": asdict(spec),
            "area": "box area (segmentation: the visible pixels, COCO RLE)",
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)],
    }
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump(coco, f)


def ensure_split(name, cache_dir=None):
    """Generates split ``name`` into the cache unless a complete copy is already there.

    Returns (json_file, image_root). The split is written to a temporary directory and
    renamed into place, so concurrent callers (e.g. several training processes) and
    interrupted runs never leave a half-written split where a reader looks.
    """
    spec = asdict(_get_split(name))
    json_file, image_root = split_paths(name, cache_dir)
    final = os.path.dirname(json_file)
    if os.path.isfile(json_file):
        with open(json_file) as f:
            info = json.load(f).get("info", {})
        if info.get("generator_version") == GENERATOR_VERSION and info.get("spec") == spec:
            return json_file, image_root
        # Same directory name but other content: only a hand-edited cache gets here.
        raise RuntimeError(
            f"{json_file}: info.generator_version/spec is {info.get('generator_version')}/{info.get('spec')}, "
            f"expected {GENERATOR_VERSION}/{spec}; delete {final} to regenerate it"
        )
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        generate_split(name, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(json_file):  # not a concurrent writer that won the race
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return json_file, image_root
