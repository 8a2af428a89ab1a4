# LazyConfig of faster_rcnn_R101_FPN_1x.yaml: detectron2's ResNet-101, the twin of S101.
from ..common.faster_rcnn_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
# torchvision's ImageNet ResNet converted with detectron2's tools/convert-torchvision-to-d2.py
train.init_checkpoint = "pretrained/R-101-torchvision.pkl"
