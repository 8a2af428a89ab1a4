"""The Python LazyConfigs: each is its yaml config's recipe, twins differ only in the backbone,
and each trains on the synthetic set and saves weights that the strict checkpointer loads."""

import os

import detectron2.data.transforms as T
import pytest
import torch
from conftest import damp_norms
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetMapper
from detectron2.engine import SimpleTrainer, hooks
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from omegaconf import OmegaConf

import scalenet_d2.data  # noqa: F401  registers the synthetic splits
from scalenet_d2 import ScaleNetCheckpointer, add_scalenet_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, M, Y = "configs/COCO-Detection/", "configs/COCO-InstanceSegmentation/", "configs/Synthetic/"
# LazyConfig -> the yaml config it mirrors
LAZY = {
    C + "faster_rcnn_S50_FPN_1x.py": C + "faster_rcnn_S50_FPN_1x.yaml",
    C + "faster_rcnn_S50light_FPN_1x.py": C + "faster_rcnn_S50light_FPN_1x.yaml",
    C + "faster_rcnn_S101_FPN_1x.py": C + "faster_rcnn_S101_FPN_1x.yaml",
    C + "faster_rcnn_R50_FPN_1x.py": C + "faster_rcnn_R50_FPN_1x.yaml",
    C + "faster_rcnn_R101_FPN_1x.py": C + "faster_rcnn_R101_FPN_1x.yaml",
    M + "mask_rcnn_S50_FPN_1x.py": M + "mask_rcnn_S50_FPN_1x.yaml",
    M + "mask_rcnn_R50_FPN_1x.py": M + "mask_rcnn_R50_FPN_1x.yaml",
    Y + "faster_rcnn_Stiny_FPN.py": Y + "faster_rcnn_Stiny_FPN.yaml",
    Y + "faster_rcnn_Rtiny_FPN.py": Y + "faster_rcnn_Rtiny_FPN.yaml",
}
TWINS = [
    (C + "faster_rcnn_S50_FPN_1x.py", C + "faster_rcnn_R50_FPN_1x.py"),
    (C + "faster_rcnn_S50light_FPN_1x.py", C + "faster_rcnn_R50_FPN_1x.py"),
    (C + "faster_rcnn_S101_FPN_1x.py", C + "faster_rcnn_R101_FPN_1x.py"),
    (M + "mask_rcnn_S50_FPN_1x.py", M + "mask_rcnn_R50_FPN_1x.py"),
    (Y + "faster_rcnn_Stiny_FPN.py", Y + "faster_rcnn_Rtiny_FPN.py"),
]
ids = [os.path.basename(p) for p in LAZY]


def load_lazy(path):
    return LazyConfig.load(os.path.join(REPO, path))


def load_yaml(path):
    cfg = get_cfg()
    add_scalenet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def augmentation_args(mapper):
    """Each augmentation's type and arguments (OmegaConf turns tuples into lists)."""
    found = []
    for a in mapper.augmentations.augs:
        args = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in vars(a).items()}
        if isinstance(a, T.ResizeShortestEdge) and len(set(args["short_edge_length"])) == 1:
            args.pop("is_range"), args.pop("sample_style")  # one size: "range" and "choice" agree
        found.append((type(a), args))
    return found


@pytest.mark.parametrize("scalenet,resnet", TWINS, ids=[os.path.basename(s) for s, _ in TWINS])
def test_twins_differ_only_in_the_backbone(scalenet, resnet):
    a = OmegaConf.to_container(load_lazy(scalenet), resolve=False)
    b = OmegaConf.to_container(load_lazy(resnet), resolve=False)
    for cfg in (a, b):
        del cfg["model"]["backbone"]["bottom_up"]
        del cfg["train"]["init_checkpoint"]
    assert a == b
    assert "ScaleNet" in load_lazy(scalenet).model.backbone.bottom_up._target_.__name__


@pytest.mark.parametrize("lazy_path", list(LAZY), ids=ids)
def test_each_lazyconfig_is_its_yaml_recipe(lazy_path, one_thread):
    lazy, cfg = load_lazy(lazy_path), load_yaml(LAZY[lazy_path])
    torch.manual_seed(0)
    from_yaml = build_model(cfg).eval()
    from_lazy = instantiate(lazy.model).eval()
    # the same modules, hyper-parameters and weights' layout ...
    assert repr(from_lazy) == repr(from_yaml)
    assert {k: v.shape for k, v in from_lazy.state_dict().items()} == {
        k: v.shape for k, v in from_yaml.state_dict().items()
    }
    assert [n for n, p in from_lazy.named_parameters() if p.requires_grad] == [
        n for n, p in from_yaml.named_parameters() if p.requires_grad
    ], "the same parameters are frozen (FREEZE_AT)"
    # ... and with the same weights the same detections: normalisation, anchors, thresholds
    damp_norms(from_yaml)  # not every untrained box is background
    from_lazy.load_state_dict(from_yaml.state_dict())
    for model in (from_lazy, from_yaml):  # untrained scores are all low: keep every box
        assert model.roi_heads.box_predictor.test_score_thresh == 0.05
        model.roi_heads.box_predictor.test_score_thresh = 0.0
    image = torch.randint(0, 256, (3, 128, 160), dtype=torch.uint8)
    with torch.no_grad():
        ours, theirs = (
            m([{"image": image, "height": 128, "width": 160}])[0]["instances"] for m in (from_lazy, from_yaml)
        )
    assert len(ours) == len(theirs) > 0
    torch.testing.assert_close(ours.pred_boxes.tensor, theirs.pred_boxes.tensor, rtol=0, atol=0)
    torch.testing.assert_close(ours.scores, theirs.scores, rtol=0, atol=0)
    assert (lazy.model.input_format, list(lazy.model.pixel_mean)) == (cfg.INPUT.FORMAT, list(cfg.MODEL.PIXEL_MEAN))

    # data: the same mappers and datasets
    for is_train, loader in ((True, lazy.dataloader.train), (False, lazy.dataloader.test)):
        theirs, ours = DatasetMapper(cfg, is_train), instantiate(loader.mapper)
        assert augmentation_args(ours) == augmentation_args(theirs)
        attributes = ["is_train", "image_format", "recompute_boxes"]
        if is_train:  # (a test mapper drops the annotations, whatever it would do with masks)
            attributes += ["use_instance_mask", "instance_mask_format", "use_keypoint"]
        for attribute in attributes:
            assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert (lazy.dataloader.train.dataset.names,) == tuple(cfg.DATASETS.TRAIN)
    assert (lazy.dataloader.test.dataset.names,) == tuple(cfg.DATASETS.TEST)
    assert lazy.dataloader.train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH
    assert lazy.dataloader.train.num_workers == cfg.DATALOADER.NUM_WORKERS

    # solver: the same parameter groups and the same learning rate at every milestone
    lazy.optimizer.params.model = from_lazy
    ours, theirs = instantiate(lazy.optimizer), build_optimizer(cfg, from_yaml)
    assert type(ours) is type(theirs)
    # (foreach: how the step runs, which newer detectron2's yaml path sets; the same arithmetic)
    settings = [
        [{k: v for k, v in g.items() if k not in ("params", "foreach")} for g in o.param_groups] for o in (ours, theirs)
    ]
    assert settings[0] == settings[1]
    assert [len(g["params"]) for g in ours.param_groups] == [len(g["params"]) for g in theirs.param_groups]
    assert lazy.train.max_iter == cfg.SOLVER.MAX_ITER and lazy.train.checkpointer.period == cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == cfg.TEST.EVAL_PERIOD
    assert lazy.train.get("seed", -1) == cfg.SEED
    multiplier = instantiate(lazy.lr_multiplier)
    scheduler = build_lr_scheduler(cfg, theirs)
    steps = sorted({0, 1, cfg.SOLVER.WARMUP_ITERS - 1, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER - 1})
    steps += [s for step in cfg.SOLVER.STEPS for s in (step - 1, step)]
    for step in sorted(steps):
        expected = cfg.SOLVER.BASE_LR * scheduler._multiplier(step / cfg.SOLVER.MAX_ITER)
        assert lazy.optimizer.lr * multiplier(step / lazy.train.max_iter) == pytest.approx(expected, rel=1e-12), step
    assert lazy.train.init_checkpoint == cfg.MODEL.WEIGHTS


# (the Mask R-CNN pair trains through train_net.py and their yaml twins in test_mask_rcnn.py)
@pytest.mark.parametrize("lazy_path", [p for p in LAZY if not p.startswith(M)], ids=[i for i in ids if "mask" not in i])
def test_trains_on_the_synthetic_set_and_the_strict_checkpointer_loads_it(lazy_path, tmp_path, one_thread):
    cfg = load_lazy(lazy_path)
    # the COCO configs, shrunk to the synthetic set at its native size
    cfg.model.roi_heads.num_classes = 4
    cfg.dataloader.train.dataset.names = "synthetic_shapes_train"
    cfg.dataloader.train.mapper.augmentations[0].short_edge_length = (160,)
    cfg.dataloader.train.mapper.augmentations[0].max_size = 160
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.train.max_iter = 2

    torch.manual_seed(0)
    model = instantiate(cfg.model)
    damp_norms(model)
    model.train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    trainer = SimpleTrainer(model, instantiate(cfg.dataloader.train), optimizer)
    trainer.register_hooks([hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier))])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train(0, cfg.train.max_iter)
    assert trainer.iter == cfg.train.max_iter  # detectron2 counts one past the last iteration when done
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(".bottom_up." in k for k in changed), "the backbone trained"

    # saved as lazyconfig_train_net saves it, loaded by the project's strict checkpointer
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    torch.manual_seed(1)
    fresh = instantiate(cfg.model)
    ScaleNetCheckpointer(fresh, str(tmp_path)).load(str(tmp_path / "model_final.pth"))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
