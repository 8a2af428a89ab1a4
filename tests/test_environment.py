"""The environment is real: stock detectron2 trains, infers and evaluates on this CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from scalenet_d2.evaluation import build_coco_evaluator, has_compiled_ops

needs_fallback = pytest.mark.skipif(has_compiled_ops(), reason="detectron2 here was built with its compiled ops")


def _synthetic_batch(height=224, width=288):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8).float()
    gt = Instances((height, width))
    gt.gt_boxes = Boxes(torch.tensor([[20.0, 30.0, 120.0, 150.0], [100.0, 40.0, 260.0, 200.0]]))
    gt.gt_classes = torch.tensor([3, 17])
    return [{"image": image, "height": height, "width": width, "instances": gt}]


def test_stock_faster_rcnn_trains_one_step_and_infers():
    from detectron2 import model_zoo  # needs pkg_resources: tools/setup_env.sh makes sure it is there

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with EventStorage():  # the training forward logs proposal statistics
        losses = model(_synthetic_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    for name, value in losses.items():
        assert torch.isfinite(value), f"{name} = {value}"
    total = sum(losses.values())
    total.backward()
    optimizer.step()

    model.eval()
    with torch.no_grad():
        (output,) = model(_synthetic_batch(200, 300))
    instances = output["instances"]
    assert instances.image_size == (200, 300)
    assert instances.pred_boxes.tensor.shape[1] == 4
    assert len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE


def _write_coco(tmp_path, num_images=3):
    """A COCO-format dataset of a few synthetic images with two categories."""
    import cv2

    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        h, w = 64 + 16 * image_id, 96
        cv2.imwrite(str(tmp_path / f"{image_id}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for k, (x, y, bw, bh) in enumerate([(5, 6, 30, 20), (40, 30, 25, 28)]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": k + 1,
                    "bbox": [x + image_id, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def coco_dataset(tmp_path):
    name = f"scalenet_d2_env_test_{os.getpid()}"
    register_coco_instances(name, {}, str(_write_coco(tmp_path)), str(tmp_path))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _predictions_from_ground_truth(dataset_name, drop_class=None):
    """Model outputs that repeat the ground truth (optionally missing one class)."""
    records = DatasetCatalog.get(dataset_name)
    outputs = []
    for record in records:
        kept = [a for a in record["annotations"] if a["category_id"] != drop_class]
        instances = Instances((record["height"], record["width"]))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in kept]
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.scores = torch.ones(len(kept))
        instances.pred_classes = torch.tensor([a["category_id"] for a in kept], dtype=torch.int64)
        outputs.append({"instances": instances})
    return records, outputs


def _evaluate(evaluator, records, outputs):
    evaluator.reset()
    evaluator.process([{"image_id": r["image_id"]} for r in records], outputs)
    return evaluator.evaluate()


def test_coco_evaluator_scores_synthetic_dataset(coco_dataset, tmp_path):
    evaluator = build_coco_evaluator(coco_dataset, output_dir=str(tmp_path / "eval"))
    records, outputs = _predictions_from_ground_truth(coco_dataset)
    results = _evaluate(evaluator, records, outputs)
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP50"] == pytest.approx(100.0)

    # Contiguous ids: class 0 is COCO category 1. Missing every "square" halves the mean AP.
    records, outputs = _predictions_from_ground_truth(coco_dataset, drop_class=0)
    results = _evaluate(evaluator, records, outputs)
    assert results["bbox"]["AP"] == pytest.approx(50.0)
    assert results["bbox"]["AP-square"] == pytest.approx(0.0)
    assert results["bbox"]["AP-disc"] == pytest.approx(100.0)


@needs_fallback
def test_missing_compiled_ops_raise_a_clear_error(coco_dataset):
    from detectron2 import _C
    from detectron2.layers import ROIAlignRotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 6.0, 0.0]])
    with pytest.raises(AttributeError, match="'box_iou_rotated' is unavailable.*Build detectron2 from source"):
        pairwise_iou_rotated(boxes, boxes)
    pooler = ROIAlignRotated((2, 2), spatial_scale=1.0, sampling_ratio=2)
    with pytest.raises(AttributeError, match="'roi_align_rotated_forward' is unavailable"):
        pooler(torch.randn(1, 4, 16, 16), torch.tensor([[0.0, 8.0, 8.0, 4.0, 4.0, 30.0]]))
    assert not hasattr(_C, "COCOevalAccumulate")

    # The compiled COCO evaluator, asked for explicitly, names itself too.
    from detectron2.evaluation import COCOEvaluator

    evaluator = COCOEvaluator(coco_dataset, output_dir=None, use_fast_impl=True)
    records, outputs = _predictions_from_ground_truth(coco_dataset)
    with pytest.raises(AttributeError, match="'InstanceAnnotation' is unavailable"):
        _evaluate(evaluator, records, outputs)


@needs_fallback
def test_collect_env_reports_the_fallback_honestly():
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "installed without compiled ops (scalenet_d2 CPU fallback)" in info
    assert "detectron2" in info


def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_package_registers_its_builders():
    # a fresh interpreter: what `import scalenet_d2` alone registers with detectron2
    code = (
        "from detectron2.modeling import BACKBONE_REGISTRY\n"
        "before = {n for n, _ in BACKBONE_REGISTRY}\n"
        "import scalenet_d2\n"
        "print(sorted((n, f.__module__) for n, f in BACKBONE_REGISTRY if n not in before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(
        sorted(
            [
                ("build_resnet_twin_fpn_backbone", "scalenet_d2.modeling.resnet_twin"),
                ("build_retinanet_scalenet_fpn_backbone", "scalenet_d2.modeling.scalenet"),
                ("build_scalenet_backbone", "scalenet_d2.modeling.scalenet"),
                ("build_scalenet_fpn_backbone", "scalenet_d2.modeling.scalenet"),
            ]
        )
    )


def test_setup_is_idempotent(repo_root):
    venv = repo_root / ".venv"
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        pytest.skip("tests are not running in the environment made by tools/setup_env.sh")
    stamp = venv / ".scalenet_d2-setup"
    before = stamp.read_text()
    result = subprocess.run(["bash", str(repo_root / "tools" / "setup_env.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "is up to date" in result.stdout
    assert stamp.read_text() == before


@pytest.mark.parametrize(
    "c_module, expected",
    [
        ("def get_compiler_version():\n    return 'gcc'\n", "compiled"),  # a user's own build
        (None, "broken: detectron2 at"),  # importable, but its compiled ops are not
        ("SCALENET_D2_FALLBACK = True\n", "fallback"),
    ],
)
def test_setup_recognises_the_detectron2_it_finds(repo_root, tmp_path, c_module, expected):
    """tools/setup_env.sh installs the fallback only on 'missing' and leaves every other install alone."""
    package = tmp_path / "detectron2"
    package.mkdir()
    (package / "__init__.py").write_text("__version__ = '0.6'\n")
    if c_module is not None:
        (package / "_C.py").write_text(c_module)
    script = repo_root / "tools" / "detectron2_fallback" / "ensure_detectron2.py"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # shadows the installed detectron2
    result = subprocess.run([sys.executable, str(script), "status"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected)


def test_setup_installs_the_fallback_only_where_detectron2_is_missing(repo_root):
    script = repo_root / "tools" / "detectron2_fallback" / "ensure_detectron2.py"
    # sys.modules[name] = None makes `import detectron2` fail as if it were not installed
    code = (
        "import runpy, sys; sys.modules['detectron2'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(script), "status"], capture_output=True, text=True)
    assert result.stdout.strip() == "missing", result.stderr


def test_detectron2_env_module_makes_get_cfg_know_scalenet(repo_root):
    # what detectron2's own tools do with a ScaleNet config, with DETECTRON2_ENV_MODULE set
    code = (
        "from detectron2.config import get_cfg\n"
        "from detectron2.modeling import build_model\n"
        "cfg = get_cfg()\n"
        f"cfg.merge_from_file({str(repo_root / 'configs/Synthetic/faster_rcnn_Stiny_FPN.yaml')!r})\n"
        "cfg.MODEL.DEVICE = 'cpu'\n"
        "model = build_model(cfg)\n"
        "print(type(model.backbone.bottom_up).__name__, cfg.MODEL.SCALENET.ALLOCATION)\n"
    )
    env = dict(os.environ, DETECTRON2_ENV_MODULE="scalenet_d2.d2_env")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ScaleNet", "scalenet_tiny"]
    # without it, detectron2's get_cfg does not know the keys: the module is what makes the difference
    env.pop("DETECTRON2_ENV_MODULE")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode != 0 and "Non-existent config key: MODEL.SCALENET" in result.stderr
