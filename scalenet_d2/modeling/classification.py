"""ScaleNet image classifier (ImageNet head) built from an allocation.

Used to train seed networks and final networks for data-driven neuron allocation,
and to load the published ImageNet checkpoints. The state_dict has the published key
layout (torchvision-like: conv1, bn1, layer1..layer4, fc), so published checkpoints
load strictly. The bottleneck is the detection backbone's `SABottleneck`: one
implementation of the SA block serves both.

`ResNetTwinClassifier` is the ResNet twin of an allocation (the body `resnet_twin` builds
for detection) with the same head and initialisation, in torchvision's ResNet layout, so
that both arms of a comparison can be trained on ImageNet by one recipe.
"""

from typing import Union

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from .allocation import Allocation, load_allocation
from .layers import make_norm
from .scalenet import make_scalenet_stages

__all__ = ["ScaleNetClassifier", "ResNetTwinClassifier", "init_imagenet_weights"]


def init_imagenet_weights(model: nn.Module) -> None:
    """The PyTorch ImageNet recipe: He init for convs, unit-gamma BN, default fc init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ImageNetClassifier(nn.Module):
    """stem (conv1, bn1, relu, maxpool), layer1..layer4, global average pool, fc."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


class ScaleNetClassifier(_ImageNetClassifier):
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
        init_imagenet_weights(self)


class ResNetTwinClassifier(_ImageNetClassifier):
    """The ResNet twin of an allocation, for classification: ScaleNetClassifier with ResNet's
    3x3 conv where ScaleNet has its SA layer.

    Same stem width, bottleneck widths and blocks per stage as the allocation (so, like
    `resnet_twin`, it is ResNet-50/101/152 for the published allocations), torchvision's
    `Bottleneck` (stride on the 3x3 conv: detectron2's STRIDE_IN_1X1 False), torchvision's
    key layout (conv1, bn1, layer1..layer4 with conv1..3, bn1..3, downsample, fc): for the
    published allocations its state_dict is that of torchvision's resnet50/101/152.
    """

    def __init__(self, allocation: Union[Allocation, str], num_classes: int = 1000, norm: str = "BN"):
        super().__init__()
        allocation = load_allocation(allocation)
        self.allocation = allocation
        self.num_classes = num_classes

        def norm_layer(channels):
            return make_norm(norm, channels)

        stem = allocation.stem_channels
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = stem
        for index, stage in enumerate(allocation.stages, start=1):
            stride, out_channels = (1 if index == 1 else 2), stage.planes * Bottleneck.expansion
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False), norm_layer(out_channels)
            )
            blocks = [Bottleneck(in_channels, stage.planes, stride, downsample, norm_layer=norm_layer)]
            blocks += [Bottleneck(out_channels, stage.planes, norm_layer=norm_layer) for _ in stage.blocks[1:]]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = out_channels

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_imagenet_weights(self)
