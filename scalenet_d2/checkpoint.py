"""Published ImageNet checkpoints -> detectron2, and loading them strictly.

The published layout (torchvision-like) and ours differ only outside the blocks:

    conv1.weight          -> stem.conv1.weight
    bn1.*                 -> stem.conv1.norm.*
    layer{L}.{b}.<rest>   -> res{L+1}.{b}.<rest>   (<rest> unchanged: conv1, bn1, conv2.{i}, ...)
    fc.*                  -> dropped (the ImageNet classifier)
    *.num_batches_tracked -> dropped (a training counter, not a weight; FrozenBN has none)

`convert_published_checkpoint` writes detectron2's pickle format (as detectron2's
convert-torchvision-to-d2.py does), marked `"__author__": "scalenet_d2"` and carrying the
allocation. detectron2's DetectionCheckpointer loads it by suffix matching, but skips a
tensor whose shape differs with only a warning; `ScaleNetCheckpointer` instead refuses a
converted checkpoint that does not fit the model's ScaleNet, naming the first mismatching
key and both shapes.

Input normalisation: the release does not state it. The converted weights are assumed to
expect the standard PyTorch ImageNet recipe (`EXPECTED_INPUT`): RGB, mean 0.485/0.456/0.406
and std 0.229/0.224/0.225 of 0-255 pixels, which is the likely one.
"""

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone.resnet import ResNet
from detectron2.utils import comm

from .allocation import (
    BUNDLED_ALLOCATIONS,
    SCALES,
    STAGE_NAMES,
    Allocation,
    AllocationError,
    StageAllocation,
    branch_kernel_size,
    load_allocation,
)
from .atomic import bytes_writer, torch_file_writer, write_atomically
from .classification import ScaleNetClassifier
from .scalenet import ScaleNet

__all__ = [
    "SCALENET_AUTHOR",
    "EXPECTED_INPUT",
    "CheckpointMismatchError",
    "published_key_shapes",
    "to_d2_key",
    "published_state_dict",
    "load_published_state_dict",
    "infer_allocation",
    "check_published_state_dict",
    "ConversionResult",
    "convert_published_state_dict",
    "convert_published_checkpoint",
    "describe_unreadable",
    "first_non_finite",
    "ScaleNetCheckpointer",
]

logger = logging.getLogger(__name__)

SCALENET_AUTHOR = "scalenet_d2"

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
    with torch.device("meta"):
        model = ScaleNetClassifier(allocation, num_classes=1, norm="BN")
    return {
        key: _shape(value)
        for key, value in model.state_dict().items()
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
    return published_state_dict(obj, source=path)


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
    state_dict: Mapping[str, torch.Tensor], allocation: Allocation, source: str = "<state_dict>"
) -> None:
    """Raise CheckpointMismatchError unless `state_dict` is exactly `allocation`'s published
    layout (besides fc.* and num_batches_tracked)."""
    found = {
        k: _shape(v) for k, v in state_dict.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    differences = _first_differences(published_key_shapes(allocation), found)
    if any(differences):
        raise CheckpointMismatchError(
            f"{source} does not fit allocation {allocation.describe()}: "
            + _describe_differences(*differences, "checkpoint", "allocation")
        )


# ----------------------------------------------------------------------------- converting
@dataclass
class ConversionResult:
    model: Dict[str, np.ndarray]  # detectron2 names (relative to the ScaleNet body) -> weights
    allocation: Allocation
    dropped_classifier: List[Tuple[str, Tuple[int, ...]]] = field(default_factory=list)
    dropped_counters: int = 0  # BN num_batches_tracked entries

    def checkpoint(self, source: str = "") -> Dict:
        """detectron2's pickle checkpoint format, marked as ours."""
        return {
            "model": self.model,
            "__author__": SCALENET_AUTHOR,
            # suffix matching lets plain DetectionCheckpointer load it under any prefix
            # (backbone. or backbone.bottom_up.); ScaleNetCheckpointer places it exactly
            "matching_heuristics": True,
            "scalenet_allocation": self.allocation.to_dict(),
            "scalenet_source": source,
            "scalenet_expected_input": dict(EXPECTED_INPUT),
        }


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
    result = ConversionResult(model={}, allocation=allocation)
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            result.dropped_counters += 1
            continue
        d2_key = to_d2_key(key)
        if d2_key is None:
            result.dropped_classifier.append((key, _shape(value)))
            continue
        result.model[d2_key] = value.detach().cpu().numpy()
    return result


def convert_published_checkpoint(
    in_path: str,
    out_path: str,
    allocation=None,
    allow_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Convert a published ImageNet checkpoint file into detectron2's pickle format at `out_path`."""
    if not out_path.endswith(".pkl"):
        raise ValueError(f"output {out_path!r}: must end in .pkl (detectron2 reads pickle checkpoints by that suffix)")
    state_dict = load_published_state_dict(in_path, allow_pickle=allow_pickle)
    result = convert_published_state_dict(state_dict, allocation, source=in_path)
    write_atomically({out_path: bytes_writer(pickle.dumps(result.checkpoint(source=os.path.basename(in_path))))})

    alloc = result.allocation
    how = "given" if allocation is not None else "inferred from the weight shapes"
    bundled = alloc.name in BUNDLED_ALLOCATIONS and load_allocation(alloc.name).same_network(alloc)
    log(f"Allocation ({how}): {alloc.describe()}" + (" - a bundled allocation" if bundled else ""))
    if bundled:
        config_value = alloc.name
    elif isinstance(allocation, (str, os.PathLike)):
        config_value = os.fspath(allocation)
    else:  # not bundled and not a file yet: the config needs one
        config_value = out_path[: -len(".pkl")] + ".allocation.json"
        alloc.save(config_value)
        log(f"Wrote the allocation to {config_value}.")
    log(f"Converted {len(result.model)} tensors (conv1/bn1 -> stem.conv1[.norm], layerL -> res(L+1)).")
    if result.dropped_classifier:
        dropped = ", ".join(f"{k} {s}" for k, s in result.dropped_classifier)
        log(f"Dropped the ImageNet classifier: {dropped}.")
    if result.dropped_counters:
        log(f"Dropped {result.dropped_counters} BN num_batches_tracked counters (not weights).")
    log(f"Wrote {out_path}. Use it with:")
    log(f"  MODEL.WEIGHTS {out_path}")
    log(f"  MODEL.SCALENET.ALLOCATION {config_value}")
    for key, value in EXPECTED_INPUT.items():
        log(f"  {key} {value}")
    log("  (assumed: the release does not state its input normalisation; see README)")
    return result


# ----------------------------------------------------------------------------- loading
CONVERT_COMMAND = "python tools/convert_scalenet_to_d2.py {path} pretrained/{stem}.pkl"
TORCHVISION_COMMAND = "python <detectron2>/tools/convert-torchvision-to-d2.py {path} pretrained/{stem}.pkl"

# Checkpoint entries a backbone-only (ImageNet) checkpoint may carry that no detector uses:
# the classifier (fc, fc1000 in detectron2's MSRA pickles) and BN's step counters.
_CLASSIFIER_KEY = re.compile(r"(^|\.)fc\d*(\.|_)[a-z]+$|num_batches_tracked$")


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


def _looks_published(keys) -> Optional[str]:
    """'scalenet' or 'resnet' when the keys are an unconverted ImageNet classifier's layout
    (conv1, bn1, layer1..4, fc: the published ScaleNet release or torchvision's ResNet)."""
    keys = set(keys)
    if "conv1.weight" not in keys or not any(k.startswith("layer1.") for k in keys):
        return None
    return "scalenet" if any(re.match(r"layer\d\.\d+\.conv2\.\d+\.weight$", k) for k in keys) else "resnet"


class ScaleNetCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer that never loads or keeps wrong weights quietly.

    Loading (MODEL.WEIGHTS, --resume, --eval-only), checked against the model that was built:
      - a file that is empty, truncated or not a checkpoint fails saying which of these it is;
      - an unconverted ImageNet checkpoint (published ScaleNet or torchvision ResNet layout)
        fails with the command that converts it;
      - a ScaleNet checkpoint written by `convert_published_checkpoint` is placed on the
        model's ScaleNet body by exact name; any other goes through detectron2's loading;
      - a non-floating or non-finite tensor for a floating-point weight fails, naming the key;
      - every parameter and buffer of the backbone body (the ScaleNet, or detectron2's ResNet
        of the twin configs) must be loaded, and no checkpoint tensor meant for it left
        unused: otherwise CheckpointMismatchError names how many and the first key with both
        shapes. `allow_partial=True` (MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS) turns this one
        check into a logged warning, for deliberate partial loads.
    Heads and FPN may stay unloaded (ImageNet weights hold only the body), as in detectron2.

    Saving: each checkpoint and `last_checkpoint` is written to a temporary file and renamed,
    so an interruption leaves the previous file whole; a model holding nan/inf is never saved.
    Resuming: from the newest checkpoint that reads and is finite, logging each one skipped
    and why.
    """

    def __init__(self, model, save_dir="", *, allow_partial=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_partial = allow_partial
        self._preloaded = None  # (path, checkpoint) read while choosing what to resume from

    # ------------------------------------------------------------------ saving
    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        bad = first_non_finite(data["model"])
        if bad is not None:
            raise FloatingPointError(
                f"not saving {name}.pth: model tensor {bad!r} holds nan or inf; the checkpoints already in "
                f"{self.save_dir} are left as they were"
            )
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        write_atomically({path: torch_file_writer(data)})
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        write_atomically({path: bytes_writer(last_filename_basename.encode())})

    # ------------------------------------------------------------------ resuming
    def resume_or_load(self, path, *, resume=True):
        if resume and self.save_dir and os.path.isdir(self.save_dir):
            self._remove_interrupted_writes()
        if resume and self.has_checkpoint():
            return self.load(self.newest_intact_checkpoint())
        return self.load(path, checkpointables=[])

    def _remove_interrupted_writes(self):
        """Temporary files of writes a kill cut short (see `save`); never read, only in the way."""
        if not comm.is_main_process():
            return
        for name in os.listdir(self.save_dir):
            if re.fullmatch(r"\.(model_.+|last_checkpoint)\.[^.]+\.tmp(\.pth)?", name):
                self.logger.info(f"Removing {name}, left by an interrupted write")
                os.remove(os.path.join(self.save_dir, name))

    def resume_candidates(self) -> List[str]:
        """The run's checkpoints, newest first: the one `last_checkpoint` names, then
        model_final.pth, then model_<iteration>.pth by iteration."""
        tagged = self.get_checkpoint_file() if self.has_checkpoint() else None
        found = {}
        for f in os.listdir(self.save_dir):
            match = re.fullmatch(r".+_(final|\d+)\.pth", f)
            if match:
                found[f] = (match.group(1) == "final", int(match.group(1)) if match.group(1).isdigit() else 0)
        paths = [os.path.join(self.save_dir, f) for f in sorted(found, key=found.get, reverse=True)]
        return list(dict.fromkeys(([tagged] if tagged else []) + paths))

    def newest_intact_checkpoint(self) -> str:
        skipped = []
        for path in self.resume_candidates():
            try:
                if not os.path.isfile(path):
                    raise CheckpointMismatchError(f"{path} does not exist")
                checkpoint = self._read(path)
                bad = first_non_finite(checkpoint.get("model", {}))
                if bad is not None:
                    raise CheckpointMismatchError(f"{path}: tensor {bad!r} holds nan or inf")
            except CheckpointMismatchError as e:
                self.logger.warning(f"Resume: skipping {os.path.basename(path)}: {e}")
                skipped.append(str(e))
                continue
            if skipped:
                self.logger.warning(f"Resume: resuming from {path}, the newest intact checkpoint")
            self._preloaded = (path, checkpoint)
            return path
        raise CheckpointMismatchError(
            f"--resume: no intact checkpoint in {self.save_dir}: " + "; ".join(skipped or ["none found"])
        )

    def _read(self, path):
        """`_load_file` outside `load`: newer detectron2 reads the path's URL query there."""
        parses_url = hasattr(self, "_parsed_url_during_load")
        if parses_url:
            self._parsed_url_during_load = urlparse(path)
        try:
            return self._load_file(path)
        finally:
            if parses_url:
                self._parsed_url_during_load = None

    # ------------------------------------------------------------------ loading
    def load(self, path, *args, **kwargs):
        self._loading_path = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._preloaded = None

    def _load_file(self, filename):
        if self._preloaded is not None and self._preloaded[0] == filename:
            return self._preloaded[1]
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # whatever torch.load or pickle raise on a file that is not what it should be
            if not os.path.isfile(filename):
                raise
            raise CheckpointMismatchError(describe_unreadable(filename, e)) from None
        found = loaded.get("model") if isinstance(loaded, Mapping) else loaded
        if not isinstance(found, Mapping):
            raise CheckpointMismatchError(
                f"{filename} is not a model checkpoint: expected a dict of tensors, or one under 'model'; got "
                f"{type(found).__name__}"
            )
        model = loaded["model"]
        if "state_dict" in model and isinstance(model["state_dict"], Mapping):  # {"state_dict": ...} as published
            model = model["state_dict"]
        kind = _looks_published(k[len("module.") :] if k.startswith("module.") else k for k in model)
        if kind is not None:
            stem = os.path.splitext(os.path.basename(filename))[0]
            command = (CONVERT_COMMAND if kind == "scalenet" else TORCHVISION_COMMAND).format(path=filename, stem=stem)
            raise CheckpointMismatchError(
                f"{filename} is an unconverted ImageNet {'ScaleNet' if kind == 'scalenet' else 'ResNet'} checkpoint "
                f"(keys conv1, bn1, layer1..4, fc); convert it first:\n    {command}\n"
                f"then use MODEL.WEIGHTS pretrained/{stem}.pkl"
            )
        return loaded

    def _load_model(self, checkpoint):
        if checkpoint.get("__author__") == SCALENET_AUTHOR:
            checkpoint = self._place_scalenet_weights(checkpoint)
        self._check_values(checkpoint)
        incompatible = super()._load_model(checkpoint)
        self._check_body_loaded(incompatible, heuristic=bool(checkpoint.get("matching_heuristics")))
        return incompatible

    def _source(self):
        return getattr(self, "_loading_path", None) or "checkpoint"

    def _check_values(self, checkpoint):
        """Refuses integer or nan/inf values for the model's floating-point tensors."""
        model_state = self.model.state_dict()
        for key, value in checkpoint["model"].items():
            value = torch.as_tensor(value)
            target = model_state.get(key[len("module.") :] if key.startswith("module.") else key)
            wants_float = target.is_floating_point() if target is not None else not key.endswith("num_batches_tracked")
            if wants_float and not value.is_floating_point():
                raise CheckpointMismatchError(
                    f"{self._source()}: tensor {key!r} is {value.dtype}; expected floating-point weights"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointMismatchError(
                    f"{self._source()}: tensor {key!r} holds nan or inf ({int((~torch.isfinite(value)).sum())} of "
                    f"{value.numel()} values); refusing to load it"
                )

    def _bodies(self):
        """(prefix, module) of each backbone body: ScaleNet, or detectron2's ResNet (the twins)."""
        found = [(name, m) for name, m in self.model.named_modules() if isinstance(m, ResNet)]
        outermost = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n and o)]
        return [((n + "." if n else ""), m) for n, m in outermost]

    def _check_body_loaded(self, incompatible, heuristic):
        model_state = self.model.state_dict()
        problems = []  # (key, shape in checkpoint, shape in model)
        for prefix, body in self._bodies():
            body_keys = {prefix + k for k in body.state_dict() if not k.endswith("num_batches_tracked")}
            problems += [(k, c, m) for k, c, m in incompatible.incorrect_shapes if k in body_keys]
            problems += [(k, None, _shape(model_state[k])) for k in incompatible.missing_keys if k in body_keys]
            if heuristic:  # a backbone-only checkpoint: all it holds is meant for the body
                unused = [k for k in incompatible.unexpected_keys if not _CLASSIFIER_KEY.search(k)]
            else:
                unused = [k for k in incompatible.unexpected_keys if k.startswith(prefix) and prefix]
            problems += [(k, "in the checkpoint", None) for k in unused]
        if not problems:
            return
        key, in_checkpoint, in_model = problems[0]
        if in_checkpoint is None:
            first = f"{key!r}: shape {in_model} in the model, absent from the checkpoint"
        elif in_model is None:
            first = f"{key!r}: in the checkpoint, not used by the model"
        else:
            first = f"{key!r}: shape {tuple(in_checkpoint)} in the checkpoint, {tuple(in_model)} in the model"
        message = (
            f"{self._source()} does not fit the model's backbone: {len(problems)} backbone tensors are not loaded or "
            f"not used; first {first}. Is it a checkpoint of another allocation or backbone (MODEL.SCALENET."
            "ALLOCATION, MODEL.BACKBONE.NAME)? For a deliberate partial load set MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS "
            "True."
        )
        if not self.allow_partial:
            raise CheckpointMismatchError(message)
        self.logger.warning(
            message.split(" Is it a checkpoint")[0] + " (allowed: MODEL.SCALENET.ALLOW_PARTIAL_WEIGHTS)"
        )

    def _find_scalenet(self):
        found = [(name, module) for name, module in self.model.named_modules() if isinstance(module, ScaleNet)]
        if len(found) != 1:
            raise CheckpointMismatchError(
                f"{self._source()} holds ScaleNet backbone weights (converted by scalenet_d2), but the model has "
                f"{len(found)} ScaleNet modules; expected exactly one"
            )
        name, module = found[0]
        return (name + "." if name else ""), module

    def _place_scalenet_weights(self, checkpoint):
        source = self._source()
        prefix, scalenet = self._find_scalenet()
        weights = {k: torch.as_tensor(v) for k, v in checkpoint["model"].items()}

        not_built = tuple(f"{name}." for name in STAGE_NAMES if name not in scalenet.stage_names)
        skipped = [k for k in weights if k.startswith(not_built)]
        if skipped:
            logger.info(
                f"{source}: skipping {len(skipped)} weights of stages this model does not build "
                f"({', '.join(p.rstrip('.') for p in not_built)}; MODEL.SCALENET.OUT_FEATURES stops before them)"
            )
        found = {k: _shape(v) for k, v in weights.items() if k not in skipped and not k.endswith("num_batches_tracked")}
        expected = {k: _shape(v) for k, v in scalenet.state_dict().items() if not k.endswith("num_batches_tracked")}
        differences = _first_differences(expected, found)
        if any(differences):
            recorded = checkpoint.get("scalenet_allocation", {}).get("name", "unknown")
            raise CheckpointMismatchError(
                f"{source} (converted from allocation '{recorded}') does not fit the model's ScaleNet "
                f"'{prefix.rstrip('.') or '<model>'}' (allocation {scalenet.allocation.describe()}): "
                + _describe_differences(*differences, "checkpoint", "model")
                + ". Set MODEL.SCALENET.ALLOCATION to the checkpoint's allocation, or convert a checkpoint of this one."
            )
        self._warn_on_pixel_normalisation(checkpoint)

        checkpoint = dict(checkpoint)
        checkpoint["model"] = {prefix + k: weights[k] for k in found}
        checkpoint["matching_heuristics"] = False  # names are exact now
        return checkpoint

    def _warn_on_pixel_normalisation(self, checkpoint):
        expected = checkpoint.get("scalenet_expected_input", EXPECTED_INPUT)
        mean, std = getattr(self.model, "pixel_mean", None), getattr(self.model, "pixel_std", None)
        if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
            return
        want_mean = torch.tensor(expected["MODEL.PIXEL_MEAN"]).view(-1, 1, 1)
        want_std = torch.tensor(expected["MODEL.PIXEL_STD"]).view(-1, 1, 1)
        if mean.shape != want_mean.shape or not (
            torch.allclose(mean.cpu().float(), want_mean, atol=1e-3)
            and torch.allclose(std.cpu().float(), want_std, atol=1e-3)
        ):
            logger.warning(
                "The converted ScaleNet weights expect "
                + ", ".join(f"{k} {v}" for k, v in expected.items())
                + f"; this model has MODEL.PIXEL_MEAN {mean.flatten().tolist()}, MODEL.PIXEL_STD {std.flatten().tolist()}."
            )
