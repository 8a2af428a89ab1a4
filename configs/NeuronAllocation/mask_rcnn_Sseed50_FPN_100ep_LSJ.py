# The over-complete ScaleNet-50 seed (seed:50) as the bottom-up of detectron2's new_baselines
# recipe, trained from scratch (large-scale jitter, SyncBN, 100 epochs): detection-aware neuron
# allocation without ImageNet. The L1 penalty on the SA branch norms' scales comes with the
# optimizer (SGDWithGammaL1; seed_optimizer_params puts those scales in groups with "gamma_l1"),
# so detectron2's tools/lazyconfig_train_net.py trains it as it is. See docs/neuron_allocation.md.
from scalenet_d2.neuron_allocation.detection import SGDWithGammaL1, seed_optimizer_params

from ..new_baselines.mask_rcnn_S50_FPN_100ep_LSJ import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.allocation = "seed:50"
optimizer._target_ = SGDWithGammaL1
optimizer.params._target_ = seed_optimizer_params
optimizer.params.gamma_l1 = 1e-4
