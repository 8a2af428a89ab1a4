# LazyConfig of faster_rcnn_Rtiny_FPN.yaml: detectron2's ResNet blocks in scalenet_tiny's layout.
from detectron2.config import LazyCall as L

from scalenet_d2 import resnet_twin

from ..common.synthetic_fpn import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(resnet_twin)(
    allocation="scalenet_tiny", norm="BN", out_features=["res2", "res3", "res4", "res5"], freeze_at=0
)
