# detectron2's new_baselines recipe (Mask R-CNN FPN from scratch, large-scale jitter at 1024,
# SyncBN, 100 epochs, AMP) with a ScaleNet-50 bottom-up in SyncBN: its twin,
# mask_rcnn_R50_FPN_100ep_LSJ.py (detectron2's own config), with only bottom_up replaced
# (tests/test_mask_rcnn.py checks it).
from detectron2.config import LazyCall as L

from scalenet_d2 import ScaleNet

from .mask_rcnn_R50_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(ScaleNet)(
    allocation="scalenet50", norm="SyncBN", out_features=["res2", "res3", "res4", "res5"], freeze_at=0
)
