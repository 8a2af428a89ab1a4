"""Mask R-CNN: the FPN 1x twins trained 2 iterations by train_net.py and evaluated (box and mask
AP) on the synthetic set's instance masks, compared by tools/compare.py; the new_baselines
large-scale-jitter LazyConfigs (SyncBN, from scratch) built and trained 2 iterations small."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import damp_norms, train_net
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import SimpleTrainer
from omegaconf import OmegaConf
from pycocotools import mask as mask_util

from scalenet_d2.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M, N = "configs/COCO-InstanceSegmentation/", "configs/new_baselines/"
SMALL = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    "4",
    # few proposals and sampled boxes: the heads' cost, not the backbone's, dominates on a CPU
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "256",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "256",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "50",
    "DATASETS.TRAIN",
    '("synthetic_shapes_tiny_train",)',
    "DATASETS.TEST",
    '("synthetic_shapes_tiny_val",)',
    "INPUT.MASK_FORMAT",
    "bitmask",  # the synthetic masks are RLE
    "INPUT.MIN_SIZE_TRAIN",
    "(160,)",
    "INPUT.MAX_SIZE_TRAIN",
    "160",
    "INPUT.MIN_SIZE_TEST",
    "160",
    "INPUT.MAX_SIZE_TEST",
    "160",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.BASE_LR",
    "0.002",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.STEPS",
    "()",
    "SOLVER.MAX_ITER",
    "2",
]


def _box_overlap(a, b):
    return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1])


def test_synthetic_masks_are_the_visible_pixels_of_each_shape():
    spec = synthetic.SPLITS["synthetic_shapes_val"]
    whole_rectangles = overlapping = 0
    for index in range(40):
        image, anns = synthetic.draw_image(spec, index)
        union = np.zeros(image.shape[:2], dtype=np.int64)
        for i, ann in enumerate(anns):
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode("ascii"))
            mask = mask_util.decode(rle).astype(bool)
            x, y, w, h = ann["bbox"]
            assert mask.any() and mask[y : y + h, x : x + w].sum() == mask.sum(), (index, i)  # inside its box
            union += mask
            covered = any(_box_overlap(ann["bbox"], later["bbox"]) for later in anns[i + 1 :])
            overlapping += covered
            if ann["category_id"] == 1 + synthetic.CLASSES.index("rectangle") and not covered:
                assert mask.sum() == w * h, (index, i)  # nothing drawn over it: the whole box
                whole_rectangles += 1
        assert union.max() <= 1, index  # each pixel belongs to one object: the one drawn last
    assert whole_rectangles >= 5 and overlapping >= 5  # both cases were checked


@pytest.fixture(scope="module")
def mask_runs(env, tmp_path_factory):
    runs = {}
    for name in ("mask_rcnn_S50_FPN_1x", "mask_rcnn_R50_FPN_1x"):
        out = str(tmp_path_factory.mktemp(name))
        rc, log = train_net(env, "--config-file", M + name + ".yaml", *SMALL, "OUTPUT_DIR", out, timeout=600)
        assert rc == 0, log[-3000:]
        runs[name] = out
    return runs


@pytest.mark.parametrize("name", ["mask_rcnn_S50_FPN_1x", "mask_rcnn_R50_FPN_1x"])
def test_mask_rcnn_trains_and_evaluates_box_and_mask_ap(mask_runs, name):
    out = mask_runs[name]
    with open(os.path.join(out, "eval_results.json")) as f:
        results = json.load(f)["results"]
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}, task
        # untrained after 2 iterations: NaN where nothing was detected, else a percentage
        assert all(isinstance(v, float) and (np.isnan(v) or 0 <= v <= 100) for v in results[task].values())
    with open(os.path.join(out, "run_info.json")) as f:
        info = json.load(f)
    assert info["meta_architecture"] == "GeneralizedRCNN" and info["train_num_processes"] == 1
    expected = "build_scalenet_fpn_backbone" if "S50" in name else "build_resnet_fpn_backbone"
    assert info["backbone"] == expected


def test_compare_shows_mask_ap(mask_runs, env):
    proc = subprocess.run(
        [sys.executable, "tools/compare.py", mask_runs["mask_rcnn_S50_FPN_1x"], mask_runs["mask_rcnn_R50_FPN_1x"]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("  ")[0] for line in proc.stdout.splitlines()}
    assert {"box AP", "mask AP", "mask AP50", "mask APl"} <= rows
    assert "COCO box and mask metrics in % on: synthetic_shapes_tiny_val" in proc.stdout


def load_lazy(path):
    return LazyConfig.load(os.path.join(REPO, path))


def _comparable(node):
    """The config as plain data; a function (the recipe's head norms are lambdas, a new object
    at every load) as its code."""
    if isinstance(node, dict):
        return {k: _comparable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_comparable(v) for v in node]
    if isinstance(node, types.FunctionType):
        return ("function", node.__code__.co_code, node.__code__.co_consts, node.__code__.co_names)
    return node


def test_lsj_twins_differ_only_in_the_bottom_up():
    a, b = (
        _comparable(OmegaConf.to_container(load_lazy(N + name), resolve=False))
        for name in ("mask_rcnn_S50_FPN_100ep_LSJ.py", "mask_rcnn_R50_FPN_100ep_LSJ.py")
    )
    scalenet, resnet = a["model"]["backbone"].pop("bottom_up"), b["model"]["backbone"].pop("bottom_up")
    assert a == b
    # detectron2's recipe: from scratch, SyncBN in the body and the FPN, AMP, LSJ at 1024, batch 64
    assert a["train"]["init_checkpoint"] == "" and a["train"]["amp"]["enabled"] is True
    assert a["model"]["backbone"]["norm"] == "SyncBN" and a["dataloader"]["train"]["total_batch_size"] == 64
    assert [aug["_target_"].__name__ for aug in a["dataloader"]["train"]["mapper"]["augmentations"]] == [
        "ResizeScale",
        "FixedSizeCrop",
        "RandomFlip",
    ]
    assert (scalenet["norm"], scalenet["freeze_at"]) == ("SyncBN", 0)
    assert (resnet["stages"]["norm"], resnet["stem"]["norm"], resnet["freeze_at"]) == ("SyncBN", "SyncBN", 0)


@pytest.mark.parametrize("name", ["mask_rcnn_S50_FPN_100ep_LSJ", "mask_rcnn_R50_FPN_100ep_LSJ"])
def test_lsj_builds_and_trains_two_iterations_small(name, one_thread, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALENET_D2_CACHE", str(tmp_path))
    cfg = load_lazy(N + name + ".py")
    size = 128
    resize, crop, _ = cfg.dataloader.train.mapper.augmentations
    resize.update(target_height=size, target_width=size)
    crop.crop_size = (size, size)
    cfg.dataloader.train.dataset.names = "synthetic_shapes_tiny_train"
    cfg.dataloader.train.mapper.instance_mask_format = "bitmask"
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.model.roi_heads.num_classes = 4
    # few proposals and sampled boxes: the 4conv1fc box head and the mask head dominate on a CPU
    cfg.model.roi_heads.batch_size_per_image = 16
    cfg.model.proposal_generator.update(pre_nms_topk=(128, 128), post_nms_topk=(32, 32))

    torch.manual_seed(0)
    model = instantiate(cfg.model)
    body = model.backbone.bottom_up
    assert type(body).__name__ == ("ScaleNet" if "S50" in name else "ResNet")
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in body.modules())
    assert all(p.requires_grad for p in body.parameters())  # from scratch: nothing frozen
    damp_norms(model)
    model.train()
    cfg.optimizer.params.model = model
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), instantiate(cfg.optimizer))
    before = {k: v.clone() for k, v in body.state_dict().items()}
    trainer.train(0, 2)
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(np.isfinite(v) for v, _ in losses)
    assert "loss_mask" in trainer.storage.histories()
    assert any(not torch.equal(v, before[k]) for k, v in body.state_dict().items()), "the body trained"
