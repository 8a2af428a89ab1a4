# detectron2's new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py unchanged: the ResNet-50 twin of
# mask_rcnn_S50_FPN_100ep_LSJ.py (Mask R-CNN FPN from scratch, large-scale jitter, SyncBN).
from detectron2 import model_zoo

_recipe = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader, lr_multiplier, model, optimizer, train = (
    _recipe.dataloader,
    _recipe.lr_multiplier,
    _recipe.model,
    _recipe.optimizer,
    _recipe.train,
)
