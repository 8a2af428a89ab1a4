"""Classifier checkpoints: what tools/train_classifier.py writes, and what tools/allocate.py
(seeds), --init-weights and --resume read.

A torch.save'd dict (weights_only-loadable):
    "model"          state_dict in the published layout (conv1, bn1, layer1..layer4, fc)
    ALLOCATION_KEY   the network's allocation (project format, as a dict); for a ResNet twin,
                     the allocation whose twin it is
    NETWORK_KEY      "scalenet", or "resnet_twin" (torchvision's ResNet layout); absent: "scalenet"
    SEED_KEY         seeds only: {"allocation", "multiplier", "base"}; marks a seed network
    "classes", "metrics", "args", "epoch", "iteration"
    checkpoint.pth only, to resume: "optimizer", "lr_scheduler", "scaler"
Plain published-layout state_dicts are read too (as seeds: allocation inferred from shapes),
and, as seeds, detectron2 checkpoints of seed detectors (train_net.py's model_*.pth with a
MODEL.SCALENET.ALLOCATION "seed:..." body): `load_seed_checkpoint`.
"""

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import yaml

from ..atomic import atomic_torch_save
from ..modeling.allocation import SCALES, STAGE_NAMES, Allocation, AllocationError, load_allocation
from .published import (
    CheckpointMismatchError,
    _describe_differences,
    _first_differences,
    body_shapes,
    check_published_state_dict,
    file_sha256,
    infer_allocation,
    published_state_dict,
    to_published_key,
)

__all__ = [
    "SEED_KEY",
    "ALLOCATION_KEY",
    "NETWORK_KEY",
    "NETWORKS",
    "CHECKPOINT",
    "FINAL",
    "ClassifierCheckpointError",
    "classifier_state",
    "save_classifier_checkpoint",
    "load_init_weights",
    "load_training_state",
    "SeedCheckpoint",
    "load_seed_checkpoint",
    "extract_state_dict",
    "file_sha256",
]

SEED_KEY = "scalenet_d2_seed"  # marks a seed network
ALLOCATION_KEY = "scalenet_d2_allocation"  # the trained network's allocation
NETWORK_KEY = "scalenet_d2_network"
NETWORKS = ("scalenet", "resnet_twin")
CHECKPOINT = "checkpoint.pth"  # latest state, with optimizer; rewritten atomically after every epoch
FINAL = "model_final.pth"  # weights only, written when all epochs are done


class ClassifierCheckpointError(ValueError):
    """An unreadable or unfitting classifier checkpoint; the message names the file and what was expected."""


def classifier_state(
    model,
    allocation: Allocation,
    seed_meta: Optional[dict],
    classes,
    args: dict,
    metrics: dict,
    network: str = "scalenet",
    **extra,
):
    """The checkpoint dict of a classifier; `extra`: epoch, iteration and training state."""
    state = {
        "model": model.state_dict(),  # published ImageNet layout (torchvision's for a ResNet twin)
        ALLOCATION_KEY: allocation.to_dict(),
        NETWORK_KEY: network,
        "classes": list(classes),
        "metrics": dict(metrics),
        "args": dict(args),
        **extra,
    }
    if seed_meta:
        state[SEED_KEY] = seed_meta
    return state


def save_classifier_checkpoint(state: dict, path: str) -> None:
    atomic_torch_save(state, path)


def _torch_load(path: str, source: str):
    if not os.path.isfile(path):
        raise ClassifierCheckpointError(f"{source}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects
        raise ClassifierCheckpointError(
            f"{source}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None


def load_init_weights(model, path):
    """Initialise `model` (a ScaleNetClassifier or ResNetTwinClassifier) from a classifier
    checkpoint of the same network and classes (a ResNet twin's: also torchvision's weights)."""
    source = f"--init-weights {path}"
    sd = extract_state_dict(_torch_load(path, source), source)
    differences = _first_differences(body_shapes(model.state_dict()), body_shapes(sd))  # every key but fc.*
    if any(differences):
        raise ClassifierCheckpointError(
            f"{source} does not fit the {type(model).__name__} of allocation {model.allocation.describe()}: "
            + _describe_differences(*differences, "checkpoint", "model")
        )
    expected_fc = {k: tuple(v.shape) for k, v in model.fc.state_dict(prefix="fc.").items()}
    found_fc = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("fc.")}
    if found_fc != expected_fc:
        raise ClassifierCheckpointError(
            f"{source}: classifier {found_fc}; the model expects {expected_fc} (number of classes differs)"
        )
    model.load_state_dict(sd)


def load_training_state(path, allocation, network: str = "scalenet"):
    """The training state of a checkpoint.pth, checked to be of `allocation`'s `network`."""
    state = _torch_load(path, f"--resume {path}")
    if not isinstance(state, dict) or ALLOCATION_KEY not in state:
        raise ClassifierCheckpointError(
            f"--resume {path}: no field '{ALLOCATION_KEY}'; expected a checkpoint written by tools/train_classifier.py"
        )
    try:
        saved = Allocation.from_dict(state[ALLOCATION_KEY], source=f"{path}:{ALLOCATION_KEY}")
    except AllocationError as e:
        raise ClassifierCheckpointError(str(e)) from None
    if not saved.same_network(allocation):
        raise ClassifierCheckpointError(
            f"--resume {path}: field '{ALLOCATION_KEY}' is allocation {saved.name!r}, not the requested {allocation.name!r}; "
            "expected the same --depth/--base/--multiplier/--allocation as the run that wrote it"
        )
    saved_network = state.get(NETWORK_KEY, "scalenet")
    if saved_network != network:
        raise ClassifierCheckpointError(
            f"--resume {path}: field '{NETWORK_KEY}' is {saved_network!r}, not the requested {network!r}; expected "
            "the same --resnet-twin setting as the run that wrote it"
        )
    return state


_SA_KEY = re.compile(r"^layer(\d+)\.(\d+)\.conv2\.(\d+)\.weight$")


@dataclass
class DetectorSeed:
    """Where the seed sits in a detectron2 checkpoint of a seed detector."""

    prefix: str  # of its ScaleNet body, e.g. "backbone.bottom_up."
    model: Dict[str, torch.Tensor]  # the detector's whole state_dict
    config: Optional[str]  # the run's config.yaml beside the checkpoint, if there
    datasets: Optional[List[str]]  # its DATASETS.TRAIN
    allocation: Optional[str]  # its MODEL.SCALENET.ALLOCATION


@dataclass
class SeedCheckpoint:
    path: str
    sha256: str
    allocation: Allocation  # the seed's allocation
    state_dict: Dict[str, torch.Tensor]  # published classifier layout
    meta: dict  # the checkpoint's SEED_KEY entry ({} if the allocation was inferred)
    num_classes: int
    epoch: Optional[int] = None
    iteration: Optional[int] = None
    detector: Optional[DetectorSeed] = None  # set for a seed detector (num_classes: 1000, the FLOPs convention)


def extract_state_dict(obj, source: str) -> Dict[str, torch.Tensor]:
    """The classifier state_dict of a checkpoint ({"model": sd}, {"state_dict": sd} or a plain sd)."""
    try:
        return published_state_dict(obj, source)
    except CheckpointMismatchError as e:
        raise ClassifierCheckpointError(str(e)) from None


def _sa_widths_from_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> List[List[List[int]]]:
    """widths[stage][block] = [c1, c2, c4, c7] read from the conv2.{i} weight shapes."""
    found: Dict[Tuple[int, int], Dict[int, int]] = {}
    for key, value in sd.items():
        m = _SA_KEY.match(key)
        if m:
            s, b, i = (int(g) for g in m.groups())
            found.setdefault((s, b), {})[i] = int(value.shape[0])
    if not found:
        raise ClassifierCheckpointError(
            f"{source}: not a ScaleNet classifier checkpoint: no SA layer keys like 'layer1.0.conv2.0.weight' "
            "(the published ScaleNet layout)"
        )
    stages = sorted({s for s, _ in found})
    if stages != [1, 2, 3, 4]:
        raise ClassifierCheckpointError(f"{source}: SA layers found in layer{stages}; expected layer1..layer4")
    widths = []
    for s in stages:
        blocks = sorted(b for ss, b in found if ss == s)
        if blocks != list(range(len(blocks))):
            raise ClassifierCheckpointError(f"{source}: layer{s} blocks {blocks}: expected consecutive indices from 0")
        widths.append([[found[(s, b)].get(i, 0) for i in range(len(SCALES))] for b in blocks])
    return widths


def _check_is_seed(widths: List[List[List[int]]], source: str) -> None:
    for s, stage in enumerate(widths):
        for b, w in enumerate(stage):
            if len(set(w)) != 1 or w[0] <= 0:
                raise ClassifierCheckpointError(
                    f"{source}: not a seed network: block layer{s + 1}.{b} ({STAGE_NAMES[s]} block {b}) has SA widths "
                    f"{w} (conv2.0..3 output channels); a seed has the same nonzero width at every scale, e.g. "
                    f"[{max(w)}, {max(w)}, {max(w)}, {max(w)}]. Train one with tools/train_classifier.py, or as a detector "
                    '(MODEL.SCALENET.ALLOCATION "seed:...").'
                )


def _detector_seed(obj, path: str) -> Optional[DetectorSeed]:
    """The seed detector in a detectron2 checkpoint ({"model": detector state_dict, "iteration"}),
    or None when `obj` is not a detector's checkpoint."""
    source = f"seed checkpoint {path}"
    model = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(model, Mapping):
        return None
    stems = [k[: -len("res2.0.conv1.weight")] for k in model if k.endswith("res2.0.conv1.weight")]
    if not stems or "layer1.0.conv1.weight" in model:
        return None
    prefix = stems[0]
    if f"{prefix}res2.0.conv2.weight" in model:
        raise ClassifierCheckpointError(
            f"{source}: a ResNet detector ('{prefix}res2.0.conv2.weight' is a single conv); expected a ScaleNet seed "
            'detector (MODEL.SCALENET.ALLOCATION "seed:...")'
        )
    stats = f"{prefix}res2.0.bn2.0.running_mean"
    if stats in model and f"{prefix}res2.0.bn2.0.num_batches_tracked" not in model:
        raise ClassifierCheckpointError(
            f"{source}: a seed detector trained with FrozenBN ('{stats}' without num_batches_tracked): its SA norm "
            "scales never moved, so they rank nothing; expected one trained with MODEL.SCALENET.NORM BN, SyncBN or GN "
            "and MODEL.SCALENET.GAMMA_L1 (docs/neuron_allocation.md)"
        )
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    datasets = allocation = None
    if os.path.isfile(config):
        with open(config) as f:
            cfg = yaml.safe_load(f) or {}
        datasets = list((cfg.get("DATASETS") or {}).get("TRAIN") or [])
        allocation = ((cfg.get("MODEL") or {}).get("SCALENET") or {}).get("ALLOCATION")
    else:
        config = None
    return DetectorSeed(prefix=prefix, model=dict(model), config=config, datasets=datasets, allocation=allocation)


def load_seed_checkpoint(path: str) -> SeedCheckpoint:
    """Reads a trained seed network and checks that every SA layer has equal widths per scale.

    Accepts checkpoints of tools/train_classifier.py (allocation under `SEED_KEY`), plain
    published-layout classifier state_dicts (allocation inferred from the weight shapes, ResNet
    feature sides 56/28/14/7), and detectron2 checkpoints of seed detectors (the body in the
    published layout; allocation from the run's config.yaml beside it, else inferred).
    """
    obj = _torch_load(path, f"seed checkpoint {path}")
    detector = _detector_seed(obj, path)
    if detector is not None:
        n = len(detector.prefix)
        sd = {to_published_key(k[n:]): v for k, v in detector.model.items() if k.startswith(detector.prefix)}
    else:
        sd = extract_state_dict(obj, f"seed checkpoint {path}")
    widths = _sa_widths_from_state_dict(sd, f"seed checkpoint {path}")
    _check_is_seed(widths, f"seed checkpoint {path}")
    if detector is None and "fc.weight" not in sd:
        raise ClassifierCheckpointError(
            f"seed checkpoint {path}: no 'fc.weight'; expected a classifier (stem, layer1..4, fc)"
        )

    meta = dict(obj.get(SEED_KEY) or {}) if isinstance(obj, Mapping) else {}
    if detector is not None and detector.allocation:
        try:
            allocation = load_allocation(detector.allocation)
        except AllocationError as e:
            raise ClassifierCheckpointError(f"seed checkpoint {path}: {detector.config}: {e}") from None
    elif meta:
        if "allocation" not in meta:
            raise ClassifierCheckpointError(f"seed checkpoint {path}: field '{SEED_KEY}' has no 'allocation' entry")
        try:
            allocation = Allocation.from_dict(
                meta["allocation"], source=f"seed checkpoint {path}: field '{SEED_KEY}.allocation'"
            )
        except AllocationError as e:
            raise ClassifierCheckpointError(str(e)) from None
    else:
        try:
            allocation = infer_allocation(sd, source=path)
        except CheckpointMismatchError as e:
            raise ClassifierCheckpointError(f"seed checkpoint {e}") from None
    # The recorded allocation must describe these weights, key by key and shape by shape
    # (GN has no running statistics: only the keys a checkpoint of that norm holds).
    try:
        if detector is None or any(k.endswith("running_mean") for k in sd):
            check_published_state_dict(sd, allocation, source=f"seed checkpoint {path}")
        else:
            _check_weights_only(sd, allocation, f"seed checkpoint {path}")
    except CheckpointMismatchError as e:
        raise ClassifierCheckpointError(str(e)) from None
    return SeedCheckpoint(
        path=path,
        sha256=file_sha256(path),
        allocation=allocation,
        state_dict=sd,
        meta=meta,
        num_classes=int(sd["fc.weight"].shape[0]) if detector is None else 1000,
        epoch=obj.get("epoch") if isinstance(obj, Mapping) else None,
        iteration=obj.get("iteration") if isinstance(obj, Mapping) else None,
        detector=detector,
    )


def _check_weights_only(sd, allocation, source):
    """check_published_state_dict without BN running statistics (a GN seed has none)."""
    stats = ("running_mean", "running_var")
    check_published_state_dict(
        {k: v for k, v in sd.items() if not k.endswith(stats)},
        allocation,
        source,
        ignore=stats,
    )
