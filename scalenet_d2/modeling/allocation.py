"""Neuron allocations: how many output channels each scale branch of each SA layer has.

An allocation fixes a ScaleNet completely: the stem width, and per stage the bottleneck
width `planes`, the feature side at a 224x224 input (which fixes each branch's kernel
size) and, per block, the widths (c1, c2, c4, c7) of the branches at scale 1, 2, 4, 7.

Two file formats are read (see allocations/README.md):
- the project format, a self-describing JSON object (`"format": "scalenet_d2.allocation"`),
  in which the bundled allocations are shipped;
- the published row format, a JSON list of `[c1, c2, c4, c7, side]` rows, one per block,
  16/33/50 rows for depth 50/101/152 (the files of the authors' release, read unchanged).

Every problem with a file raises `AllocationError` naming the file, the row or block, the
field and what was expected.
"""

import difflib
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

from ..atomic import bytes_writer, write_atomically

__all__ = [
    "SCALES",
    "STAGE_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PUBLISHED_LAYOUTS",
    "BUNDLED_ALLOCATIONS",
    "BUNDLED_DIR",
    "AllocationError",
    "StageAllocation",
    "Allocation",
    "branch_kernel_size",
    "load_allocation",
]

# Scale factor of each SA branch, in branch order (branch index i = 0..3).
SCALES = (1, 2, 4, 7)
STAGE_NAMES = ("res2", "res3", "res4", "res5")

FORMAT_NAME = "scalenet_d2.allocation"
FORMAT_VERSION = 1

# The published networks, by number of rows in a published allocation file:
# (depth, blocks per stage). Bottleneck widths and stem are those of ResNet.
PUBLISHED_LAYOUTS = {16: (50, (3, 4, 6, 3)), 33: (101, (3, 4, 23, 3)), 50: (152, (3, 8, 36, 3))}
PUBLISHED_PLANES = (64, 128, 256, 512)
PUBLISHED_STEM_CHANNELS = 64

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "allocations"
BUNDLED_ALLOCATIONS = ("scalenet50", "scalenet50_light", "scalenet101", "scalenet152", "scalenet_tiny")

Widths = Tuple[int, int, int, int]


class AllocationError(ValueError):
    """A malformed or unknown allocation; the message says where and what was expected."""


def branch_kernel_size(side: int, branch_index: int) -> int:
    """Kernel of SA branch `branch_index` (0..3) in a stage of feature side `side`.

    3x3 while the branch's pooled map at 224x224 input, side / 2**i, is larger than one
    pixel, else 1x1. The published rule uses 2**i (1, 2, 4, 8), not the scale factor.
    """
    return 3 if side / 2**branch_index > 1 else 1


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_positive_int(value, where: str, what: str) -> int:
    if not _is_int(value) or value <= 0:
        raise AllocationError(f"{where}: {what} = {value!r}; expected a positive integer")
    return int(value)


def _check_widths(widths, where: str) -> Widths:
    """One block's branch widths: 4 non-negative integers, not all 0."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) != len(SCALES):
        raise AllocationError(
            f"{where}: widths {widths!r}; expected a list of {len(SCALES)} integers "
            f"[c1, c2, c4, c7], the widths of the scale {', '.join(map(str, SCALES))} branches"
        )
    for scale, width in zip(SCALES, widths):
        if not _is_int(width) or width < 0:
            raise AllocationError(f"{where}: width c{scale} = {width!r}; expected a non-negative integer")
    if sum(widths) == 0:
        raise AllocationError(f"{where}: all widths are 0 {list(widths)}; expected at least one branch with width > 0")
    return tuple(int(w) for w in widths)


@dataclass(frozen=True)
class StageAllocation:
    """One stage: bottleneck width, feature side at 224x224 input, branch widths per block."""

    name: str  # "res2" .. "res5"
    planes: int  # bottleneck width; the stage outputs 4 * planes channels
    side: int  # feature side at a 224x224 input; fixes the branch kernel sizes
    blocks: Tuple[Widths, ...]  # (c1, c2, c4, c7) per block

    def __post_init__(self):
        where = f"stage {self.name}"
        _check_positive_int(self.planes, where, "planes")
        _check_positive_int(self.side, where, "side")
        if isinstance(self.blocks, (str, bytes)) or not isinstance(self.blocks, Sequence) or not self.blocks:
            raise AllocationError(f"{where}: blocks {self.blocks!r}; expected a non-empty list of blocks")
        blocks = tuple(_check_widths(w, f"{where} block {self.name}.{b}") for b, w in enumerate(self.blocks))
        # normalise lists and numpy integers, so that equal allocations compare equal
        object.__setattr__(self, "planes", int(self.planes))
        object.__setattr__(self, "side", int(self.side))
        object.__setattr__(self, "blocks", blocks)

    @property
    def out_channels(self) -> int:
        return 4 * self.planes

    @property
    def kernel_sizes(self) -> Tuple[int, ...]:
        """Kernel size of each branch (by branch index), from this stage's side."""
        return tuple(branch_kernel_size(self.side, i) for i in range(len(SCALES)))


@dataclass(frozen=True)
class Allocation:
    """A whole ScaleNet: stem width and 4 stages. See allocations/README.md for the file format."""

    name: str
    stem_channels: int
    stages: Tuple[StageAllocation, ...]
    provenance: Dict = field(default_factory=dict, compare=False, hash=False)
    # the input size the stage sides refer to (224: ImageNet training crops)
    input_size: int = 224
    # where this allocation was read from, for messages ("" when built in code)
    source: str = field(default="", compare=False, hash=False)

    def __post_init__(self):
        where = f"allocation {self.name!r}"
        _check_positive_int(self.stem_channels, where, "stem_channels")
        _check_positive_int(self.input_size, where, "input_size")
        stages = tuple(self.stages)
        names = tuple(getattr(stage, "name", None) for stage in stages)
        if names != STAGE_NAMES or not all(isinstance(s, StageAllocation) for s in stages):
            raise AllocationError(
                f"{where}: stages {list(names)}; expected 4 StageAllocation, named {list(STAGE_NAMES)}"
            )
        object.__setattr__(self, "stem_channels", int(self.stem_channels))
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "provenance", dict(self.provenance))

    @property
    def num_blocks(self) -> int:
        return sum(len(stage.blocks) for stage in self.stages)

    @property
    def depth(self) -> int:
        """Layers counted as for ResNet: 3 per bottleneck, plus stem conv and classifier."""
        return 3 * self.num_blocks + 2

    @property
    def blocks_per_stage(self) -> Tuple[int, ...]:
        return tuple(len(stage.blocks) for stage in self.stages)

    def same_network(self, other: "Allocation") -> bool:
        """Whether `other` describes the same network (names and provenance aside)."""
        return (self.stem_channels, self.stages) == (other.stem_channels, other.stages)

    def describe(self) -> str:
        """One line for messages: name, depth and where it was read from."""
        text = f"'{self.name}' (depth {self.depth}, blocks {'/'.join(map(str, self.blocks_per_stage))})"
        return f"{text} from {self.source}" if self.source else text

    # ------------------------------------------------------------------ project format
    def to_dict(self) -> Dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "depth": self.depth,
            "scales": list(SCALES),
            "input_size": self.input_size,
            "stem_channels": self.stem_channels,
            "stages": [
                {
                    "name": stage.name,
                    "planes": stage.planes,
                    "side": stage.side,
                    "blocks": [list(widths) for widths in stage.blocks],
                }
                for stage in self.stages
            ],
            "provenance": dict(self.provenance),
        }

    def to_json(self) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        # one block per line: collapse innermost lists of numbers
        number = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
        return (
            re.sub(
                rf"\[\s*({number}(?:\s*,\s*{number})*)\s*\]",
                lambda m: "[" + ", ".join(re.split(r"\s*,\s*", m.group(1))) + "]",
                text,
            )
            + "\n"
        )

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the project format to `path` atomically (a reader never sees half a file)."""
        write_atomically({os.fspath(path): bytes_writer(self.to_json().encode("utf-8"))})

    @classmethod
    def from_dict(cls, data, source: str = "<dict>") -> "Allocation":
        """Parse the project format; errors name `source` and the offending entry."""
        if not isinstance(data, dict):
            raise AllocationError(f"{source}: expected a JSON object in the {FORMAT_NAME} format, got {_kind(data)}")
        if data.get("format") != FORMAT_NAME:
            raise AllocationError(f'{source}: "format" is {data.get("format")!r}; expected {FORMAT_NAME!r}')
        if data.get("version") != FORMAT_VERSION:
            raise AllocationError(
                f'{source}: "version" is {data.get("version")!r}; this scalenet_d2 reads version {FORMAT_VERSION}'
            )
        _check_known_fields(data, TOP_LEVEL_FIELDS, source)
        for key in ("name", "scales", "stem_channels", "stages"):
            if key not in data:
                raise AllocationError(f'{source}: missing field "{key}"')
        if not isinstance(data["name"], str) or not data["name"]:
            raise AllocationError(f'{source}: "name" is {data["name"]!r}; expected a non-empty string')
        scales = data["scales"]
        if not isinstance(scales, list) or not all(_is_int(s) for s in scales) or scales != list(SCALES):
            raise AllocationError(
                f'{source}: "scales" is {data["scales"]!r}; expected {list(SCALES)}, the scale factors of ScaleNet'
            )
        stem_channels = _check_positive_int(data["stem_channels"], source, '"stem_channels"')
        input_size = _check_positive_int(data.get("input_size", 224), source, '"input_size"')
        stages_data = data["stages"]
        if not isinstance(stages_data, list) or len(stages_data) != len(STAGE_NAMES):
            raise AllocationError(
                f'{source}: "stages" has {_count(stages_data)}; expected a list of 4 stages {list(STAGE_NAMES)}'
            )
        stages = []
        for index, (stage, expected_name) in enumerate(zip(stages_data, STAGE_NAMES)):
            where = f"{source}: stages[{index}]"
            if not isinstance(stage, dict):
                raise AllocationError(
                    f"{where}: expected an object with name, planes, side, blocks; got {_kind(stage)}"
                )
            if stage.get("name") != expected_name:
                raise AllocationError(f'{where}: "name" is {stage.get("name")!r}; expected {expected_name!r}')
            where = f"{where} ({expected_name})"
            _check_known_fields(stage, STAGE_FIELDS, where)
            for key in ("planes", "side", "blocks"):
                if key not in stage:
                    raise AllocationError(f'{where}: missing field "{key}"')
            planes = _check_positive_int(stage["planes"], where, '"planes"')
            side = _check_positive_int(stage["side"], where, '"side"')
            blocks = stage["blocks"]
            if not isinstance(blocks, list) or not blocks:
                raise AllocationError(f'{where}: "blocks" is {blocks!r}; expected a non-empty list of [c1, c2, c4, c7]')
            widths = tuple(
                _check_widths(w, f"{where} blocks[{b}] (block {expected_name}.{b})") for b, w in enumerate(blocks)
            )
            stages.append(StageAllocation(expected_name, planes, side, widths))
        _check_halving_sides(stages, [f"stages[{i}] ({stage.name})" for i, stage in enumerate(stages)], source)
        allocation = cls(
            name=data["name"],
            stem_channels=stem_channels,
            stages=tuple(stages),
            provenance=dict(data.get("provenance") or {}),
            input_size=input_size,
            source=source,
        )
        _check_buildable(allocation, source)
        if "depth" in data and data["depth"] != allocation.depth:
            raise AllocationError(
                f'{source}: "depth" is {data["depth"]!r} but the stages have {allocation.num_blocks} blocks, '
                f"i.e. depth {allocation.depth} (3 x blocks + 2); expected them to agree"
            )
        return allocation

    # ------------------------------------------------------------------ published row format
    def to_rows(self):
        """The published row format: one [c1, c2, c4, c7, side] row per block."""
        return [list(widths) + [stage.side] for stage in self.stages for widths in stage.blocks]

    @classmethod
    def from_rows(cls, rows, name: str, source: str = "<rows>") -> "Allocation":
        """Parse the published row format (depth 50/101/152; ResNet stem and widths)."""
        if not isinstance(rows, list):
            raise AllocationError(f"{source}: expected a JSON list of [c1, c2, c4, c7, side] rows, got {_kind(rows)}")
        if len(rows) not in PUBLISHED_LAYOUTS:
            known = [f"{n} (depth {d})" for n, (d, _) in PUBLISHED_LAYOUTS.items()]
            raise AllocationError(
                f"{source}: {len(rows)} rows; the published format has {', '.join(known[:-1])} or {known[-1]} rows"
            )
        depth, blocks_per_stage = PUBLISHED_LAYOUTS[len(rows)]
        stages, stage_rows, row_index = [], [], 0
        for stage_name, planes, num_blocks in zip(STAGE_NAMES, PUBLISHED_PLANES, blocks_per_stage):
            widths, sides = [], []
            for b in range(num_blocks):
                row = rows[row_index]
                row_index += 1
                where = f"{source}: row {row_index} of {len(rows)} (block {stage_name}.{b})"
                if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != len(SCALES) + 1:
                    raise AllocationError(f"{where}: {row!r}; expected [c1, c2, c4, c7, side], 5 integers")
                widths.append(_check_widths(row[: len(SCALES)], where))
                side = _check_positive_int(row[-1], where, "side")
                if sides and side != sides[0]:
                    raise AllocationError(
                        f"{where}: side = {side}; expected {sides[0]}, the side of the stage's first row "
                        f"(every block of {stage_name} has the same feature side)"
                    )
                sides.append(side)
            stages.append(StageAllocation(stage_name, planes, sides[0], tuple(widths)))
            first_row = row_index - num_blocks + 1
            stage_rows.append(f"rows {first_row}-{row_index}" if num_blocks > 1 else f"row {row_index}")
        _check_halving_sides(stages, [f"{rows} ({stage.name})" for rows, stage in zip(stage_rows, stages)], source)
        allocation = cls(
            name=name,
            stem_channels=PUBLISHED_STEM_CHANNELS,
            stages=tuple(stages),
            provenance={"format": "published row format", "file": os.path.basename(source), "depth": depth},
            source=source,
        )
        _check_buildable(allocation, source)
        return allocation


TOP_LEVEL_FIELDS = (
    "format",
    "version",
    "name",
    "depth",
    "scales",
    "stem_channels",
    "input_size",
    "stages",
    "provenance",
)
STAGE_FIELDS = ("name", "planes", "side", "blocks")
# Beyond this a network is a typo, not an experiment: 2e9 parameters are 8 GB of float32 weights
# before gradients and optimizer state.
MAX_PARAMETERS = 2_000_000_000


def _check_known_fields(data: dict, known: Sequence[str], where: str) -> None:
    """A misspelt field is an error naming the closest known one (it would otherwise be ignored)."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise AllocationError(f'{where}: unknown field "{key}"{hint} (known fields: {", ".join(known)})')


def parameter_count(allocation: "Allocation") -> int:
    """Weights of the network's convs (BN and classifier left out), from the widths alone:
    cheap enough to check before anything is allocated."""
    total = 3 * allocation.stem_channels * 49
    in_channels = allocation.stem_channels
    for stage in allocation.stages:
        for b, widths in enumerate(stage.blocks):
            total += in_channels * stage.planes  # conv1
            total += sum(stage.planes * w * 9 for w in widths)  # conv2 branches (at most 3x3)
            total += sum(widths) * 4 * stage.planes  # conv3
            if b == 0:
                total += in_channels * 4 * stage.planes  # shortcut
            in_channels = 4 * stage.planes
    return total


def _check_buildable(allocation: "Allocation", source: str) -> None:
    count = parameter_count(allocation)
    if count > MAX_PARAMETERS:
        widest = max((max(w), stage.name) for stage in allocation.stages for w in stage.blocks)
        raise AllocationError(
            f"{source}: this network would have about {count / 1e9:.0f} billion conv weights "
            f"({count * 4 / 2**30:.0f} GiB in float32; widest branch {widest[0]} in {widest[1]}, planes up to "
            f"{max(s.planes for s in allocation.stages)}); expected at most {MAX_PARAMETERS / 1e9:.0f} billion. "
            "Is a width or planes value mistyped?"
        )


def _check_halving_sides(stages: Sequence[StageAllocation], labels: Sequence[str], source: str) -> None:
    """Each stage's side is half the previous one's (rounded down, as its 2x2 max-pool): the sides
    fix the branch kernels, so sides in another order would build another network."""
    for index in range(1, len(stages)):
        expected = stages[index - 1].side // 2
        if stages[index].side != expected:
            raise AllocationError(
                f"{source}: {labels[index]}: side {stages[index].side}; expected {expected}, half the side "
                f"{stages[index - 1].side} of {labels[index - 1]} (each stage halves the feature map with a 2x2 "
                "max-pool: 56, 28, 14, 7 at a 224x224 input)"
            )


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _count(value) -> str:
    return f"{len(value)} entries" if isinstance(value, list) else _kind(value)


def _read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AllocationError(f"allocation file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AllocationError(f"allocation file {str(path)!r} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AllocationError(f"{path}: not valid JSON ({e}); expected an allocation file") from None


SEED_PREFIX = "seed:"


def _seed_from_name(text: str) -> Allocation:
    """ "seed:<base>" or "seed:<base>@<multiplier>": the over-complete seed of data-driven neuron
    allocation (neuron_allocation.pruning.seed_allocation), e.g. "seed:50" (ResNet-50 layout, every
    scale at the stage's ResNet width), "seed:101@1.5", "seed:scalenet_tiny"."""
    from ..neuron_allocation.pruning import NeuronAllocationError, seed_allocation  # builds on this module

    base, _, multiplier = text[len(SEED_PREFIX) :].partition("@")
    expected = 'expected "seed:<depth or allocation>" or "seed:<depth or allocation>@<multiplier>", e.g. "seed:50@1"'
    try:
        value = float(multiplier) if multiplier else 1.0
    except ValueError:
        raise AllocationError(f"allocation {text!r}: multiplier {multiplier!r} is not a number; {expected}") from None
    if not base:
        raise AllocationError(f"allocation {text!r}: no base; {expected}")
    try:
        return seed_allocation(base, value)
    except NeuronAllocationError as e:
        raise AllocationError(f"allocation {text!r}: {e}") from None


def load_allocation(name_or_path: Union[str, os.PathLike, Allocation]) -> Allocation:
    """A bundled allocation by name, or an allocation file (project or published row format).

    An argument that names no bundled allocation is a path when it looks like one (has a
    directory part or ends in .json) or when the file exists. "seed:<base>[@<multiplier>]"
    names an over-complete seed (see `_seed_from_name`).
    """
    if isinstance(name_or_path, Allocation):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise AllocationError(f"allocation {name_or_path!r}: expected a bundled name or a file path")
    text = os.fspath(name_or_path)
    if text.startswith(SEED_PREFIX):
        return _seed_from_name(text)
    if text in BUNDLED_ALLOCATIONS:
        path = BUNDLED_DIR / f"{text}.json"
        return Allocation.from_dict(_read_json(path), source=str(path))
    path = Path(text).expanduser()
    looks_like_path = os.sep in text or "/" in text or text.endswith(".json") or path.exists()
    if not looks_like_path:
        raise AllocationError(
            f"unknown allocation {text!r}: not a bundled allocation (known: {', '.join(BUNDLED_ALLOCATIONS)}) "
            f"and not a file; give a path ending in .json for an allocation file"
        )
    data = _read_json(path)
    if isinstance(data, list):
        return Allocation.from_rows(data, name=path.stem, source=str(path))
    if isinstance(data, dict):
        return Allocation.from_dict(data, source=str(path))
    raise AllocationError(
        f"{path}: got {_kind(data)}; expected a JSON list of [c1, c2, c4, c7, side] rows (published format) "
        f'or an object with "format": "{FORMAT_NAME}" (project format)'
    )
