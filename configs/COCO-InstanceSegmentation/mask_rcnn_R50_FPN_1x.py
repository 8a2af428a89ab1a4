# LazyConfig of mask_rcnn_R50_FPN_1x.yaml: detectron2's ResNet-50, the twin of mask_rcnn_S50_FPN_1x.py.
from ..common.mask_rcnn_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 50
# torchvision's ImageNet ResNet converted with detectron2's tools/convert-torchvision-to-d2.py
train.init_checkpoint = "pretrained/R-50-torchvision.pkl"
