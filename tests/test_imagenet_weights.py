"""ImageNet weights of both arms: the ResNet twin trained by the ScaleNet recipe, conversion with
provenance (sha256, allocation), strict loading into the twin detector configs."""

import hashlib
import logging
import pickle

import pytest
import torch
import torchvision
from conftest import REPO_ROOT, TINY_TRAIN, train_net, write_image_folder

from scalenet_d2 import model_zoo
from scalenet_d2.checkpoint import ScaleNetCheckpointer
from scalenet_d2.checkpoint.classifier import ALLOCATION_KEY, NETWORK_KEY, SEED_KEY, ClassifierCheckpointError
from scalenet_d2.checkpoint.published import CheckpointMismatchError, convert_published_checkpoint
from scalenet_d2.checkpoint.sources import IMAGENET_WEIGHTS
from scalenet_d2.modeling.allocation import Allocation, load_allocation
from scalenet_d2.modeling.classification import ResNetTwinClassifier, ScaleNetClassifier


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(root, "train", 6, seed=1)  # 18 images: 3 iterations of 6 per epoch
    return root


def _train(dataset, out, extra):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_classifier_tool", REPO_ROOT / "tools" / "train_classifier.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = [str(dataset), "--image-size", "64", "--workers", "0", "--batch-size", "6", "--output-dir", str(out)]
    return tool.main(argv + extra.split())


def test_twin_classifier_is_torchvisions_resnet_for_published_allocations():
    for name, depth in (("scalenet50", 50), ("scalenet50_light", 50), ("scalenet101", 101), ("scalenet152", 152)):
        with torch.device("meta"):
            twin = ResNetTwinClassifier(name).state_dict()
            tv = getattr(torchvision.models, f"resnet{depth}")().state_dict()
        assert {k: v.shape for k, v in twin.items()} == {k: v.shape for k, v in tv.items()}, name


def test_twin_trains_by_the_scalenet_recipe_resumes_exactly_converts_and_loads(dataset, tmp_path, env):
    # uninterrupted, 2 epochs; and stopped after epoch 1 then resumed: the same weights, bit for bit
    whole, part = tmp_path / "whole", tmp_path / "part"
    recipe = "--resnet-twin --allocation scalenet_tiny --epochs 2 --lr 0.05 --warmup-epochs 0.5"
    _train(dataset, whole, recipe)
    _train(dataset, part, recipe + " --max-iters 3")  # the end of epoch 1
    _train(dataset, part, recipe + " --resume")
    a = torch.load(whole / "model_final.pth", map_location="cpu", weights_only=True)
    b = torch.load(part / "model_final.pth", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert "resumed from" in (part / "log.txt").read_text()
    assert "training ResNet twin of 'scalenet_tiny'" in (whole / "log.txt").read_text()

    # marked as a twin of its allocation, in torchvision's layout; not a seed
    assert a[NETWORK_KEY] == "resnet_twin" and SEED_KEY not in a
    assert Allocation.from_dict(a[ALLOCATION_KEY]).same_network(load_allocation("scalenet_tiny"))
    assert "layer1.0.downsample.0.weight" in a["model"] and "layer1.0.conv2.weight" in a["model"]

    # a ScaleNet run cannot resume a twin's checkpoint
    with pytest.raises(ClassifierCheckpointError, match=r"'scalenet_d2_network' is 'resnet_twin', not .*'scalenet'"):
        _train(dataset, part, "--allocation scalenet_tiny --epochs 3 --resume")

    # one command converts it; the result loads strictly into the twin's detector config and
    # its body computes what the classifier's features do
    lines = []
    out = tmp_path / "twin.pkl"
    convert_published_checkpoint(str(whole / "model_final.pth"), str(out), log=lines.append)
    sha = hashlib.sha256((whole / "model_final.pth").read_bytes()).hexdigest()
    assert f"sha256 {sha}" in lines[0]
    assert any("ResNet twin of allocation 'scalenet_tiny' (recorded in the checkpoint)" in line for line in lines)
    meta = pickle.loads(out.read_bytes())
    assert meta["scalenet_network"] == "resnet_twin" and meta["scalenet_source_sha256"] == sha
    assert meta["scalenet_source"] == "model_final.pth" and meta["scalenet_allocation"]["name"] == "scalenet_tiny"

    from detectron2.modeling import build_model

    cfg = model_zoo.get_config("Synthetic/faster_rcnn_Rtiny_FPN.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    model = build_model(cfg).eval()
    ScaleNetCheckpointer(model).load(str(out))
    classifier = ResNetTwinClassifier("scalenet_tiny", num_classes=3).eval()
    classifier.load_state_dict(a["model"])
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = classifier.forward_features(x)
        got = model.backbone.bottom_up(x)["res5"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # the same file in train_net.py: loads strictly, and the log says which file it came from
    rc, log = train_net(
        env,
        "--config-file",
        "configs/Synthetic/faster_rcnn_Rtiny_FPN.yaml",
        *TINY_TRAIN,
        "SOLVER.MAX_ITER",
        "1",
        "TEST.EVAL_PERIOD",
        "0",
        "MODEL.WEIGHTS",
        str(out),
        "OUTPUT_DIR",
        str(tmp_path / "det"),
        timeout=300,
    )
    assert rc == 0, log[-3000:]
    logged = (tmp_path / "det" / "log.txt").read_text()
    assert (
        f"ResNet twin of allocation 'scalenet_tiny', converted by scalenet_d2 from model_final.pth (sha256 {sha})"
        in (logged)
    )


def test_torchvision_resnet_converts_with_its_sha256_into_the_R50_config(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    lines = []
    out = tmp_path / "R-50-torchvision.pkl"
    convert_published_checkpoint(str(path), str(out), log=lines.append)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert lines[0] == f"Input: {path} ({path.stat().st_size} bytes), sha256 {sha}"
    assert any(
        "(matched by the weight shapes): stem 64, bottleneck widths 64/128/256/512, blocks 3/4/6/3" in x for x in lines
    )

    from detectron2.modeling import build_model

    cfg = model_zoo.get_config("COCO-Detection/faster_rcnn_R50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    checkpoint_logger = logging.getLogger("scalenet_d2.checkpoint.checkpointer")
    checkpoint_logger.addHandler(handler)
    level = checkpoint_logger.level
    checkpoint_logger.setLevel(logging.INFO)
    try:
        ScaleNetCheckpointer(model).load(str(out))  # refuses any body tensor left unloaded or unused
    finally:
        checkpoint_logger.removeHandler(handler)
        checkpoint_logger.setLevel(level)
    assert any(f"from resnet50-0676ba61.pth (sha256 {sha})" in r.getMessage() for r in records)
    body = model.backbone.bottom_up
    sd = torch.load(path, weights_only=True)
    assert torch.equal(body.res4[5].conv3.norm.running_var, sd["layer3.5.bn3.running_var"])
    assert torch.equal(body.res2[0].shortcut.weight, sd["layer1.0.downsample.0.weight"])

    # a ScaleNet checkpoint converts as before, now with its sha256 and inferred allocation stored
    sn = tmp_path / "scalenet_tiny.pth"
    torch.save(ScaleNetClassifier("scalenet_tiny", 10).state_dict(), sn)
    lines = []
    convert_published_checkpoint(str(sn), str(tmp_path / "sn.pkl"), log=lines.append)
    meta = pickle.loads((tmp_path / "sn.pkl").read_bytes())
    assert meta["scalenet_network"] == "scalenet" and meta["scalenet_allocation"]["name"] == "scalenet_tiny"
    assert meta["scalenet_source_sha256"] == hashlib.sha256(sn.read_bytes()).hexdigest()
    assert any("Allocation (inferred from the weight shapes): 'scalenet_tiny'" in x for x in lines)

    # a ResNet that is the twin of no bundled allocation needs --allocation; nothing is written
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointMismatchError, match="twin of no bundled allocation"):
        convert_published_checkpoint(str(tmp_path / "r34.pth"), str(tmp_path / "r34.pkl"), log=lines.append)
    assert not (tmp_path / "r34.pkl").exists()


def test_every_config_weight_file_says_where_it_comes_from(repo_root):
    named = set()
    for path in (repo_root / "configs").rglob("*"):
        if path.suffix in (".yaml", ".py"):
            named |= {w.split("/")[-1] for w in path.read_text().split('"') if w.startswith("pretrained/")}
    assert named and named <= set(IMAGENET_WEIGHTS), named - set(IMAGENET_WEIGHTS)
