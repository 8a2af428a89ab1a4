"""A corpus of bad or odd inputs, as a new user would give them.

Each case prepares its files in an empty folder, then feeds the bad input to the package or
a tool. It passes when the error names the input (file, field or flag) and what was expected,
and when no file in the folder changed (an existing output survives a failed run).
"""

import hashlib
import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import folder_snapshot
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image
from reference_scalenet import ReferenceScaleNet, randomize, rows_from_project_file

import scalenet_d2
from scalenet_d2 import ScaleNet, load_allocation
from scalenet_d2.checkpoint.classifier import SEED_KEY
from scalenet_d2.data import explain_dataset_failure
from scalenet_d2.data.resumable import TrainStream
from scalenet_d2.modeling.allocation import BUNDLED_DIR
from scalenet_d2.modeling.classification import ScaleNetClassifier
from scalenet_d2.neuron_allocation.pruning import seed_allocation

REPO = Path(__file__).resolve().parents[1]
CASES = {}


def case(name):
    def register(function):
        CASES[name] = function
        return function

    return register


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _published_tiny():
    rows, blocks, planes, stem = rows_from_project_file(BUNDLED_DIR / "scalenet_tiny.json")
    return randomize(ReferenceScaleNet(rows, blocks, planes, stem), seed=0).state_dict()


def _detector(detector_cfg, allocation="scalenet_tiny", backbone=None):
    cfg = detector_cfg("fpn", allocation=allocation)
    if backbone:
        cfg.defrost()
        cfg.MODEL.BACKBONE.NAME = backbone
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.RESNETS.NORM = cfg.MODEL.SCALENET.NORM
    return build_model(cfg)


def _load_weights(detector_cfg, path, **kwargs):
    model = _detector(detector_cfg)
    return lambda: scalenet_d2.ScaleNetCheckpointer(model, **kwargs).load(str(path))


def _detector_checkpoint(detector_cfg, ws, name, change=None, **kwargs):
    model = _detector(detector_cfg, **kwargs)
    state = model.state_dict()
    if change:
        change(state)
    torch.save({"model": state}, ws / name)
    return ws / name


# ----------------------------------------------------------------------------- weights
@case("weights: unconverted published ScaleNet .pth")
def _(ws, detector_cfg):
    path = ws / "ScaleNet-tiny.pth"
    torch.save(_published_tiny(), path)
    return _load_weights(detector_cfg, path), [
        str(path),
        "unconverted ImageNet ScaleNet checkpoint",
        f"python tools/convert_scalenet_to_d2.py {path} pretrained/ScaleNet-tiny.pkl",
    ]


@case("weights: published ScaleNet under 'state_dict'")
def _(ws, detector_cfg):
    path = ws / "published.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in _published_tiny().items()}, "epoch": 100}, path)
    return _load_weights(detector_cfg, path), [str(path), "unconverted ImageNet ScaleNet", "convert it first"]


@case("weights: torchvision ResNet layout")
def _(ws, detector_cfg):
    path = ws / "resnet50-torchvision.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv2.weight": torch.zeros(64, 64, 3, 3)}, path)
    command = f"python tools/convert_scalenet_to_d2.py {path} pretrained/resnet50-torchvision.pkl"
    return _load_weights(detector_cfg, path), [str(path), "unconverted ImageNet ResNet", command]


@case("weights: empty file")
def _(ws, detector_cfg):
    (ws / "empty.pth").write_bytes(b"")
    return _load_weights(detector_cfg, ws / "empty.pth"), [f"{ws / 'empty.pth'} is empty (0 bytes), not a checkpoint"]


@case("weights: truncated .pth")
def _(ws, detector_cfg):
    path = _detector_checkpoint(detector_cfg, ws, "model_final.pth")
    path.write_bytes(path.read_bytes()[:5000])
    return _load_weights(detector_cfg, path), [f"{path} (5000 bytes) is a torch checkpoint that is truncated"]


@case("weights: truncated .pkl")
def _(ws, detector_cfg):
    path = ws / "converted.pkl"
    path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.zeros((16, 3, 7, 7), np.float32)}})[:300])
    return _load_weights(detector_cfg, path), [f"{path} (300 bytes) is a pickle that is truncated or corrupt"]


@case("weights: a text file")
def _(ws, detector_cfg):
    (ws / "weights.pth").write_text("https://example.com/model.pth\n")
    return _load_weights(detector_cfg, ws / "weights.pth"), [
        f"{ws / 'weights.pth'} (30 bytes) is not a checkpoint: neither torch.save's zip format nor a pickle"
    ]


@case("weights: a list, not a state_dict")
def _(ws, detector_cfg):
    torch.save([torch.zeros(3)], ws / "list.pth")
    return _load_weights(detector_cfg, ws / "list.pth"), [f"{ws / 'list.pth'} is not a model checkpoint", "got list"]


@case("weights: Python objects in the checkpoint")
def _(ws, detector_cfg):
    torch.save({"model": {}, "args": Path("x")}, ws / "objects.pth")
    return _load_weights(detector_cfg, ws / "objects.pth"), [
        str(ws / "objects.pth"),
        "holds Python objects besides tensors",
        "weights_only=False",
    ]


@case("weights: the ResNet twin's detector into the ScaleNet detector")
def _(ws, detector_cfg):
    path = _detector_checkpoint(detector_cfg, ws, "twin.pth", backbone="build_resnet_twin_fpn_backbone")
    return _load_weights(detector_cfg, path), [
        f"{path} does not fit the model's backbone: ",
        "backbone tensors are not loaded or not used; first 'backbone.bottom_up.res2.0.bn1.weight': shape (8,) "
        "in the model, absent from the checkpoint",
        "MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS",
    ]


@case("weights: a detector of another allocation")
def _(ws, detector_cfg):
    other = json.loads((BUNDLED_DIR / "scalenet_tiny.json").read_text())
    other["name"] = "tiny_wider"
    other["stages"][0]["blocks"][0] = [5, 2, 1, 1]
    (ws / "tiny_wider.json").write_text(json.dumps(other))
    path = _detector_checkpoint(detector_cfg, ws, "wider.pth", allocation=str(ws / "tiny_wider.json"))
    return _load_weights(detector_cfg, path), [
        f"{path} does not fit the model's backbone: ",
        "first 'backbone.bottom_up.res2.0.conv2.0.weight': shape (5, 8, 3, 3) in the checkpoint, (4, 8, 3, 3) in the model",
    ]


@case("weights: nan in a tensor")
def _(ws, detector_cfg):
    def poison(state):
        state["backbone.bottom_up.res3.0.conv1.weight"][0, 0] = float("nan")

    path = _detector_checkpoint(detector_cfg, ws, "nan.pth", poison)
    return _load_weights(detector_cfg, path), [
        f"{path}: tensor 'backbone.bottom_up.res3.0.conv1.weight' holds nan or inf (1 of "
    ]


@case("weights: integer tensor for a float weight")
def _(ws, detector_cfg):
    def to_int(state):
        state["roi_heads.box_predictor.cls_score.weight"] = state["roi_heads.box_predictor.cls_score.weight"].long()

    path = _detector_checkpoint(detector_cfg, ws, "int.pth", to_int)
    return _load_weights(detector_cfg, path), [
        f"{path}: tensor 'roi_heads.box_predictor.cls_score.weight' is torch.int64; expected floating-point weights"
    ]


@case("resume: every checkpoint broken")
def _(ws, detector_cfg):
    (ws / "model_0000009.pth").write_bytes(b"PK\x03\x04broken")
    (ws / "model_final.pth").write_bytes(b"")
    (ws / "last_checkpoint").write_text("model_final.pth")
    model = _detector(detector_cfg)
    checkpointer = scalenet_d2.ScaleNetCheckpointer(model, str(ws))
    return lambda: checkpointer.resume_or_load("", resume=True), [
        f"--resume: no intact checkpoint in {ws}: ",
        f"{ws / 'model_final.pth'} is empty",
        f"{ws / 'model_0000009.pth'} (10 bytes) is a torch checkpoint that is truncated or corrupt",
    ]


# ----------------------------------------------------------------------------- model inputs
@case("config: MODEL.BACKBONE.FREEZE_AT 7")
def _(ws, detector_cfg):
    cfg = detector_cfg("fpn")
    cfg.defrost()
    cfg.MODEL.BACKBONE.FREEZE_AT = 7
    return lambda: build_model(cfg), ["freeze_at 7: expected 0 (nothing) .. 5"]


@case("config: FPN inputs the body does not return")
def _(ws, detector_cfg):
    cfg = detector_cfg("fpn")
    cfg.defrost()
    cfg.MODEL.SCALENET.OUT_FEATURES = ["res2", "res3"]
    return lambda: build_model(cfg), ["MODEL.SCALENET.OUT_FEATURES is ['res2', 'res3'] (missing ['res4', 'res5'])"]


@case("config: FPN inputs that leave a level the RPN reads")
def _(ws, detector_cfg):
    cfg = detector_cfg("fpn")
    cfg.defrost()
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]  # p3..p6, while the RPN reads p2..p6
    return lambda: build_model(cfg), [
        "MODEL.RPN.IN_FEATURES ['p2', 'p3', 'p4', 'p5', 'p6']: ['p2'] not among the FPN's outputs "
        "['p3', 'p4', 'p5', 'p6']",
        "expected a subset of",
    ]


@case("config: FPN inputs in reverse order")
def _(ws, detector_cfg):
    cfg = detector_cfg("fpn")
    cfg.defrost()
    cfg.MODEL.FPN.IN_FEATURES = ["res5", "res4", "res3", "res2"]
    return lambda: build_model(cfg), [
        "MODEL.FPN.IN_FEATURES ['res5', 'res4', 'res3', 'res2']: expected consecutive stages in order of stride",
        "['res2', 'res3', 'res4', 'res5']",
    ]


@case("config: RetinaNet head features the FPN does not give")
def _(ws, detector_cfg):
    cfg = detector_cfg("retinanet")
    cfg.defrost()
    cfg.MODEL.RETINANET.IN_FEATURES = ["p2", "p3"]
    return lambda: build_model(cfg), ["MODEL.RETINANET.IN_FEATURES ['p2', 'p3']: ['p2'] not among the FPN's outputs"]


@case("backbone: uint8 images")
def _(ws, detector_cfg):
    body = ScaleNet("scalenet_tiny")
    return lambda: body(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)), ["floating-point images", "got torch.uint8"]


@case("backbone: 4-channel images")
def _(ws, detector_cfg):
    body = ScaleNet("scalenet_tiny")
    return lambda: body(torch.zeros(1, 4, 64, 64)), ["images of shape (N, 3, H, W)", "[1, 4, 64, 64]"]


# ----------------------------------------------------------------------------- allocation files
def _allocation_with(ws, change):
    data = json.loads((BUNDLED_DIR / "scalenet_tiny.json").read_text())
    change(data)
    path = ws / "mine.json"
    path.write_text(json.dumps(data))
    return path


@case("allocation: misspelt top-level field")
def _(ws, detector_cfg):
    path = _allocation_with(ws, lambda d: d.__setitem__("stem_channel", d.pop("stem_channels")))
    return lambda: load_allocation(str(path)), [
        str(path),
        'unknown field "stem_channel"; did you mean "stem_channels"?',
    ]


@case("allocation: misspelt stage field")
def _(ws, detector_cfg):
    path = _allocation_with(ws, lambda d: d["stages"][2].__setitem__("plane", d["stages"][2].pop("planes")))
    return lambda: load_allocation(str(path)), [
        f"{path}: stages[2] (res4)",
        'unknown field "plane"; did you mean "planes"?',
    ]


@case("allocation: widths too large to build")
def _(ws, detector_cfg):
    path = _allocation_with(ws, lambda d: d["stages"][3].update(planes=4_000_000, blocks=[[4_000_000, 0, 0, 0]]))
    return lambda: load_allocation(str(path)), [str(path), "billion conv weights", "expected at most 2 billion"]


@case("allocation: row format with sides that grow")
def _(ws, detector_cfg):
    rows = load_allocation("scalenet50").to_rows()
    mirrored = {56: 7, 28: 14, 14: 28, 7: 56}
    (ws / "rows.json").write_text(json.dumps([row[:4] + [mirrored[row[4]]] for row in rows]))
    return lambda: load_allocation(str(ws / "rows.json")), [
        f"{ws / 'rows.json'}: rows 4-7 (res3): side 14; expected 3, half the side 7 of rows 1-3 (res2)"
    ]


@case("allocation: a stage side that does not halve")
def _(ws, detector_cfg):
    path = _allocation_with(ws, lambda d: d["stages"][2].update(side=28))
    return lambda: load_allocation(str(path)), [
        f"{path}: stages[2] (res4): side 28; expected 14, half the side 28 of stages[1] (res3)"
    ]


@case("allocation: not JSON")
def _(ws, detector_cfg):
    (ws / "mine.json").write_text('{"format": "scalenet_d2.allocation",')
    return lambda: load_allocation(str(ws / "mine.json")), [str(ws / "mine.json"), "line 1"]


# ----------------------------------------------------------------------------- datasets
def _annotation_error(ws, text, for_training=True):
    path = ws / "instances.json"
    path.write_text(text)
    name = f"bad_inputs_{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=str(path))
    return lambda: (_ for _ in ()).throw(explain_dataset_failure([name], ValueError("load failed"), for_training)), [
        f"dataset '{name}': annotation file {path}"
    ]


@case("annotations: JSON syntax error")
def _(ws, detector_cfg):
    action, expected = _annotation_error(ws, '{"images": [\n  {"id": 1},\n]}')
    return action, expected + ["is not valid JSON: Expecting value at line 3 column 1 (byte 26)"]


@case("annotations: a list at the top level")
def _(ws, detector_cfg):
    action, expected = _annotation_error(ws, "[]")
    return action, expected + ['the top level is a JSON list; expected an object with "images", "annotations"']


@case("annotations: no annotations")
def _(ws, detector_cfg):
    action, expected = _annotation_error(ws, '{"images": [{"id": 1}], "annotations": [], "categories": []}')
    return action, expected + ['"annotations" is a list of length 0; expected a non-empty list']


@case("images: a truncated training image")
def _(ws, detector_cfg):
    from detectron2.data import DatasetMapper

    good = ws / "good.jpg"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(good)
    broken = ws / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:200])
    cfg = detector_cfg("fpn")
    records = [{"file_name": str(broken), "image_id": 7, "height": 32, "width": 32, "annotations": []}]
    stream = TrainStream(records, DatasetMapper(cfg, is_train=True), seed=0, dataset_names=["my_train"])
    return lambda: stream[0], ["my_train: cannot load training image", str(broken), "(image_id 7)"]


@case("images: a truncated image in an evaluation set")
def _(ws, detector_cfg):
    from scalenet_d2.engine import Trainer

    good = ws / "good.jpg"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(good)
    broken = ws / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:200])
    name = "bad_inputs_truncated_val"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    records = [{"file_name": str(broken), "image_id": 11, "height": 32, "width": 32}]
    DatasetCatalog.register(name, lambda: records)
    loader = Trainer.build_test_loader(detector_cfg("fpn"), name)
    return lambda: next(iter(loader)), [
        f"dataset '{name}': cannot load evaluation image {broken} (image_id 11): OSError:",
        "(in DataLoader worker process 0)",  # detector_cfg loads with workers, as COCO configs do
    ]


@case("images: a truncated image in ImageFolder data of train_classifier.py")
def _(ws, detector_cfg):
    folder = ws / "data" / "train" / "cat"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / f"{i}.jpg")
    broken = folder / "3.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    argv = [str(ws / "data"), "--depth", "50", "--multiplier", "0.05", "--epochs", "1", "--batch-size", "2"]
    argv += ["--image-size", "32", "--workers", "0", "--output-dir", str(ws.parent / "classifier"), "--device", "cpu"]
    tool = _tool("train_classifier")
    return lambda: tool.train_classifier(tool.parse_args(argv)), [
        f"image {broken} (sample 3 of {folder.parent}) cannot be read: OSError:",
        "expected an image file PIL can decode",
    ]


# ----------------------------------------------------------------------------- tools
@case("converter: empty input")
def _(ws, detector_cfg):
    (ws / "in.pth").write_bytes(b"")
    (ws / "out.pkl").write_bytes(b"an earlier conversion")
    tool = _tool("convert_scalenet_to_d2")
    return lambda: tool.convert_published_checkpoint(str(ws / "in.pth"), str(ws / "out.pkl")), [
        f"{ws / 'in.pth'} is empty (0 bytes), not a checkpoint"
    ]


@case("converter: truncated input, with --allow-pickle")
def _(ws, detector_cfg):
    torch.save(_published_tiny(), ws / "in.pth")
    (ws / "in.pth").write_bytes((ws / "in.pth").read_bytes()[:4000])
    (ws / "out.pkl").write_bytes(b"an earlier conversion")
    tool = _tool("convert_scalenet_to_d2")
    action = lambda: tool.convert_published_checkpoint(str(ws / "in.pth"), str(ws / "out.pkl"), allow_pickle=True)  # noqa: E731
    return action, [f"{ws / 'in.pth'} (4000 bytes) is a torch checkpoint that is truncated or corrupt"]


@case("converter: integer weights")
def _(ws, detector_cfg):
    state = _published_tiny()
    state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"].long()
    torch.save(state, ws / "in.pth")
    (ws / "out.pkl").write_bytes(b"an earlier conversion")
    tool = _tool("convert_scalenet_to_d2")
    return lambda: tool.convert_published_checkpoint(str(ws / "in.pth"), str(ws / "out.pkl")), [
        f"{ws / 'in.pth'}: layer2.0.conv1.weight holds torch.int64 values; expected floating-point weights"
    ]


@case("converter: nan weights")
def _(ws, detector_cfg):
    state = _published_tiny()
    state["layer3.0.bn2.1.running_var"][0] = float("nan")
    torch.save(state, ws / "in.pth")
    tool = _tool("convert_scalenet_to_d2")
    return lambda: sys.exit(tool.main([str(ws / "in.pth"), str(ws / "out.pkl")])), [
        f"{ws / 'in.pth'}: layer3.0.bn2.1.running_var holds nan or inf values; expected finite weights"
    ]


@case("converter: a text file")
def _(ws, detector_cfg):
    (ws / "in.pth").write_text("not weights")
    tool = _tool("convert_scalenet_to_d2")
    return lambda: tool.convert_published_checkpoint(str(ws / "in.pth"), str(ws / "out.pkl")), [
        f"{ws / 'in.pth'} (11 bytes) is not a checkpoint"
    ]


@case("compare.py: a corrupt run record")
def _(ws, detector_cfg):
    (ws / "run").mkdir()
    (ws / "run" / "run_info.json").write_text('{"train_s_per_iter": ')
    tool = _tool("compare")
    return lambda: tool.main([str(ws / "run")]), [str(ws / "run" / "run_info.json")]


@case("allocate.py: an untrained seed")
def _(ws, detector_cfg):
    seed = seed_allocation("scalenet_tiny", 1.0)
    torch.save(
        {
            "model": ScaleNetClassifier(seed, 3).state_dict(),
            SEED_KEY: {"allocation": seed.to_dict(), "multiplier": 1.0},
        },
        ws / "seed.pth",
    )
    tool = _tool("allocate")
    return lambda: tool.main([str(ws / "seed.pth"), "--width-multiplier", "0.5", "--output", str(ws / "a.json")]), [
        f"seed checkpoint {ws / 'seed.pth'}: all ",
        "scale-branch BN gammas equal 1",
        "Expected a trained seed",
        "--force",
    ]


@case("train_classifier.py: --epochs 0")
def _(ws, detector_cfg):
    tool = _tool("train_classifier")
    return lambda: tool.parse_args([str(ws), "--epochs", "0"]), ["--epochs 0: expected a positive integer"]


@case("train_classifier.py: --image-size 0")
def _(ws, detector_cfg):
    tool = _tool("train_classifier")
    return lambda: tool.parse_args([str(ws), "--image-size", "0"]), ["--image-size 0: expected a positive integer"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_named_with_what_was_expected(name, tmp_path, detector_cfg, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    action, expected = CASES[name](ws, detector_cfg)
    before = folder_snapshot(ws)
    with pytest.raises((Exception, SystemExit)) as info:
        action()
    message = str(info.value) + capsys.readouterr().err
    for fragment in expected:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"
    assert "Traceback" not in message
    assert folder_snapshot(ws) == before, f"{name}: files changed"


def test_partial_loads_are_allowed_when_asked(tmp_path, detector_cfg, caplog):
    path = _detector_checkpoint(detector_cfg, tmp_path, "twin.pth", backbone="build_resnet_twin_fpn_backbone")
    model = _detector(detector_cfg)
    fpn_before = model.backbone.fpn_lateral2.weight.clone()
    scalenet_d2.ScaleNetCheckpointer(model, allow_partial=True).load(str(path))
    twin = torch.load(path, weights_only=True)["model"]
    assert torch.equal(model.backbone.fpn_lateral2.weight, twin["backbone.fpn_lateral2.weight"])
    assert not torch.equal(fpn_before, model.backbone.fpn_lateral2.weight)
    assert "(allowed: MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS)" in caplog.text


def test_detectron2_checkpoints_of_the_same_model_load_silently(tmp_path, detector_cfg):
    model = _detector(detector_cfg)
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    other = _detector(detector_cfg)
    scalenet_d2.ScaleNetCheckpointer(other).load(str(tmp_path / "model_final.pth"))
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_the_corpus_covers_every_class():
    classes = {name.split(":")[0] for name in CASES}
    assert classes >= {"weights", "resume", "config", "backbone", "allocation", "annotations", "images", "converter"}
    assert len(CASES) >= 30


def test_boxes_of_negative_size_are_dropped_from_training_and_logged_once_per_dataset(tmp_path, detector_cfg, caplog):
    from detectron2.data.datasets import register_coco_instances

    from scalenet_d2.data.resumable import build_resumable_train_loader

    images = [{"id": i, "file_name": f"{i}.jpg", "height": 32, "width": 32} for i in (1, 2)]
    annotations = [
        {"id": 41, "image_id": 1, "bbox": [2, 2, 10, 10], "category_id": 1, "iscrowd": 0, "area": 100},
        {"id": 42, "image_id": 1, "bbox": [20, 2, -5, 10], "category_id": 1, "iscrowd": 0, "area": 50},
        {"id": 43, "image_id": 2, "bbox": [4, 20, 8, -6], "category_id": 1, "iscrowd": 0, "area": 48},
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))
    before = folder_snapshot(tmp_path)
    name = "bad_inputs_negative_boxes"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(path), str(tmp_path))
    cfg = detector_cfg("fpn")
    cfg.defrost()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    with caplog.at_level("WARNING"):
        loader = build_resumable_train_loader(cfg, seed=0)
    # image 2 had no other box: dropped, as detectron2 drops images without annotations
    records = list(loader.stream.dicts)
    assert [r["image_id"] for r in records] == [1] and [a["bbox"] for a in records[0]["annotations"]] == [
        [2, 2, 10, 10]
    ]
    warnings = [r.getMessage() for r in caplog.records if "negative width or height" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"dataset '{name}': dropped 2 boxes with a negative width or height from training" in warnings[0]
    assert "(first: annotation id 42 of image id 1, bbox [20, 2, -5, 10])" in warnings[0]
    assert folder_snapshot(tmp_path) == before


def test_resuming_a_finished_run_whose_model_final_is_unreadable_writes_it_again(tmp_path):
    from test_train_net import CONFIG, TINY, train_net

    env = dict(os.environ, SCALENET_D2_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = str(tmp_path / "run")
    # CHECKPOINT_PERIOD 2, MAX_ITER 2: the last iteration writes model_0000001.pth and model_final.pth
    run = ["--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out]
    rc, log = train_net(env, *run)
    assert rc == 0, log[-3000:]
    final = os.path.join(out, "model_final.pth")
    with open(final, "r+b") as f:  # cut short, as a failing disk or a copy interrupted leaves it
        f.truncate(os.path.getsize(final) // 2)
    rc, log = train_net(env, "--resume", *run)
    assert rc == 0, log[-3000:]
    assert "Resume: skipping model_final.pth" in log
    assert f"Resume: the run had finished; wrote {final} again from model_0000001.pth" in log
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    rewritten = torch.load(final, map_location="cpu", weights_only=True)
    last = torch.load(os.path.join(out, "model_0000001.pth"), map_location="cpu", weights_only=True)
    assert rewritten["iteration"] == 1 and rewritten["model"].keys() == last["model"].keys()
    assert all(torch.equal(rewritten["model"][k], v) for k, v in last["model"].items())
