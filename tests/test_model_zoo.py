"""scalenet_d2.model_zoo: the configs from the package, also from an installed wheel outside the repository."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

import scalenet_d2
from scalenet_d2 import model_zoo
from scalenet_d2.modeling import ScaleNet


def test_yaml_config_has_its_base_and_the_scalenet_keys(repo_root):
    path = model_zoo.get_config_file("COCO-Detection/faster_rcnn_S50_FPN_1x.yaml")
    assert os.path.samefile(path, repo_root / "configs/COCO-Detection/faster_rcnn_S50_FPN_1x.yaml")
    cfg = model_zoo.get_config("COCO-Detection/faster_rcnn_S50_FPN_1x.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "build_scalenet_fpn_backbone"
    assert cfg.MODEL.SCALENET.ALLOCATION == "scalenet50"
    assert cfg.MODEL.SCALENET.FAST_PATH == "auto"  # added by add_scalenet_config
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"  # from the _BASE_ chain
    assert cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]


def test_lazy_config():
    cfg = model_zoo.get_config("COCO-Detection/faster_rcnn_S50_FPN_1x.py")
    assert cfg.model.backbone.bottom_up._target_ is ScaleNet
    assert cfg.model.backbone.bottom_up.allocation == "scalenet50"
    assert cfg.train.init_checkpoint == "pretrained/ScaleNet-50.pkl"


@pytest.mark.parametrize("path", ["COCO-Detection/no_such_config.yaml", "../setup.py", "common", "COCO-Detection"])
def test_unknown_config_is_refused(path):
    with pytest.raises(RuntimeError, match=f"{path!r} is not a config of scalenet_d2's model zoo"):
        model_zoo.get_config_file(path)


def test_version_is_the_distributions():
    assert scalenet_d2.__version__ == importlib.metadata.version("scalenet_d2")


INSTALLED_CHECK = """
import json, sys
import scalenet_d2
from scalenet_d2 import model_zoo
from detectron2.modeling import build_model
cfg = model_zoo.get_config("Synthetic/faster_rcnn_Stiny_FPN.yaml")
cfg.MODEL.DEVICE = "cpu"
model = build_model(cfg)
lazy = model_zoo.get_config("COCO-Detection/faster_rcnn_S50light_FPN_1x.py")
print(json.dumps({
    "module": scalenet_d2.__file__,
    "config": model_zoo.get_config_file("Synthetic/faster_rcnn_Stiny_FPN.yaml"),
    "version": scalenet_d2.__version__,
    "allocation": cfg.MODEL.SCALENET.ALLOCATION,
    "body": type(model.backbone.bottom_up).__name__,
    "lazy_allocation": lazy.model.backbone.bottom_up.allocation,
}))
"""


def test_configs_from_an_installed_wheel_outside_the_repository(repo_root, tmp_path):
    # build from a copy, so that the checkout gets no build/ or egg-info
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(repo_root / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("scalenet_d2", "configs"):
        shutil.copytree(repo_root / name, source / name, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("scalenet_d2-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-c", INSTALLED_CHECK], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["module"].startswith(str(target))
    assert found["config"].startswith(str(target)) and os.path.isfile(found["config"])
    assert not os.path.islink(os.path.join(target, "scalenet_d2", "model_zoo", "configs"))  # a copy, not the link
    assert found["version"] == scalenet_d2.__version__ == wheel.name.split("-")[1]
    assert found["allocation"] == "scalenet_tiny" and found["body"] == "ScaleNet"
    assert found["lazy_allocation"] == "scalenet50_light"
