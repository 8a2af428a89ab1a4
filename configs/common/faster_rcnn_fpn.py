# The Faster R-CNN FPN recipe of COCO-Detection/Base-FasterRCNN-FPN.yaml as a LazyConfig: the
# Mask R-CNN one (mask_rcnn_fpn.py: detectron2's common configs, the ImageNet input, FREEZE_AT)
# without the mask branch. model.backbone.bottom_up is detectron2's ResNet-50; each config
# replaces it with its backbone and changes nothing else, so twins differ only there
# (tests/test_lazyconfigs.py checks it, and that each matches its yaml config).
from .mask_rcnn_fpn import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
dataloader.train.mapper.use_instance_mask = False
