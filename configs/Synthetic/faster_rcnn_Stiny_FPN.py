# LazyConfig of faster_rcnn_Stiny_FPN.yaml, the built-in demo's tiny ScaleNet trained from
# scratch; its twin is faster_rcnn_Rtiny_FPN.py.
from detectron2.config import LazyCall as L

from scalenet_d2 import ScaleNet

from ..common.synthetic_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(ScaleNet)(
    allocation="scalenet_tiny", norm="BN", out_features=["res2", "res3", "res4", "res5"], freeze_at=0
)
