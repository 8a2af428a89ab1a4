"""Detectors on ScaleNet: each backbone variant builds, trains a CPU step with finite losses,
and infers on small, odd-sized and very wide images."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from scalenet_d2 import ScaleNet


def training_batch(height=96, width=128):
    g = torch.Generator().manual_seed(0)
    batch = []
    for boxes, classes in [
        ([[8.0, 10.0, 60.0, 70.0], [50.0, 20.0, 120.0, 90.0]], [0, 2]),
        ([[30.0, 5.0, 90.0, 60.0]], [1]),
    ]:
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8).float()
        batch.append({"image": image, "height": height, "width": width, "instances": instances})
    return batch


def train_one_step(model, batch):
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with EventStorage():
        losses = model(batch)
    for name, value in losses.items():
        assert torch.isfinite(value), f"{name} = {value}"
    sum(losses.values()).backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    return losses, changed


VARIANTS = {
    "plain": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"},
    "fpn": {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"},
    "retinanet": {"loss_cls", "loss_box_reg"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_detector_trains_a_step_and_infers_on_any_image_size(variant, detector_cfg):
    torch.manual_seed(0)
    cfg = detector_cfg(variant)
    model = build_model(cfg)
    scalenet = model.backbone if variant == "plain" else model.backbone.bottom_up
    assert isinstance(scalenet, ScaleNet) and scalenet.allocation.name == "scalenet_tiny"

    losses, changed = train_one_step(model, training_batch())
    assert set(losses) == VARIANTS[variant]
    # FREEZE_AT defaults to 2: the stem and res2 stay, later ScaleNet stages train
    assert not any(
        n.startswith(("backbone.stem", "backbone.res2", "backbone.bottom_up.stem", "backbone.bottom_up.res2"))
        for n in changed
    )
    assert any(".res4.0.conv2." in n for n in changed)

    model.eval()
    for height, width in [(33, 47), (64, 1000), (1000, 40), (17, 17)]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8).float()
        with torch.no_grad():
            (output,) = model([{"image": image, "height": height, "width": width}])
        instances = output["instances"]
        assert instances.image_size == (height, width)
        assert len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
        assert torch.isfinite(instances.pred_boxes.tensor).all() and torch.isfinite(instances.scores).all()


def test_full_allocation_detector_trains_a_step(detector_cfg):
    torch.manual_seed(0)
    cfg = detector_cfg("fpn", allocation="scalenet50")
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.SCALENET.NORM = "BN"
    model = build_model(cfg)
    assert model.backbone.bottom_up.allocation.depth == 50
    losses, changed = train_one_step(model, training_batch(64, 96))
    assert any(n.startswith("backbone.bottom_up.stem.") for n in changed)
    assert any(n.startswith("backbone.bottom_up.res5.2.conv2.") for n in changed)

    model.eval()  # a small odd image: res5 is 1x2 after padding to 32, smaller than every scale > 1
    with torch.no_grad():
        (output,) = model([{"image": torch.rand(3, 33, 47) * 255, "height": 33, "width": 47}])
    assert output["instances"].image_size == (33, 47)
    assert torch.isfinite(output["instances"].pred_boxes.tensor).all()
