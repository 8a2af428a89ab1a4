# The recipe of Synthetic/Base-Synthetic-FPN.yaml (the built-in demo: see that file for why)
# as a LazyConfig, on the Faster R-CNN FPN one. model.backbone.bottom_up is left to each config.
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

import scalenet_d2.data  # noqa: F401  registers the synthetic splits

from .faster_rcnn_fpn import dataloader, model, optimizer, train

train.init_checkpoint = ""  # from scratch
train.max_iter = 800
train.checkpointer.period = 400
train.seed = 1

fpn_channels = 32
model.backbone.out_channels = fpn_channels
model.backbone.norm = "BN"
rpn = model.proposal_generator
rpn.head.in_channels = fpn_channels
rpn.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
rpn.batch_size_per_image = 64
rpn.pre_nms_topk = (256, 256)
rpn.post_nms_topk = (64, 100)
roi_heads = model.roi_heads
roi_heads.num_classes = 4
roi_heads.batch_size_per_image = 32
roi_heads.box_head.input_shape = ShapeSpec(channels=fpn_channels, height=7, width=7)
roi_heads.box_head.update(conv_dims=[32, 32], conv_norm="BN", fc_dims=[256])
roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)

dataloader.train.dataset.names = "synthetic_shapes_train"
dataloader.test.dataset.names = "synthetic_shapes_val"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(160,), max_size=160, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=160, max_size=160)]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1

optimizer.lr = 0.1
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[600, 750, 800]),
    warmup_length=100 / 800,
    warmup_method="linear",
    warmup_factor=0.001,
)
