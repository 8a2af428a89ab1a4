"""ScaleNetCheckpointer: detectron2's DetectionCheckpointer that loads strictly (see the class).

It places weights converted by `convert_published_checkpoint` (published.py) on the model's
ScaleNet body by exact name, writes checkpoints atomically, and resumes from the newest intact one.
"""

import logging
import os
import re
from typing import List, Mapping, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling.backbone.resnet import ResNet
from detectron2.utils import comm

from ..atomic import bytes_writer, torch_file_writer, write_atomically
from ..modeling.allocation import STAGE_NAMES
from ..modeling.scalenet import ScaleNet
from .published import (
    EXPECTED_INPUT,
    NETWORK_KEY,
    SCALENET_AUTHOR,
    CheckpointMismatchError,
    _describe_differences,
    _first_differences,
    _shape,
    describe_unreadable,
    first_non_finite,
)

__all__ = ["ScaleNetCheckpointer"]

logger = logging.getLogger(__name__)

CONVERT_COMMAND = "python tools/convert_scalenet_to_d2.py {path} pretrained/{stem}.pkl"

# Checkpoint entries a backbone-only (ImageNet) checkpoint may carry that no detector uses:
# the classifier (fc, fc1000 in detectron2's MSRA pickles) and BN's step counters.
_CLASSIFIER_KEY = re.compile(r"(^|\.)fc\d*(\.|_)[a-z]+$|num_batches_tracked$")


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
        self.resumed_from = None  # the checkpoint --resume chose (newest_intact_checkpoint)
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
        # a checkpoint written just before a kill, before last_checkpoint named it, counts too
        if resume and self.save_dir and self.resume_candidates():
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
        """The run's checkpoints, newest first whatever `last_checkpoint` says (a kill between
        writing a checkpoint and its tag leaves the tag one behind): model_final.pth, then
        model_<iteration>.pth by iteration, then a differently named file the tag names."""
        if not os.path.isdir(self.save_dir):
            return []
        tagged = self.get_checkpoint_file() if self.has_checkpoint() else None
        found = {}
        for f in os.listdir(self.save_dir):
            match = re.fullmatch(r".+_(final|\d+)\.pth", f)
            if match:
                found[f] = (match.group(1) == "final", int(match.group(1)) if match.group(1).isdigit() else 0)
        paths = [os.path.join(self.save_dir, f) for f in sorted(found, key=found.get, reverse=True)]
        return list(dict.fromkeys(paths + ([tagged] if tagged else [])))

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
            self.resumed_from = path
            return path
        raise CheckpointMismatchError(
            f"--resume: no intact checkpoint in {self.save_dir}: " + "; ".join(skipped or ["none found"])
        )

    def rewrite_final(self) -> None:
        """For a finished run resumed from the checkpoint of its last iteration other than
        model_final.pth (missing, or unreadable and skipped): model_final.pth written again from
        it, the same state, so that the run's result and `last_checkpoint` name an intact file."""
        final = os.path.join(self.save_dir, "model_final.pth")
        source = self.resumed_from
        if source is None or source == final or not comm.is_main_process():
            return
        with open(source, "rb") as f:
            data = f.read()
        write_atomically({final: bytes_writer(data)})
        self.tag_last_checkpoint("model_final.pth")
        self.logger.warning(
            f"Resume: the run had finished; wrote {final} again from {os.path.basename(source)}, the checkpoint of "
            "its last iteration"
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
            command = CONVERT_COMMAND.format(path=filename, stem=stem)
            raise CheckpointMismatchError(
                f"{filename} is an unconverted ImageNet {'ScaleNet' if kind == 'scalenet' else 'ResNet'} checkpoint "
                f"(keys conv1, bn1, layer1..4, fc); convert it first:\n    {command}\n"
                f"then use MODEL.WEIGHTS pretrained/{stem}.pkl"
            )
        return loaded

    def _load_model(self, checkpoint):
        if checkpoint.get("__author__") == SCALENET_AUTHOR:
            self._log_provenance(checkpoint)
            if checkpoint.get(NETWORK_KEY, "scalenet") == "scalenet":
                checkpoint = self._place_scalenet_weights(checkpoint)
        self._check_values(checkpoint)
        incompatible = super()._load_model(checkpoint)
        self._check_body_loaded(incompatible, heuristic=bool(checkpoint.get("matching_heuristics")))
        return incompatible

    def _log_provenance(self, checkpoint):
        """Which ImageNet file the converted weights came from, so that runs can tell whether they
        started from the same one."""
        network = "ResNet twin" if checkpoint.get(NETWORK_KEY) == "resnet_twin" else "ScaleNet"
        allocation = (checkpoint.get("scalenet_allocation") or {}).get("name", "unknown")
        source = checkpoint.get("scalenet_source") or "unknown"
        sha256 = checkpoint.get("scalenet_source_sha256") or "not recorded (converted by an older scalenet_d2)"
        logger.info(
            f"{self._source()}: ImageNet weights of the {network} of allocation '{allocation}', converted by "
            f"scalenet_d2 from {source} (sha256 {sha256})"
        )

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
