# detectron2's new_baselines recipe (Mask R-CNN FPN from scratch, large-scale jitter at 1024,
# SyncBN, 100 epochs, AMP) with a ScaleNet-50 bottom-up in SyncBN; its twin,
# mask_rcnn_R50_FPN_100ep_LSJ.py, is detectron2's own config. Only bottom_up differs
# (tests/test_lazyconfigs.py checks it).
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from scalenet_d2 import ScaleNet

_recipe = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, lr_multiplier, model, optimizer, train = (
    _recipe.dataloader,
    _recipe.lr_multiplier,
    _recipe.model,
    _recipe.optimizer,
    _recipe.train,
)

model.backbone.bottom_up = L(ScaleNet)(
    allocation="scalenet50", norm="SyncBN", out_features=["res2", "res3", "res4", "res5"], freeze_at=0
)
