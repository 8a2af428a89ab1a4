import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg

from scalenet_d2 import EXPECTED_INPUT, add_scalenet_config
from scalenet_d2.utils.profiling import damp_norms  # noqa: F401  shared with the tests

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # pytest-xdist workers share the cores: more torch threads than that slows small CPU ops many times over
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# train_net.py overrides: the tiny synthetic split, 2 images per iteration, a checkpoint every 2
TINY_TRAIN = [
    "DATASETS.TRAIN",
    '("synthetic_shapes_tiny_train",)',
    "DATASETS.TEST",
    '("synthetic_shapes_tiny_val",)',
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.WARMUP_ITERS",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.CHECKPOINT_PERIOD",
    "2",
]


def train_net(env, *args, timeout=400):
    """Runs train_net.py from the repository root: (exit code, stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, "train_net.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of a test module's train_net.py / tools subprocesses: a dataset cache of
    its own, and one thread each (more threads than free cores slows small CPU models a lot)."""
    e = dict(os.environ)
    e["SCALENET_D2_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONWARNINGS"] = "ignore"
    return e


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def published_allocations_dir() -> Path:
    """The published allocation files (never committed here): ../shared/reference/allocations/,
    or $SCALENET_D2_PUBLISHED_ALLOCATIONS. Only the check that the bundled files transcribe them
    needs them; it is skipped in a clone without them, and fails under CI (CI=true)."""
    path = Path(
        os.environ.get(
            "SCALENET_D2_PUBLISHED_ALLOCATIONS",
            REPO_ROOT.parent / "shared" / "reference" / "allocations",
        )
    )
    if not (path / "scalenet50.json").is_file():
        message = f"published allocation files not found in {path} (set SCALENET_D2_PUBLISHED_ALLOCATIONS)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def build_detector_cfg(variant, allocation="scalenet_tiny"):
    """A small CPU detector config on a ScaleNet: variant "plain" (RPN and box head on res4),
    "fpn" (Faster R-CNN FPN) or "retinanet"; 3 classes, the weights' pixel normalisation."""
    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SCALENET.ALLOCATION = allocation
    cfg.INPUT.FORMAT = EXPECTED_INPUT["INPUT.FORMAT"]
    cfg.MODEL.PIXEL_MEAN = EXPECTED_INPUT["MODEL.PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = EXPECTED_INPUT["MODEL.PIXEL_STD"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 128
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    if variant == "plain":  # RPN and box head on res4, as a C4 detector without the res5 head
        cfg.MODEL.BACKBONE.NAME = "build_scalenet_backbone"
        cfg.MODEL.SCALENET.OUT_FEATURES = ["res4"]
        cfg.MODEL.RPN.IN_FEATURES = ["res4"]
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
        cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 1
        cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 64
    elif variant == "fpn":
        cfg.MODEL.BACKBONE.NAME = "build_scalenet_fpn_backbone"
        cfg.MODEL.SCALENET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    elif variant == "retinanet":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_scalenet_fpn_backbone"
        cfg.MODEL.SCALENET.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in [32, 64, 128, 256, 512]]
        cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 100
    else:
        raise ValueError(variant)
    return cfg


@pytest.fixture(scope="session")
def detector_cfg():
    """`build_detector_cfg`, for tests: detector_cfg("fpn", allocation=...)."""
    return build_detector_cfg


def folder_snapshot(folder):
    """relative path -> sha256 of every file under `folder`: to assert that nothing changed."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture
def one_thread():
    # Small CPU ops with more threads than free cores (a shared machine) run many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_image_folder(root: Path, split: str, per_class: int, seed: int):
    """An ImageFolder split of 64x64 images: a filled ellipse, rectangle or triangle per class."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for label, shape in enumerate(("ellipse", "rectangle", "triangle")):
        folder = root / split / f"class_{shape}"
        folder.mkdir(parents=True)
        for n in range(per_class):
            img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 120, 3)))
            draw = ImageDraw.Draw(img)
            x0, y0 = (int(v) for v in rng.integers(4, 24, 2))
            x1, y1 = x0 + int(rng.integers(20, 36)), y0 + int(rng.integers(20, 36))
            colour = tuple(int(v) for v in rng.integers(140, 256, 3))
            if shape == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
            img.save(folder / f"{n}.png")
