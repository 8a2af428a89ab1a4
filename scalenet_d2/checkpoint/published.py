"""Published ImageNet checkpoints -> detectron2: the published layout and its conversion.

The published layout (torchvision-like) and ours differ only outside the blocks:

    conv1.weight          -> stem.conv1.weight
    bn1.*                 -> stem.conv1.norm.*
    layer{L}.{b}.<rest>   -> res{L+1}.{b}.<rest>   (<rest> unchanged: conv1, bn1, conv2.{i}, ...)
    fc.*                  -> dropped (the ImageNet classifier)
    *.num_batches_tracked -> dropped (a training counter, not a weight; FrozenBN has none)

`convert_published_checkpoint` writes detectron2's pickle format (as detectron2's
convert-torchvision-to-d2.py does), marked `"__author__": "scalenet_d2"` and carrying the
allocation and the input file's name and sha256. It converts the ResNet arm as well: a
checkpoint in torchvision's ResNet layout (torchvision's ImageNet ResNets, or the ResNet twins
tools/train_classifier.py --resnet-twin writes) becomes detectron2's ResNet keys, checked
against the twin of its allocation:

    conv1 / bn1                    -> stem.conv1 / stem.conv1.norm
    layer{L}.{b}.conv{k} / bn{k}   -> res{L+1}.{b}.conv{k} / res{L+1}.{b}.conv{k}.norm
    layer{L}.{b}.downsample.0 / .1 -> res{L+1}.{b}.shortcut / res{L+1}.{b}.shortcut.norm

detectron2's DetectionCheckpointer loads these by suffix matching, but skips a
tensor whose shape differs with only a warning; `ScaleNetCheckpointer` instead refuses a
converted checkpoint that does not fit the model's ScaleNet, naming the first mismatching
key and both shapes.

Input normalisation: the release does not state it. The converted weights are assumed to
expect the standard PyTorch ImageNet recipe (`EXPECTED_INPUT`): RGB, mean 0.485/0.456/0.406
and std 0.229/0.224/0.225 of 0-255 pixels, which is the likely one.
"""

import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..atomic import bytes_writer, write_atomically
from ..modeling.allocation import (
    BUNDLED_ALLOCATIONS,
    SCALES,
    STAGE_NAMES,
    Allocation,
    AllocationError,
    StageAllocation,
    branch_kernel_size,
    load_allocation,
)
from ..modeling.classification import ResNetTwinClassifier, ScaleNetClassifier

__all__ = [
    "SCALENET_AUTHOR",
    "EXPECTED_INPUT",
    "CheckpointMismatchError",
    "published_key_shapes",
    "to_d2_key",
    "to_published_key",
    "published_state_dict",
    "load_published_state_dict",
    "infer_allocation",
    "check_published_state_dict",
    "ConversionResult",
    "convert_published_state_dict",
    "convert_published_checkpoint",
    "convert_resnet_twin_state_dict",
    "twin_key_shapes",
    "to_d2_twin_key",
    "file_sha256",
    "NETWORK_KEY",
    "describe_unreadable",
    "first_non_finite",
]

logger = logging.getLogger(__name__)

SCALENET_AUTHOR = "scalenet_d2"
# which network a converted checkpoint holds: "scalenet" (placed on the ScaleNet body by exact
# name) or "resnet_twin" (detectron2's ResNet keys, placed by detectron2's suffix matching)
NETWORK_KEY = "scalenet_network"

# What the converted ImageNet weights expect (assumed: the release does not say; see above).
EXPECTED_INPUT = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
}

# Feature side of stage res{k+2} at a 224x224 input: what the published sides are.
STANDARD_SIDES = (56, 28, 14, 7)


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the expected ScaleNet; the message names the first mismatch."""


# ----------------------------------------------------------------------------- published layout
def published_key_shapes(allocation: Allocation) -> Dict[str, Tuple[int, ...]]:
    """Shape of every published key of `allocation`'s network, in network order: the state_dict
    of its classifier, built on the meta device (shapes only, no memory, no initialisation).

    The classifier (fc.*) and BN's num_batches_tracked are not included.
    """
    return _body_key_shapes(ScaleNetClassifier, allocation)


def _body_key_shapes(classifier_class, allocation: Allocation) -> Dict[str, Tuple[int, ...]]:
    with torch.device("meta"):
        model = classifier_class(allocation, num_classes=1, norm="BN")
    return body_shapes(model.state_dict())


def body_shapes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of a classifier state_dict without its classifier (fc.*) and BN step counters."""
    return {
        key: _shape(value)
        for key, value in state_dict.items()
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked")
    }


def to_d2_key(published_key: str) -> Optional[str]:
    """The detectron2 name of a published key (relative to the ScaleNet body); None for fc.*."""
    if published_key.startswith("fc."):
        return None
    if published_key == "conv1.weight":
        return "stem.conv1.weight"
    if published_key.startswith("bn1."):
        return "stem.conv1.norm." + published_key[len("bn1.") :]
    match = re.match(r"^layer([1-4])\.(.*)$", published_key)
    if match:
        return f"res{int(match.group(1)) + 1}.{match.group(2)}"
    raise CheckpointMismatchError(
        f"key {published_key!r} is not in the published ScaleNet layout (conv1, bn1, layer1..layer4, fc)"
    )


def to_published_key(d2_key: str) -> str:
    """The published name of a detectron2 ScaleNet body key (the inverse of `to_d2_key`)."""
    if d2_key == "stem.conv1.weight":
        return "conv1.weight"
    if d2_key.startswith("stem.conv1.norm."):
        return "bn1." + d2_key[len("stem.conv1.norm.") :]
    match = re.match(r"^res([2-5])\.(.*)$", d2_key)
    if match:
        return f"layer{int(match.group(1)) - 1}.{match.group(2)}"
    raise CheckpointMismatchError(f"key {d2_key!r} is not in the ScaleNet body's layout (stem, res2..res5)")


def _first_differences(expected: Mapping[str, tuple], found: Mapping[str, tuple]):
    """(shape mismatches [(key, found, expected)], missing keys, unexpected keys), in order."""
    mismatched = [(k, found[k], shape) for k, shape in expected.items() if k in found and found[k] != shape]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    return mismatched, missing, unexpected


def _describe_differences(mismatched, missing, unexpected, found_name: str, expected_name: str) -> str:
    parts = []
    if mismatched:
        key, found_shape, expected_shape = mismatched[0]
        parts.append(
            f"first mismatching key {key!r}: shape {found_shape} in the {found_name}, "
            f"{expected_shape} in the {expected_name}"
        )
        if len(mismatched) > 1:
            parts.append(f"{len(mismatched) - 1} more keys differ in shape")
    if missing:
        parts.append(
            f"{len(missing)} keys of the {expected_name} missing from the {found_name} (first: {missing[0]!r})"
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} keys of the {found_name} not in the {expected_name} (first: {unexpected[0]!r})"
        )
    return "; ".join(parts)


def _shape(value) -> Tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


# ----------------------------------------------------------------------------- reading
def published_state_dict(obj, source: str = "<checkpoint>") -> Dict[str, torch.Tensor]:
    """The published state_dict inside a loaded checkpoint: bare, under "state_dict" or
    "model"; a DataParallel "module." prefix is removed."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointMismatchError(
            f"{source}: expected a state_dict (a dict of tensors), bare or under 'state_dict' or 'model'; "
            f"got {type(obj).__name__}"
        )
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise CheckpointMismatchError(f"{source}: entry {key!r} is a {type(value).__name__}; expected a tensor")
        if isinstance(key, str) and key.startswith("module."):
            key = key[len("module.") :]
        state_dict[key] = torch.as_tensor(value)
    return state_dict


def load_published_state_dict(path: str, allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a published checkpoint file. Only tensors and plain containers are unpickled
    unless `allow_pickle` (for trusted files that hold other objects)."""
    return published_state_dict(_load_checkpoint_object(path, allow_pickle), source=path)


def _load_checkpoint_object(path: str, allow_pickle: bool):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        if "Weights only load failed" in str(e) and not allow_pickle and _is_torch_or_pickle(path):
            first_line = str(e).strip().splitlines()[0]
            raise CheckpointMismatchError(
                f"{path}: holds Python objects besides tensors, which are not unpickled by default ({first_line}); "
                "if you trust the file, allow full unpickling (--allow-pickle)"
            ) from None
        raise CheckpointMismatchError(describe_unreadable(path, e)) from None
    return obj


def infer_allocation(state_dict: Mapping[str, torch.Tensor], source: str = "<state_dict>") -> Allocation:
    """The allocation a published state_dict was built with, read from its weight shapes.

    Widths come from the conv2.{i} output channels (0 where the branch is absent), planes from
    conv1, the stem from conv1; the stage sides are the published 56/28/14/7, checked against
    the branch kernel sizes. A bundled allocation with the same network gives its name.
    """
    if "conv1.weight" not in state_dict:
        raise CheckpointMismatchError(
            f"{source}: no 'conv1.weight'; expected a published ScaleNet state_dict (conv1, bn1, layer1..layer4, fc)"
        )
    stages = []
    for layer, (stage_name, side) in enumerate(zip(STAGE_NAMES, STANDARD_SIDES), start=1):
        num_blocks = 0
        while f"layer{layer}.{num_blocks}.conv1.weight" in state_dict:
            num_blocks += 1
        if num_blocks == 0:
            raise CheckpointMismatchError(
                f"{source}: no 'layer{layer}.0.conv1.weight'; expected 4 stages layer1..layer4"
            )
        blocks = []
        for b in range(num_blocks):
            if f"layer{layer}.{b}.conv2.weight" in state_dict:
                raise CheckpointMismatchError(
                    f"{source}: 'layer{layer}.{b}.conv2.weight' is a single conv, as in ResNet; expected a ScaleNet "
                    "checkpoint, with one conv2.{i}.weight per scale branch"
                )
            widths = []
            for i in range(len(SCALES)):
                conv = state_dict.get(f"layer{layer}.{b}.conv2.{i}.weight")
                if conv is not None and conv.shape[-1] != branch_kernel_size(side, i):
                    raise CheckpointMismatchError(
                        f"{source}: 'layer{layer}.{b}.conv2.{i}.weight' has kernel {conv.shape[-1]}, but a {stage_name} "
                        f"branch {i} of the published network (side {side}) has kernel {branch_kernel_size(side, i)}; "
                        "give the allocation explicitly"
                    )
                widths.append(0 if conv is None else int(conv.shape[0]))
            blocks.append(tuple(widths))
        planes = int(state_dict[f"layer{layer}.0.conv1.weight"].shape[0])
        try:
            stages.append(StageAllocation(stage_name, planes, side, tuple(blocks)))
        except AllocationError as e:
            raise CheckpointMismatchError(f"{source}: cannot infer the allocation: {e}") from None
    inferred = Allocation(
        name=os.path.splitext(os.path.basename(source))[0],
        stem_channels=int(state_dict["conv1.weight"].shape[0]),
        stages=tuple(stages),
        provenance={"method": "inferred from the weight shapes of a published-layout checkpoint", "checkpoint": source},
        source=source,
    )
    for name in BUNDLED_ALLOCATIONS:
        bundled = load_allocation(name)
        if bundled.same_network(inferred):
            return bundled
    return inferred


def check_published_state_dict(
    state_dict: Mapping[str, torch.Tensor], allocation: Allocation, source: str = "<state_dict>", ignore=()
) -> None:
    """Raise CheckpointMismatchError unless `state_dict` is exactly `allocation`'s published
    layout (besides fc.*, num_batches_tracked and keys ending in one of `ignore`)."""
    expected = {k: v for k, v in published_key_shapes(allocation).items() if not k.endswith(tuple(ignore))}
    differences = _first_differences(expected, body_shapes(state_dict))
    if any(differences):
        raise CheckpointMismatchError(
            f"{source} does not fit allocation {allocation.describe()}: "
            + _describe_differences(*differences, "checkpoint", "allocation")
        )


# ----------------------------------------------------------------------------- converting
@dataclass
class ConversionResult:
    model: Dict[str, np.ndarray]  # detectron2 names (relative to the backbone body) -> weights
    allocation: Allocation  # the ScaleNet's, or the allocation whose ResNet twin this is
    dropped_classifier: List[Tuple[str, Tuple[int, ...]]] = field(default_factory=list)
    dropped_counters: int = 0  # BN num_batches_tracked entries
    network: str = "scalenet"  # or "resnet_twin"

    def checkpoint(self, source: str = "", sha256: str = "") -> Dict:
        """detectron2's pickle checkpoint format, marked as ours."""
        return {
            "model": self.model,
            "__author__": SCALENET_AUTHOR,
            # suffix matching lets plain DetectionCheckpointer load it under any prefix
            # (backbone. or backbone.bottom_up.); ScaleNetCheckpointer places ScaleNet weights exactly
            "matching_heuristics": True,
            NETWORK_KEY: self.network,
            "scalenet_allocation": self.allocation.to_dict(),
            "scalenet_source": source,
            "scalenet_source_sha256": sha256,
            "scalenet_expected_input": dict(EXPECTED_INPUT),
        }


def _rename_checked(state_dict, rename, source: str, result: ConversionResult) -> ConversionResult:
    """Fills `result.model` with `rename(key)` -> weights; drops fc.* and BN step counters;
    refuses non-floating or non-finite weights, naming the key."""
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            result.dropped_counters += 1
            continue
        if key.startswith("fc."):
            result.dropped_classifier.append((key, _shape(value)))
            continue
        if not value.is_floating_point():
            raise CheckpointMismatchError(
                f"{source}: {key} holds {value.dtype} values; expected floating-point weights (float32 in the release)"
            )
        if not bool(torch.isfinite(value).all()):
            raise CheckpointMismatchError(
                f"{source}: {key} holds nan or inf values; expected finite weights (the checkpoint of a diverged "
                "or corrupted run?)"
            )
        result.model[rename(key)] = value.detach().cpu().numpy()
    return result


def convert_published_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    allocation=None,
    source: str = "<state_dict>",
) -> ConversionResult:
    """Check a published state_dict against `allocation` (inferred from its shapes when None)
    and rename it to detectron2's ScaleNet keys."""
    state_dict = published_state_dict(state_dict, source)
    allocation = infer_allocation(state_dict, source) if allocation is None else load_allocation(allocation)
    check_published_state_dict(state_dict, allocation, source)
    return _rename_checked(state_dict, to_d2_key, source, ConversionResult(model={}, allocation=allocation))


# ----------------------------------------------------------------------------- ResNet twins
def is_resnet_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """torchvision's ResNet layout: one 3x3 conv2 per block where ScaleNet has conv2.{i}."""
    return "layer1.0.conv2.weight" in state_dict


def to_d2_twin_key(torchvision_key: str) -> str:
    """The detectron2 ResNet name of a torchvision ResNet key (relative to the body)."""
    if not torchvision_key.startswith("layer"):
        return to_d2_key(torchvision_key)  # the stem: named as ScaleNet's
    match = re.match(r"^layer([1-4])\.(\d+)\.(conv|bn)([1-3])\.(\w+)$", torchvision_key)
    if match:
        layer, block, kind, k, leaf = match.groups()
        return f"res{int(layer) + 1}.{block}.conv{k}." + ("norm." if kind == "bn" else "") + leaf
    match = re.match(r"^layer([1-4])\.(\d+)\.downsample\.([01])\.(\w+)$", torchvision_key)
    if match:
        layer, block, index, leaf = match.groups()
        return f"res{int(layer) + 1}.{block}.shortcut." + ("norm." if index == "1" else "") + leaf
    raise CheckpointMismatchError(
        f"key {torchvision_key!r} is not in torchvision's ResNet layout (conv1, bn1, layer1..layer4 with conv1..3, "
        "bn1..3, downsample, fc)"
    )


def twin_key_shapes(allocation: Allocation) -> Dict[str, Tuple[int, ...]]:
    """Shape of every torchvision-layout key of `allocation`'s ResNet twin (fc.* and BN step
    counters excluded), from its classifier built on the meta device."""
    return _body_key_shapes(ResNetTwinClassifier, allocation)


def _twin_differences(state_dict, allocation):
    return _first_differences(twin_key_shapes(allocation), body_shapes(state_dict))


def convert_resnet_twin_state_dict(
    state_dict: Mapping[str, torch.Tensor], allocation=None, source: str = "<state_dict>"
) -> ConversionResult:
    """Check a torchvision-layout ResNet state_dict against the ResNet twin of `allocation`
    and rename it to detectron2's ResNet keys. Without an allocation, the bundled allocation
    whose twin it is (ResNet-50/101/152: scalenet50/101/152)."""
    state_dict = published_state_dict(state_dict, source)
    if allocation is None:
        fits = [name for name in BUNDLED_ALLOCATIONS if not any(_twin_differences(state_dict, load_allocation(name)))]
        if not fits:
            raise CheckpointMismatchError(
                f"{source}: a ResNet checkpoint (torchvision's layout) that is the twin of no bundled allocation "
                f"({', '.join(BUNDLED_ALLOCATIONS)}); give the allocation whose twin it is (--allocation)"
            )
        allocation = load_allocation(fits[0])  # twins depend on stem, widths and blocks only: the first is as good
    else:
        allocation = load_allocation(allocation)
    differences = _twin_differences(state_dict, allocation)
    if any(differences):
        raise CheckpointMismatchError(
            f"{source} does not fit the ResNet twin of allocation {allocation.describe()}: "
            + _describe_differences(*differences, "checkpoint", "twin")
        )
    result = ConversionResult(model={}, allocation=allocation, network="resnet_twin")
    return _rename_checked(state_dict, to_d2_twin_key, source, result)


# ----------------------------------------------------------------------------- converting files
def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_published_checkpoint(
    in_path: str,
    out_path: str,
    allocation=None,
    allow_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Convert an ImageNet checkpoint file into detectron2's pickle format at `out_path`: a
    published ScaleNet (or one tools/train_classifier.py trained), or a ResNet in torchvision's
    layout (torchvision's, or a twin tools/train_classifier.py --resnet-twin trained)."""
    if not out_path.endswith(".pkl"):
        raise ValueError(f"output {out_path!r}: must end in .pkl (detectron2 reads pickle checkpoints by that suffix)")
    obj = _load_checkpoint_object(in_path, allow_pickle)
    state_dict = published_state_dict(obj, source=in_path)
    sha256 = file_sha256(in_path)
    log(f"Input: {in_path} ({os.path.getsize(in_path)} bytes), sha256 {sha256}")
    twin = is_resnet_layout(state_dict)
    if twin and allocation is None:
        allocation = _recorded_allocation(obj, in_path)
        how = "recorded in the checkpoint" if allocation is not None else "matched by the weight shapes"
    else:
        how = "given" if allocation is not None else "inferred from the weight shapes"
    convert = convert_resnet_twin_state_dict if twin else convert_published_state_dict
    result = convert(state_dict, allocation, source=in_path)
    checkpoint = result.checkpoint(source=os.path.basename(in_path), sha256=sha256)
    write_atomically({out_path: bytes_writer(pickle.dumps(checkpoint))})

    alloc = result.allocation
    bundled = alloc.name in BUNDLED_ALLOCATIONS and load_allocation(alloc.name).same_network(alloc)
    if twin:
        blocks = "/".join(str(n) for n in alloc.blocks_per_stage)
        log(
            f"ResNet twin of allocation {alloc.name!r} ({how}): stem {alloc.stem_channels}, bottleneck widths "
            f"{'/'.join(str(st.planes) for st in alloc.stages)}, blocks {blocks}"
        )
    else:
        log(f"Allocation ({how}): {alloc.describe()}" + (" - a bundled allocation" if bundled else ""))
    if bundled:
        config_value = alloc.name
    elif isinstance(allocation, (str, os.PathLike)):
        config_value = os.fspath(allocation)
    else:  # not bundled and not a file yet: the config needs one
        config_value = out_path[: -len(".pkl")] + ".allocation.json"
        alloc.save(config_value)
        log(f"Wrote the allocation to {config_value}.")
    renamed = "conv1/bn1 -> stem.conv1[.norm], layerL -> res(L+1)" + (
        ", bnK -> convK.norm, downsample -> shortcut" if twin else ""
    )
    log(f"Converted {len(result.model)} tensors ({renamed}).")
    if result.dropped_classifier:
        dropped = ", ".join(f"{k} {s}" for k, s in result.dropped_classifier)
        log(f"Dropped the ImageNet classifier: {dropped}.")
    if result.dropped_counters:
        log(f"Dropped {result.dropped_counters} BN num_batches_tracked counters (not weights).")
    log(f"Wrote {out_path} (source name and sha256 in its metadata). Use it with:")
    log(f"  MODEL.WEIGHTS {out_path}")
    if twin:
        where = f"the R{alloc.depth} configs, or " if bundled else ""
        log(
            f"  in a ResNet twin config: {where}MODEL.BACKBONE.NAME build_resnet_twin_fpn_backbone with "
            f"MODEL.SCALENET.ALLOCATION {config_value} (both with MODEL.RESNETS.STRIDE_IN_1X1 False)"
        )
    else:
        log(f"  MODEL.SCALENET.ALLOCATION {config_value}")
    for key, value in EXPECTED_INPUT.items():
        log(f"  {key} {value}")
    if not twin:
        log("  (assumed: the release does not state its input normalisation; see docs/model.md)")
    return result


def _recorded_allocation(obj, source: str) -> Optional[Allocation]:
    """The allocation a tools/train_classifier.py --resnet-twin checkpoint records, or None."""
    from .classifier import ALLOCATION_KEY  # the classifier format's own key; classifier.py imports this module

    if not isinstance(obj, Mapping) or ALLOCATION_KEY not in obj:
        return None
    return Allocation.from_dict(obj[ALLOCATION_KEY], source=f"{source}: field '{ALLOCATION_KEY}'")


# ----------------------------------------------------------------------------- loading
def _is_torch_or_pickle(path: str) -> bool:
    """Whether the file starts as torch.save's zip archive or a pickle (protocol marker)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def describe_unreadable(path: str, error: Exception) -> str:
    """What a file that torch.load/pickle.load could not read is, in words that say what to fix."""
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size == 0:
        return f"{path} is empty (0 bytes), not a checkpoint"
    with open(path, "rb") as f:
        head = f.read(4)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not _is_torch_or_pickle(path):  # checked first: garbage fails weights_only too
        return (
            f"{path} ({size} bytes) is not a checkpoint: neither torch.save's zip format nor a pickle "
            f"(it starts with {head!r})"
        )
    if "Weights only load failed" in str(error):
        return (
            f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) refuses to unpickle "
            f"({first_line}); if you trust the file, load it with torch.load(weights_only=False) and torch.save "
            "only its tensors (its state_dict)"
        )
    if head.startswith(b"PK"):  # torch.save's zip archive
        return f"{path} ({size} bytes) is a torch checkpoint that is truncated or corrupt: {first_line}"
    return f"{path} ({size} bytes) is a pickle that is truncated or corrupt: {first_line}"


def first_non_finite(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The first floating-point entry holding nan or inf, or None."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None
