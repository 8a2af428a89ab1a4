# LazyConfig of mask_rcnn_S50_FPN_1x.yaml; its twin is mask_rcnn_R50_FPN_1x.py.
from detectron2.config import LazyCall as L

from scalenet_d2 import ScaleNet

from ..common.mask_rcnn_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(ScaleNet)(
    allocation="scalenet50", norm="FrozenBN", out_features=["res2", "res3", "res4", "res5"], freeze_at=2
)
# ImageNet ScaleNet converted with tools/convert_scalenet_to_d2.py
train.init_checkpoint = "pretrained/ScaleNet-50.pkl"
