"""Pictures: loss curves, AP bars, and tools/draw_detections.py on a saved detector."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from PIL import Image

import scalenet_d2.data  # noqa: F401  registers the synthetic splits
from scalenet_d2 import add_scalenet_config
from scalenet_d2.data.synthetic import ensure_split
from scalenet_d2.utils.pictures import PictureError, loss_history, plot_ap_comparison, plot_loss_curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STINY = os.path.join(REPO, "configs", "Synthetic", "faster_rcnn_Stiny_FPN.yaml")


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def write_metrics(run_dir, losses):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"iteration": i, "total_loss": loss, "lr": 0.1}) + "\n")
        f.write(json.dumps({"iteration": len(losses) - 1, "bbox/AP": 1.0}) + "\n")  # evaluation line


def test_loss_curves_and_ap_bars(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_metrics(a, [3.0, 2.0, 1.5])
    write_metrics(b, [3.1, 2.5])
    assert loss_history(a) == [(0, 3.0), (1, 2.0), (2, 1.5)]
    path = plot_loss_curves([a, b], ["scalenet", "resnet"], str(tmp_path / "loss.png"))
    assert png_size(path)[0] > 400
    with pytest.raises(PictureError, match="loss.png exists"):  # never over an existing file
        plot_loss_curves([a, b], ["scalenet", "resnet"], path)
    runs = [{"box": {"AP": 44.8, "AP50": 77.4}}, {"box": {"AP": 44.0, "AP50": 76.3}}]
    assert png_size(plot_ap_comparison(runs, ["scalenet", "resnet"], str(tmp_path / "ap.png")))[0] > 400


def test_loss_history_names_the_bad_file(tmp_path):
    with pytest.raises(PictureError, match="metrics.json: no such file"):
        loss_history(str(tmp_path))
    (tmp_path / "metrics.json").write_text('{"iteration": 0, "total_loss": 1}\nnot json\n')
    with pytest.raises(PictureError, match=r"metrics.json, line 2: not JSON"):
        loss_history(str(tmp_path))


def draw(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "draw_detections.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def saved_detector(tmp_path_factory):
    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.merge_from_file(STINY)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("stiny")
    DetectionCheckpointer(build_model(cfg), str(folder)).save("model_final")
    return str(folder / "model_final.pth")


def test_draw_detections_on_a_folder_and_a_file(saved_detector, tmp_path):
    _, image_dir = ensure_split("synthetic_shapes_tiny_val")
    names = sorted(os.listdir(image_dir))[:2]
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        os.link(os.path.join(image_dir, name), folder / name)
    extra = tmp_path / "extra.jpg"
    Image.fromarray(np.full((90, 120, 3), 200, dtype=np.uint8)).save(extra)
    out = tmp_path / "drawn"
    args = ["--config-file", STINY, "--weights", saved_detector, "--input", str(folder), str(extra)]
    result = draw(*args, "--output", str(out), "--score-threshold", "0", "MODEL.DEVICE", "cpu")
    assert result.returncode == 0, result.stderr
    written = sorted(os.listdir(out))
    assert written == sorted([os.path.splitext(n)[0] + ".png" for n in names] + ["extra.png"])
    assert png_size(out / "extra.png") == (640, 480)  # small images are drawn enlarged (short side 480)
    # a second run never replaces the first one's drawings
    again = draw(*args, "--output", str(out), "MODEL.DEVICE", "cpu")
    assert again.returncode != 0 and "exists" in again.stderr and "choose another --output" in again.stderr


def test_draw_detections_refuses_wrong_weights_and_missing_inputs(saved_detector, tmp_path):
    # the ResNet twin's config with ScaleNet weights: an error, not a warning
    twin = os.path.join(REPO, "configs", "Synthetic", "faster_rcnn_Rtiny_FPN.yaml")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    result = draw(
        "--config-file",
        twin,
        "--weights",
        saved_detector,
        "--input",
        str(image),
        "--output",
        str(tmp_path / "o"),
        "MODEL.DEVICE",
        "cpu",
    )
    assert result.returncode != 0 and saved_detector in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
    missing = draw(
        "--config-file",
        STINY,
        "--weights",
        saved_detector,
        "--input",
        str(tmp_path / "nope.jpg"),
        "--output",
        str(tmp_path / "o"),
    )
    assert missing.returncode != 0 and "nope.jpg: no such image file or folder" in missing.stderr
