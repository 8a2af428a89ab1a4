"""A plain ScaleNet written from the spec alone (../shared/reference/README.md), for tests.

Deliberately independent of scalenet_d2 (nothing is imported from it): it reads the
published row format itself, uses nn.BatchNorm2d (compared in eval mode), and has the
published checkpoint layout: conv1, bn1, layer1..layer4 of blocks with conv1, bn1,
conv2.{i}, bn2.{i} (only branches with c_i > 0), conv3, bn3, downsample.{0,1}; fc.
Like the published network, it fails where a feature map is smaller than a pooling factor.
"""

import json

import torch
import torch.nn.functional as F
from torch import nn

SCALE_FACTORS = [1, 2, 4, 7]
BLOCKS_FOR_ROWS = {16: [3, 4, 6, 3], 33: [3, 4, 23, 3], 50: [3, 8, 36, 3]}
RESNET_PLANES = [64, 128, 256, 512]


class ReferenceBlock(nn.Module):
    def __init__(self, inplanes, planes, widths, side, pool_input, shortcut_conv):
        super().__init__()
        self.pool_input = pool_input
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.ModuleDict()
        self.bn2 = nn.ModuleDict()
        for i in range(4):
            if widths[i] == 0:
                continue
            if side / (2**i) > 1:
                self.conv2[str(i)] = nn.Conv2d(planes, widths[i], kernel_size=3, padding=1, bias=False)
            else:
                self.conv2[str(i)] = nn.Conv2d(planes, widths[i], kernel_size=1, padding=0, bias=False)
            self.bn2[str(i)] = nn.BatchNorm2d(widths[i])
        self.conv3 = nn.Conv2d(sum(widths), planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if shortcut_conv:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, kernel_size=1, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        if self.pool_input:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        residual = x if self.downsample is None else self.downsample(x)

        y = F.relu(self.bn1(self.conv1(x)))
        H, W = y.shape[2], y.shape[3]
        pieces = []
        for i in range(4):
            if str(i) not in self.conv2:
                continue
            s = SCALE_FACTORS[i]
            if s == 1:
                z = self.conv2[str(i)](y)
            else:
                z = self.conv2[str(i)](F.max_pool2d(y, kernel_size=s, stride=s))
                h, w = z.shape[2], z.shape[3]
                if (H // h) * h == H and (W // w) * w == W:
                    z = F.interpolate(z, size=(H, W), mode="nearest")
                else:
                    z = F.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
            pieces.append(self.bn2[str(i)](z))
        y = F.relu(torch.cat(pieces, dim=1))

        y = self.bn3(self.conv3(y))
        return F.relu(y + residual)


class ReferenceScaleNet(nn.Module):
    """rows: [c1, c2, c4, c7, side] per block. blocks/planes/stem default to the published
    ones for 16/33/50 rows."""

    def __init__(self, rows, blocks=None, planes=None, stem=64, num_classes=1000):
        super().__init__()
        blocks = blocks or BLOCKS_FOR_ROWS[len(rows)]
        planes = planes or RESNET_PLANES
        assert sum(blocks) == len(rows)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        inplanes, r = stem, 0
        for k in range(4):
            layer = []
            for b in range(blocks[k]):
                row = rows[r]
                r += 1
                layer.append(
                    ReferenceBlock(
                        inplanes, planes[k], row[:4], row[4], pool_input=(k > 0 and b == 0), shortcut_conv=(b == 0)
                    )
                )
                inplanes = planes[k] * 4
            setattr(self, f"layer{k + 1}", nn.Sequential(*layer))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        out = {}
        for k in range(4):
            x = getattr(self, f"layer{k + 1}")(x)
            out[f"res{k + 2}"] = x
        out["logits"] = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return out


def rows_from_published_file(path):
    with open(path) as f:
        return json.load(f)


def rows_from_project_file(path):
    """The rows, blocks per stage, planes and stem of a project-format allocation file."""
    with open(path) as f:
        data = json.load(f)
    rows = [list(w) + [stage["side"]] for stage in data["stages"] for w in stage["blocks"]]
    blocks = [len(stage["blocks"]) for stage in data["stages"]]
    planes = [stage["planes"] for stage in data["stages"]]
    return rows, blocks, planes, data["stem_channels"]


def randomize(model, seed=0):
    """Random conv/fc weights and non-trivial BN affine parameters and running statistics.

    The last BN of each residual branch is scaled down so activations stay O(1) through
    50 blocks (the comparison is then meaningful in float32)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                gain = 0.3 if name.endswith("bn3") else 1.0
                m.weight.copy_(gain * (0.5 + torch.rand(n, generator=g)))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(1000)
    return model
