"""Checkpoint conversion (published layout -> detectron2) and strict loading."""

import argparse
import os
import pickle
import runpy
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from reference_scalenet import ReferenceScaleNet, randomize, rows_from_project_file

import scalenet_d2
from scalenet_d2 import (
    CheckpointMismatchError,
    ScaleNet,
    ScaleNetCheckpointer,
    convert_published_checkpoint,
    convert_published_state_dict,
    infer_allocation,
    load_allocation,
)

TINY_FILE = scalenet_d2.modeling.allocation.BUNDLED_DIR / "scalenet_tiny.json"


def tiny_reference(seed=0):
    rows, blocks, planes, stem = rows_from_project_file(TINY_FILE)
    return randomize(ReferenceScaleNet(rows, blocks, planes, stem), seed=seed)


@pytest.fixture(scope="module")
def tiny_state_dict():
    return tiny_reference().state_dict()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_state_dict):
    """The tiny reference converted through the CLI, once."""
    folder = tmp_path_factory.mktemp("converted")
    torch.save(tiny_state_dict, folder / "tiny.pth")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "tools", "convert_scalenet_to_d2.py"),
            str(folder / "tiny.pth"),
            str(folder / "tiny.pkl"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return folder / "tiny.pkl", result.stdout


def test_cli_converts_and_says_what_it_did(converted, tiny_state_dict):
    path, stdout = converted
    assert "Allocation (inferred from the weight shapes): 'scalenet_tiny' (depth 14" in stdout
    assert "Dropped the ImageNet classifier: fc.weight (1000, 256), fc.bias (1000,)." in stdout
    assert "INPUT.FORMAT RGB" in stdout
    assert (
        "MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]" in stdout and "MODEL.PIXEL_STD [58.395, 57.12, 57.375]" in stdout
    )
    assert "release does not state" in stdout

    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "scalenet_d2" and data["matching_heuristics"] is True
    assert data["scalenet_allocation"]["name"] == "scalenet_tiny"
    weights = data["model"]
    # every backbone weight, under detectron2's names, and nothing else
    expected_keys = {k for k in ScaleNet("scalenet_tiny").state_dict()}
    assert set(weights) == expected_keys
    torch.testing.assert_close(torch.as_tensor(weights["stem.conv1.weight"]), tiny_state_dict["conv1.weight"])
    torch.testing.assert_close(
        torch.as_tensor(weights["stem.conv1.norm.running_var"]), tiny_state_dict["bn1.running_var"]
    )
    torch.testing.assert_close(torch.as_tensor(weights["res5.0.bn2.3.bias"]), tiny_state_dict["layer4.0.bn2.3.bias"])
    torch.testing.assert_close(
        torch.as_tensor(weights["res3.0.downsample.0.weight"]), tiny_state_dict["layer2.0.downsample.0.weight"]
    )


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module_prefix", "state_dict_module_prefix"])
def test_checkpoint_wrappers_are_accepted(tmp_path, tiny_state_dict, wrap):
    state = dict(tiny_state_dict)
    if "module_prefix" in wrap:
        state = {"module." + k: v for k, v in state.items()}
    obj = {"bare": state, "module_prefix": state, "model": {"model": state, "epoch": 90}}.get(wrap) or {
        "state_dict": state,
        "epoch": 90,
        "arch": "scalenet_tiny",
        "best_acc1": torch.tensor(70.0),
    }
    torch.save(obj, tmp_path / "in.pth")
    result = convert_published_checkpoint(str(tmp_path / "in.pth"), str(tmp_path / "out.pkl"), log=lambda s: None)
    assert result.allocation.name == "scalenet_tiny"
    assert len(result.model) == len(ScaleNet("scalenet_tiny").state_dict())
    assert [k for k, _ in result.dropped_classifier] == ["fc.weight", "fc.bias"]
    assert result.dropped_counters == sum(k.endswith("num_batches_tracked") for k in tiny_state_dict)


@pytest.mark.parametrize(
    "variant, prefix", [("plain", "backbone."), ("fpn", "backbone.bottom_up."), ("retinanet", "backbone.bottom_up.")]
)
def test_converted_weights_load_into_every_variant(converted, variant, prefix, detector_cfg):
    path, _ = converted
    with open(path, "rb") as f:
        weights = pickle.load(f)["model"]
    model = build_model(detector_cfg(variant))
    ScaleNetCheckpointer(model).load(str(path))
    state = model.state_dict()
    backbone_keys = {k[len(prefix) :] for k in state if k.startswith(prefix)}
    body = model.backbone if variant == "plain" else model.backbone.bottom_up
    built = {k for k in weights if k.startswith(("stem.",) + tuple(f"{name}." for name in body.stage_names))}
    assert backbone_keys == built  # no backbone weight missing, none left unused
    for key in built:
        assert torch.equal(state[prefix + key], torch.as_tensor(weights[key])), key

    # detectron2's own checkpointer finds the same tensors by suffix matching
    other = build_model(detector_cfg(variant))
    DetectionCheckpointer(other).load(str(path))
    other_state = other.state_dict()
    for key in built:
        assert torch.equal(other_state[prefix + key], torch.as_tensor(weights[key])), key


def test_stages_the_model_does_not_build_are_skipped(converted):
    path, _ = converted
    backbone = ScaleNet("scalenet_tiny", out_features=["res3"])
    ScaleNetCheckpointer(backbone).load(str(path))
    with open(path, "rb") as f:
        weights = pickle.load(f)["model"]
    assert torch.equal(backbone.state_dict()["res3.0.conv3.weight"], torch.as_tensor(weights["res3.0.conv3.weight"]))


def _other_tiny(tmp_path, change):
    data = load_allocation("scalenet_tiny").to_dict()
    change(data)
    data["name"] = "tiny_variant"
    path = tmp_path / "tiny_variant.json"
    scalenet_d2.Allocation.from_dict(data).save(path)
    return str(path)


def test_mismatching_checkpoint_fails_at_load_with_first_key_and_shapes(converted, tmp_path, detector_cfg):
    path, _ = converted
    variant = _other_tiny(tmp_path, lambda d: d["stages"][1]["blocks"].__setitem__(0, [9, 4, 2, 1]))
    model = build_model(detector_cfg("fpn", allocation=variant))
    with pytest.raises(CheckpointMismatchError) as info:
        ScaleNetCheckpointer(model).load(str(path))
    message = str(info.value)
    assert (
        f"{path} (converted from allocation 'scalenet_tiny') does not fit the model's ScaleNet 'backbone.bottom_up'"
        in message
    )
    assert (
        "first mismatching key 'res3.0.conv2.0.weight': shape (8, 16, 3, 3) in the checkpoint, (9, 16, 3, 3) in the model"
        in message
    )
    assert "9 more keys differ in shape" in message  # conv2.3, and bn2.0 / bn2.3 (4 entries each)
    assert "MODEL.SCALENET.ALLOCATION" in message


def test_missing_and_unused_keys_fail_at_load(converted, tmp_path):
    path, _ = converted
    # the same widths but without the scale-7 branch in res2: conv2.3 / bn2.3 of res2.0 unused
    variant = _other_tiny(tmp_path, lambda d: d["stages"][0]["blocks"].__setitem__(0, [4, 2, 2, 0]))
    with pytest.raises(CheckpointMismatchError) as info:
        ScaleNetCheckpointer(ScaleNet(variant)).load(str(path))
    message = str(info.value)
    assert (
        "first mismatching key 'res2.0.conv2.2.weight': shape (1, 8, 3, 3) in the checkpoint, (2, 8, 3, 3) in the model"
        in message
    )
    assert "5 keys of the checkpoint not in the model (first: 'res2.0.conv2.3.weight')" in message

    # a checkpoint that lacks keys the model has
    with open(path, "rb") as f:
        data = pickle.load(f)
    del data["model"]["res4.0.bn3.running_var"]
    broken = tmp_path / "broken.pkl"
    with open(broken, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"1 keys of the model missing from the checkpoint \(first: 'res4.0.bn3.running_var'\)",
    ):
        ScaleNetCheckpointer(ScaleNet("scalenet_tiny")).load(str(broken))


def test_other_checkpoints_load_as_with_detection_checkpointer(tmp_path):
    source = ScaleNet("scalenet_tiny", norm="BN")
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("plain")
    target = ScaleNet("scalenet_tiny", norm="BN")
    ScaleNetCheckpointer(target).load(str(tmp_path / "plain.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_converter_checks_the_given_allocation(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "tiny.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        convert_published_checkpoint(str(tmp_path / "tiny.pth"), str(tmp_path / "out.pkl"), allocation="scalenet50")
    assert str(info.value).startswith(
        f"{tmp_path / 'tiny.pth'} does not fit allocation 'scalenet50' (depth 50, blocks 3/4/6/3) from "
    )
    assert (
        "first mismatching key 'conv1.weight': shape (16, 3, 7, 7) in the checkpoint, (64, 3, 7, 7) in the allocation"
        in str(info.value)
    )
    assert not (tmp_path / "out.pkl").exists()

    # the CLI reports the same and exits with 1, no traceback
    tool = runpy.run_path(
        os.path.join(os.path.dirname(__file__), "..", "tools", "convert_scalenet_to_d2.py"), run_name="tool"
    )
    assert tool["main"]([str(tmp_path / "tiny.pth"), str(tmp_path / "out.pkl"), "--allocation", "scalenet50"]) == 1


def test_inference_of_unbundled_allocations_and_bad_checkpoints(tmp_path):
    reference = ReferenceScaleNet(
        [[5, 0, 2, 1, 56], [3, 3, 0, 2, 28], [30, 1, 1, 0, 14], [60, 3, 0, 1, 7]], [1, 1, 1, 1], [8, 16, 32, 64], 16
    )
    state = reference.state_dict()
    allocation = infer_allocation(state, source="custom.pth")
    assert allocation.name == "custom" and allocation.source == "custom.pth"
    assert [list(s.blocks[0]) for s in allocation.stages] == [[5, 0, 2, 1], [3, 3, 0, 2], [30, 1, 1, 0], [60, 3, 0, 1]]
    result = convert_published_state_dict(state, source="custom.pth")
    assert "res2.0.conv2.2.weight" in result.model and "res2.0.conv2.1.weight" not in result.model

    # converting the file also writes the allocation, for MODEL.SCALENET.ALLOCATION
    torch.save(state, tmp_path / "custom.pth")
    lines = []
    convert_published_checkpoint(str(tmp_path / "custom.pth"), str(tmp_path / "custom_d2.pkl"), log=lines.append)
    allocation_file = tmp_path / "custom_d2.allocation.json"
    assert f"  MODEL.SCALENET.ALLOCATION {allocation_file}" in lines
    assert load_allocation(str(allocation_file)).same_network(allocation)
    backbone = ScaleNet(str(allocation_file))
    ScaleNetCheckpointer(backbone).load(str(tmp_path / "custom_d2.pkl"))
    assert torch.equal(backbone.res2[0].conv2["3"].weight, state["layer1.0.conv2.3.weight"])

    # a kernel that the published sides do not give
    state = dict(state)
    state["layer4.0.conv2.3.weight"] = torch.zeros(1, 64, 3, 3)
    with pytest.raises(
        CheckpointMismatchError, match=r"'layer4.0.conv2.3.weight' has kernel 3, but a res5 branch 3 .* has kernel 1"
    ):
        infer_allocation(state, source="custom.pth")

    # not a ScaleNet at all
    import torchvision

    with pytest.raises(
        CheckpointMismatchError, match=r"resnet.pth: 'layer1.0.conv2.weight' is a single conv, as in ResNet"
    ):
        convert_published_state_dict(torchvision.models.resnet18().state_dict(), source="resnet.pth")
    with pytest.raises(CheckpointMismatchError, match=r"x.pth: no 'conv1.weight'"):
        convert_published_state_dict({"stem.conv1.weight": torch.zeros(1)}, source="x.pth")


def test_file_errors(tmp_path, tiny_state_dict):
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothere.pth' does not exist"):
        convert_published_checkpoint(str(tmp_path / "nothere.pth"), str(tmp_path / "out.pkl"))
    torch.save(tiny_state_dict, tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"output .*out.pth': must end in .pkl"):
        convert_published_checkpoint(str(tmp_path / "tiny.pth"), str(tmp_path / "out.pth"))
    # objects beyond tensors are unpickled only when allowed
    torch.save({"state_dict": tiny_state_dict, "args": argparse.Namespace(arch="scalenet")}, tmp_path / "args.pth")
    with pytest.raises(CheckpointMismatchError, match=r"holds Python objects besides tensors, .* \(--allow-pickle\)"):
        convert_published_checkpoint(str(tmp_path / "args.pth"), str(tmp_path / "out.pkl"))
    result = convert_published_checkpoint(
        str(tmp_path / "args.pth"), str(tmp_path / "out.pkl"), allow_pickle=True, log=lambda s: None
    )
    assert result.allocation.name == "scalenet_tiny"
