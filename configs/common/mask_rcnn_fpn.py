# The Mask R-CNN FPN recipe of COCO-InstanceSegmentation/Base-MaskRCNN-FPN.yaml as a LazyConfig,
# on detectron2's own common configs (model, COCO data, SGD, 1x schedule, training loop); the
# Faster R-CNN one (faster_rcnn_fpn.py) is this without the mask branch.
# model.backbone.bottom_up is detectron2's ResNet-50 (torchvision weights: stride in the 3x3);
# each config replaces it with its backbone and changes nothing else, so twins differ only
# there (tests/test_lazyconfigs.py checks it, and that each matches its yaml config).
from detectron2 import model_zoo

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train

# the input both families' ImageNet weights expect (docs/model.md, "Converting ImageNet checkpoints"); the
# test mapper reads the train mapper's format
model.input_format = "RGB"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
dataloader.train.mapper.image_format = "RGB"

model.backbone.bottom_up.stages.stride_in_1x1 = False
model.backbone.bottom_up.freeze_at = 2  # stem + res2, detectron2's default for ImageNet weights

train.eval_period = 0  # as TEST.EVAL_PERIOD: evaluate at the end
