"""ScaleNet image classifier (ImageNet head) built from an allocation.

Used to train seed networks and final networks for data-driven neuron allocation,
and to load the published ImageNet checkpoints. The state_dict has the published key
layout (torchvision-like: conv1, bn1, layer1..layer4, fc), so published checkpoints
load strictly. The bottleneck is the detection backbone's `SABottleneck`: one
implementation of the SA block serves both.
"""

from typing import Union

import torch
from torch import nn

from .allocation import Allocation, load_allocation
from .layers import make_norm
from .scalenet import make_scalenet_stages

__all__ = ["ScaleNetClassifier"]


class ScaleNetClassifier(nn.Module):
    """ScaleNet for classification.

    Args:
        allocation: an `Allocation`, a bundled allocation name or an allocation file path.
        num_classes: outputs of the final fc layer.
        norm: detectron2 norm name for every BN ("BN", or "SyncBN" for multi-GPU training).
    """

    def __init__(self, allocation: Union[Allocation, str], num_classes: int = 1000, norm: str = "BN"):
        super().__init__()
        allocation = load_allocation(allocation)
        self.allocation = allocation
        self.num_classes = num_classes

        stem = allocation.stem_channels
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # the detection backbone's stages, under the published names layer1..layer4
        for index, blocks in enumerate(make_scalenet_stages(allocation, norm), start=1):
            self.add_module(f"layer{index}", nn.Sequential(*blocks))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(allocation.stages[-1].out_channels, num_classes)
        self._init_weights()

    def _init_weights(self):
        # The PyTorch ImageNet recipe: He init for convs, unit-gamma BN, default fc init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))
