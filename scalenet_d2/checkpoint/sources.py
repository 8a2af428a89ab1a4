"""Where the ImageNet weights the configs name (`pretrained/<file>.pkl`) come from, and what they are.

Used by the missing-weights error of train_net.py; docs/model.md ("Getting ImageNet weights")
says the same at length. The ScaleNet figures are the release's (reference README); the
ResNet ones are torchvision's, as its weight enums record them.
"""

from dataclasses import dataclass
from typing import Optional

__all__ = ["ImageNetWeights", "IMAGENET_WEIGHTS", "SCALENET_RELEASE", "weights_source"]

SCALENET_RELEASE = (
    "the ScaleNet authors' release: the README of github.com/Eli-YiLi/ScaleNet links them (a BaiduYun share, "
    "extract code f1c5) and says they were trained for 120 epochs with a cosine learning rate, unlike the paper; "
    "the release does not state their input normalisation (PyTorch's ImageNet mean/std assumed)"
)
TORCHVISION_RECIPE = (
    "torchvision's simple recipe (90 epochs, step learning rate, crop and flip): the closest of torchvision's "
    "weights to the ScaleNet release's recipe; not IMAGENET1K_V2, the DEFAULT, trained for 600 epochs with heavy "
    "augmentation and regularisation"
)


@dataclass(frozen=True)
class ImageNetWeights:
    file: str  # as the configs name it, under pretrained/
    download: str  # the ImageNet checkpoint to convert
    origin: str  # who trained it, how, where to get it
    published: str  # published ImageNet figures of that checkpoint

    def convert_command(self) -> str:
        return f"python tools/convert_scalenet_to_d2.py {self.download} pretrained/{self.file}"


def _scalenet(file, name, top1, top5):
    return ImageNetWeights(
        file, f"<published {name} .pth>", SCALENET_RELEASE, f"top-1/top-5 error {top1}/{top5} (published)"
    )


def _resnet(depth, enum, url, acc1):
    return ImageNetWeights(
        f"R-{depth}-torchvision.pkl",
        url.rsplit("/", 1)[1],
        f"torchvision's ResNet{depth}_Weights.{enum} ({url}): {TORCHVISION_RECIPE}",
        f"top-1 accuracy {acc1}% (published by torchvision)",
    )


def _same_recipe(file, network, flag):
    return ImageNetWeights(
        file,
        f"<{network} model_final.pth of tools/train_classifier.py>",
        f"{network} trained on ImageNet by tools/train_classifier.py --allocation scalenet50{flag} --epochs 120 "
        "(docs/model.md, 'Twins trained by the same recipe'): the same recipe for both arms",
        "none: your own run",
    )


IMAGENET_WEIGHTS = {
    w.file: w
    for w in (
        _scalenet("ScaleNet-50-light.pkl", "ScaleNet-50-light", 22.80, 6.57),
        _scalenet("ScaleNet-50.pkl", "ScaleNet-50", 22.02, 6.05),
        _scalenet("ScaleNet-101.pkl", "ScaleNet-101", 20.82, 5.42),
        _scalenet("ScaleNet-152.pkl", "ScaleNet-152", 20.06, 5.18),
        _resnet(50, "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet50-0676ba61.pth", 76.13),
        _resnet(101, "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet101-63fe2227.pth", 77.374),
        _resnet(152, "IMAGENET1K_V1", "https://download.pytorch.org/models/resnet152-394f9c45.pth", 78.312),
        _same_recipe("ScaleNet-50-same-recipe.pkl", "ScaleNet-50", ""),
        _same_recipe("R-50-same-recipe.pkl", "the ResNet-50 twin", " --resnet-twin"),
        ImageNetWeights(
            "ScaleNet-seed50.pkl",
            "<seed model_final.pth of tools/train_classifier.py --depth 50>",
            "the over-complete ScaleNet-50 seed trained on ImageNet by tools/train_classifier.py --depth 50 "
            "(docs/neuron_allocation.md)",
            "none: your own run",
        ),
    )
}


def weights_source(file_name: str) -> Optional[ImageNetWeights]:
    """The entry of a config's `pretrained/<file_name>`, or None for a file the configs do not name."""
    return IMAGENET_WEIGHTS.get(file_name)
