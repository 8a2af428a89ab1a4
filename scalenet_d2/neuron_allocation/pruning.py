"""Data-driven neuron allocation (Li et al., CVPR 2019, sec. 3.2): pruning a trained over-complete
seed ScaleNet into an allocation, built from the paper's description.

The procedure, top to bottom in this file:
1. `seed_allocation`: an over-complete ScaleNet; every SA layer gives each of the 4 scales
   C = round(planes * seed_multiplier) neurons.
2. (tools/train_classifier.py trains it; `sa_gamma_l1` is the optional network-slimming penalty.)
3. `classifier_checkpoint.load_seed_checkpoint`: reads a trained seed and checks that it is one.
4. `NeuronRanking`: importance of an SA output neuron = |gamma| of its branch BN. Neurons are
   ranked per block (never globally) with a documented deterministic tie-break (`TIE_BREAK`).
5. Budget: every block of stage k keeps N_k = ceil(width_multiplier * planes_k) neurons
   (`stage_widths`); or `search_flops_target` finds the multiplier whose FLOPs at 224x224 are
   the largest not above a target. The kept count per scale is the block's allocation.
6. `inherit_weights`: the seed's kept neurons as a classifier state_dict (fine-tuning start).
7. `allocate_from_checkpoint` ties it together and records provenance; `format_summary` and
   `plot_allocation` report it; `scalenet_d2.atomic.write_atomically` writes all outputs or none.

FLOPs are multiply-accumulates of conv and fc layers (the convention of the paper's tables,
ResNet-50 = 4.1 G, and of fvcore), counted analytically by `count_flops`.
"""

import dataclasses
import datetime
import functools
import io
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checkpoint.classifier import SeedCheckpoint, load_seed_checkpoint
from ..checkpoint.published import STANDARD_SIDES, to_d2_key
from ..modeling.allocation import (
    PUBLISHED_LAYOUTS,
    PUBLISHED_PLANES,
    PUBLISHED_STEM_CHANNELS,
    SCALES,
    STAGE_NAMES,
    Allocation,
    StageAllocation,
    branch_kernel_size,
    load_allocation,
)
from ..modeling.classification import ScaleNetClassifier
from ..modeling.scalenet import plain_forward

__all__ = [
    "NeuronAllocationError",
    "SEED_BLOCKS",
    "neuron_costs",
    "TIE_BREAK",
    "seed_allocation",
    "sa_gamma_l1",
    "NeuronRanking",
    "select_block",
    "stage_widths",
    "Selection",
    "select_multiplier",
    "candidate_multipliers",
    "search_flops_target",
    "SCALE_COLOURS",
    "count_flops",
    "count_params",
    "inherit_weights",
    "AllocationResult",
    "allocate_from_checkpoint",
    "format_summary",
    "plot_allocation",
]

SEED_BLOCKS = {depth: blocks for depth, blocks in PUBLISHED_LAYOUTS.values()}  # 50/101/152: blocks per stage
METHOD = "bn-gamma per-block selection"
IMPORTANCE = (
    "|gamma| / cost^cost_exponent, cost = a branch neuron's multiply-adds at the 224x224 input "
    "(planes x kernel^2 x pooled pixels); exponent 0 = |gamma| (the paper)"
)
TIE_BREAK = (
    "per block, neurons sorted by |gamma| descending; equal |gamma| -> smaller scale index "
    "(order 1, 2, 4, 7) first, then smaller channel index first"
)
# ceil(m * planes) reproduces the published stage widths: 1.36 -> 88/175/349/697 (ScaleNet-50),
# 1.332 -> 86/171/341/682 (101), 1.396 -> 90/179/358/715 (152); round() would not.
_CEIL_EPS = 1e-6


class NeuronAllocationError(ValueError):
    """Bad seed checkpoint or budget; the message names the file, field and what was expected."""


# ----------------------------------------------------------------------------- 1. seed network


def seed_allocation(base: Union[int, str, Allocation] = 50, multiplier: float = 1.0) -> Allocation:
    """The over-complete seed: every block of a stage gets [C, C, C, C], C = round(planes * multiplier).

    `base` gives depth, stem, planes and feature sides: a depth in `SEED_BLOCKS` (ResNet widths
    64/128/256/512, stem 64), or an allocation (name, path or object) whose layout is copied,
    e.g. "scalenet_tiny" for tests.
    """
    if isinstance(base, str) and base.isdigit():
        base = int(base)
    if isinstance(base, int):
        if base not in SEED_BLOCKS:
            raise NeuronAllocationError(f"seed depth {base}: expected one of {sorted(SEED_BLOCKS)}")
        layout = list(zip(STAGE_NAMES, PUBLISHED_PLANES, STANDARD_SIDES, SEED_BLOCKS[base]))
        stem, base_name = PUBLISHED_STEM_CHANNELS, f"scalenet{base}"
    else:
        template = base if isinstance(base, Allocation) else load_allocation(base)
        layout = [(st.name, st.planes, st.side, len(st.blocks)) for st in template.stages]
        stem, base_name = template.stem_channels, template.name
    if not (isinstance(multiplier, (int, float)) and math.isfinite(multiplier) and multiplier > 0):
        raise NeuronAllocationError(
            f"seed multiplier {multiplier!r}: expected a number > 0 (1.0 = ResNet width per scale)"
        )
    stages = []
    for name, planes, side, num_blocks in layout:
        c = max(1, int(round(planes * multiplier)))
        stages.append(
            StageAllocation(name=name, planes=planes, side=side, blocks=tuple((c, c, c, c) for _ in range(num_blocks)))
        )
    return Allocation(
        name=f"{base_name}_seed_x{multiplier:g}",
        stem_channels=stem,
        stages=tuple(stages),
        provenance={"method": "over-complete seed", "base": base_name, "seed_multiplier": float(multiplier)},
    )


# ----------------------------------------------------------------------------- 3. seed checkpoint


def sa_gamma_l1(model: torch.nn.Module) -> torch.Tensor:
    """Sum of |gamma| over all SA-branch BNs (`layerK.B.bn2.I`): the optional sparsity penalty
    of network slimming, added to the loss times a small factor during seed training."""
    gammas = [
        p.abs().sum() for name, p in model.named_parameters() if re.search(r"layer\d+\.\d+\.bn2\.\d+\.weight$", name)
    ]
    if not gammas:
        raise NeuronAllocationError("sa_gamma_l1: the model has no SA BN parameters named 'layerK.B.bn2.I.weight'")
    return torch.stack(gammas).sum()


# ----------------------------------------------------------------------------- 4. importance + per-block selection


def neuron_costs(stage: StageAllocation) -> Tuple[int, ...]:
    """Multiply-adds of one output neuron (channel) of each SA branch of a block of `stage` at the
    224x224 input: planes x kernel^2 x the pooled map's pixels (`stage.side` max-pooled by the
    scale, floor, at least 1 pixel)."""
    return tuple(
        stage.planes * branch_kernel_size(stage.side, i) ** 2 * max(1, stage.side // scale) ** 2
        for i, scale in enumerate(SCALES)
    )


def _block_order(
    gammas: Sequence[torch.Tensor], where: str, costs: Sequence[int] = (), cost_exponent: float = 0.0
) -> List[Tuple[int, int]]:
    """(scale index, channel) of a block's neurons, most important first; see TIE_BREAK. The
    importance of a neuron of branch i is |gamma| / costs[i] ** cost_exponent (|gamma| at 0)."""
    entries = []
    for i, g in enumerate(gammas):
        values = g.detach().double().abs().flatten().tolist()
        divisor = float(costs[i]) ** cost_exponent if cost_exponent else 1.0
        for c, v in enumerate(values):
            if not math.isfinite(v):
                raise NeuronAllocationError(f"{where}: bn2.{i}.weight[{c}] is {v}; the seed's BN gammas must be finite")
            entries.append((-v / divisor, i, c))
    entries.sort()  # tuple order = |gamma| desc, scale index asc, channel asc
    return [(i, c) for _, i, c in entries]


def _kept_per_scale(top: Sequence[Tuple[int, int]], num_branches: int) -> Tuple[Tuple[int, ...], ...]:
    """Kept channel indices per scale (ascending) of the (scale index, channel) pairs `top`."""
    kept: List[List[int]] = [[] for _ in range(num_branches)]
    for i, c in top:
        kept[i].append(c)
    return tuple(tuple(sorted(k)) for k in kept)


def select_block(gammas: Sequence[torch.Tensor], keep: int) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, ...], ...]]:
    """Keeps the `keep` neurons with the largest |gamma| of one block.

    `gammas[i]` holds the BN scales of branch i (scale `SCALES[i]`). Returns the kept count per
    scale (the block's allocation row) and the kept channel indices per scale, ascending.
    """
    total = sum(int(g.numel()) for g in gammas)
    if not 1 <= keep <= total:
        raise NeuronAllocationError(f"select_block: keep={keep}; expected 1..{total} (the block's SA neurons)")
    kept = _kept_per_scale(_block_order(gammas, "select_block")[:keep], len(gammas))
    return tuple(len(k) for k in kept), kept


class NeuronRanking:
    """Per-block ranking of a seed's SA neurons by |gamma| / cost^cost_exponent (`neuron_costs`;
    the paper ranks by |gamma|, exponent 0); answers "what does keeping N per block give"."""

    def __init__(
        self,
        allocation: Allocation,
        state_dict: Mapping[str, torch.Tensor],
        source: str = "seed",
        cost_exponent: float = 0.0,
    ):
        if not (isinstance(cost_exponent, (int, float)) and math.isfinite(cost_exponent) and cost_exponent >= 0):
            raise NeuronAllocationError(f"cost exponent {cost_exponent!r}: expected a finite number >= 0 (0: |gamma|)")
        self.allocation = allocation
        self.cost_exponent = float(cost_exponent)
        self.blocks: List[Tuple[int, int]] = []  # (stage index, block index) in network order
        self.orders: List[List[Tuple[int, int]]] = []  # per block: (scale index, channel), most important first
        for s, stage in enumerate(allocation.stages):
            for b, widths in enumerate(stage.blocks):
                prefix = f"layer{s + 1}.{b}"
                gammas = []
                for i, c in enumerate(widths):
                    key = f"{prefix}.bn2.{i}.weight"
                    if c == 0:
                        gammas.append(torch.zeros(0))
                        continue
                    if key not in state_dict or tuple(state_dict[key].shape) != (c,):
                        got = tuple(state_dict[key].shape) if key in state_dict else "missing"
                        raise NeuronAllocationError(
                            f"{source}: '{key}' is {got}; expected shape ({c},) from the allocation"
                        )
                    gammas.append(state_dict[key])
                self.blocks.append((s, b))
                costs = neuron_costs(stage)
                self.orders.append(_block_order(gammas, f"{source} block {prefix}", costs, self.cost_exponent))

    def counts(self, widths_per_stage: Sequence[int]) -> List[Tuple[int, ...]]:
        """Allocation rows (kept count per scale) of every block, keeping N_k per block of stage k."""
        return [tuple(len(k) for k in block) for block in self.kept(widths_per_stage)]

    def kept(self, widths_per_stage: Sequence[int]) -> Tuple[Tuple[Tuple[int, ...], ...], ...]:
        """Kept seed channel indices per scale (ascending) of every block."""
        return tuple(
            _kept_per_scale(order[: widths_per_stage[s]], len(SCALES))
            for (s, _), order in zip(self.blocks, self.orders)
        )

    def allocation_for(
        self, widths_per_stage: Sequence[int], name: str = "allocation", provenance: Optional[dict] = None
    ) -> Allocation:
        rows = iter(self.counts(widths_per_stage))
        stages = tuple(
            StageAllocation(name=st.name, planes=st.planes, side=st.side, blocks=tuple(next(rows) for _ in st.blocks))
            for st in self.allocation.stages
        )
        return Allocation(
            name=name, stem_channels=self.allocation.stem_channels, stages=stages, provenance=dict(provenance or {})
        )


# ----------------------------------------------------------------------------- 5. budget


def _seed_stage_capacity(seed: Allocation) -> List[int]:
    return [min(sum(w) for w in st.blocks) for st in seed.stages]


def stage_widths(seed: Allocation, width_multiplier: float) -> Tuple[int, ...]:
    """N_k = ceil(width_multiplier * planes_k) per stage, checked against what the seed has."""
    m = width_multiplier
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        shown = f"{m:g}" if isinstance(m, (int, float)) else repr(m)
        raise NeuronAllocationError(
            f"width multiplier {shown} keeps nothing: expected a number > 0 (1.0 = ResNet widths like ScaleNet-50-light, "
            "1.36 = ScaleNet-50)"
        )
    caps = _seed_stage_capacity(seed)
    out = []
    for st, cap in zip(seed.stages, caps):
        n = max(1, math.ceil(m * st.planes - _CEIL_EPS))
        if n > cap:
            max_m = min(c / s.planes for c, s in zip(caps, seed.stages))
            raise NeuronAllocationError(
                f"width multiplier {m:g} keeps {n} neurons per {st.name} block (ceil({m:g} x {st.planes})) but the seed "
                f"{seed.name!r} has only {cap} SA neurons per {st.name} block; expected a multiplier <= {max_m:.4g}"
            )
        out.append(n)
    return tuple(out)


@dataclass(frozen=True)
class Selection:
    allocation: Allocation  # rows = kept count per scale (no provenance yet)
    kept: Tuple[Tuple[Tuple[int, ...], ...], ...]  # per block (network order), per scale: kept seed channels
    width_multiplier: float
    stage_widths: Tuple[int, ...]
    flops: int  # at the size it was selected at (224x224 unless a FLOPs size was given), see count_flops
    params: int


def select_multiplier(ranking: NeuronRanking, seed: Allocation, m: float, num_classes: int, image_size) -> Selection:
    """What keeping N_k = ceil(m x planes_k) neurons per block of stage k gives (allocation, kept, cost)."""
    widths = stage_widths(seed, m)
    alloc = ranking.allocation_for(widths)
    return Selection(
        allocation=alloc,
        kept=ranking.kept(widths),
        width_multiplier=float(m),
        stage_widths=widths,
        flops=count_flops(alloc, image_size, num_classes),
        params=count_params(alloc, num_classes),
    )


def candidate_multipliers(seed: Allocation) -> List[float]:
    """Every multiplier at which some stage width N_k changes: the neuron steps j / planes_k."""
    caps = _seed_stage_capacity(seed)
    max_m = min(c / st.planes for c, st in zip(caps, seed.stages))
    cands = {j / st.planes for st, cap in zip(seed.stages, caps) for j in range(1, cap + 1)}
    return sorted(m for m in cands if m <= max_m + 1e-12)


def search_flops_target(
    ranking: NeuronRanking, target_flops: float, num_classes: int = 1000, image_size=224
) -> Tuple[Selection, Optional[Selection]]:
    """The multiplier (all stages scaled together) whose FLOPs are the largest not above `target_flops`.

    Candidates are the neuron steps: multipliers where some stage's N_k changes. Keeping more neurons
    keeps a superset (rankings are fixed), so FLOPs grow with the multiplier and a binary search finds
    the answer. Returns it and the next larger step (None if the answer keeps the whole seed), whose
    FLOPs exceed the target: the result is within one neuron-step.
    """
    seed = ranking.allocation
    cands = candidate_multipliers(seed)
    lowest = select_multiplier(ranking, seed, cands[0], num_classes, image_size)
    if not target_flops >= lowest.flops:
        raise NeuronAllocationError(
            f"FLOPs target {target_flops / 1e9:.4g} G keeps nothing: the smallest network from seed {seed.name!r} "
            f"(one neuron step, width multiplier {cands[0]:.4g}) already has {lowest.flops / 1e9:.4g} G at {_size_text(image_size)}"
        )
    highest = select_multiplier(ranking, seed, cands[-1], num_classes, image_size)
    if target_flops > highest.flops and not math.isclose(target_flops, highest.flops):
        raise NeuronAllocationError(
            f"FLOPs target {target_flops / 1e9:.4g} G is more than seed {seed.name!r} can give: keeping all its SA "
            f"neurons (width multiplier {cands[-1]:.4g}) gives {highest.flops / 1e9:.4g} G at {_size_text(image_size)}; "
            "expected a target <= that, or a wider seed"
        )
    lo, hi = 0, len(cands) - 1  # invariant: flops(cands[lo]) <= target
    best = lowest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        sel = select_multiplier(ranking, seed, cands[mid], num_classes, image_size)
        if sel.flops <= target_flops:
            lo, best = mid, sel
        else:
            hi = mid - 1
    if lo == len(cands) - 1:
        return highest, None
    return best, select_multiplier(ranking, seed, cands[lo + 1], num_classes, image_size)


# ----------------------------------------------------------------------------- cost model


def _hw(image_size) -> Tuple[int, int]:
    """(height, width) of an image size given as a side or as (height, width)."""
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _size_text(image_size) -> str:
    return "x".join(str(v) for v in _hw(image_size))


def _classifier_shapes(allocation: Allocation, num_classes: int) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return ScaleNetClassifier(allocation, num_classes=num_classes)


def count_flops(allocation: Allocation, image_size=224, num_classes: int = 1000) -> int:
    """Multiply-accumulates of all convs and the fc at image_size x image_size, or at (height,
    width) (fvcore's convention): every weight is used once per output position (conv) or per
    sample (fc)."""
    return _scaled(allocation, num_classes, _unit_costs(*_layout(allocation), _hw(image_size))[0])


def count_params(allocation: Allocation, num_classes: int = 1000) -> int:
    """Parameters of ScaleNetClassifier(allocation, num_classes): conv weights, BN gamma+beta, fc."""
    return _scaled(allocation, num_classes, _unit_costs(*_layout(allocation), (224, 224))[1])


# Both are counted per module of the classifier with one neuron at every scale and one class
# (`_unit_costs`: built and run once per layout and input size on the meta device), scaled by the
# widths: an SA branch's conv2.i and bn2.i by its c_i, conv3 by its inputs sum(c), the fc by the
# classes. Nothing else depends on the widths, and output sizes depend only on the layout.
_WIDTH_SCALED = re.compile(r"layer(\d+)\.(\d+)\.(?:(?:conv2|bn2)\.(\d+)|conv3)")


def _layout(allocation: Allocation):
    return allocation.stem_channels, tuple((st.name, st.planes, st.side, len(st.blocks)) for st in allocation.stages)


def _scaled(allocation: Allocation, num_classes: int, unit: Dict[str, int]) -> int:
    total = 0
    for name, cost in unit.items():
        match = _WIDTH_SCALED.fullmatch(name)
        if name == "fc":
            total += cost * num_classes
        elif match is None:
            total += cost
        else:
            block = allocation.stages[int(match.group(1)) - 1].blocks[int(match.group(2))]
            total += cost * (block[int(match.group(3))] if match.group(3) is not None else sum(block))
    return int(total)


@functools.lru_cache(maxsize=64)
def _unit_costs(stem_channels, layout, image_hw) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(multiply-accumulates, parameters) of every module, by name, of the classifier of `layout`
    with one neuron at every scale and one class, per unit of what `_scaled` multiplies by."""
    stages = tuple(
        StageAllocation(name=name, planes=planes, side=side, blocks=((1,) * len(SCALES),) * n)
        for name, planes, side, n in layout
    )
    model = _classifier_shapes(Allocation(name="layout", stem_channels=stem_channels, stages=stages), 1)
    macs, params = {}, {}

    def record(name):
        def hook(module, inputs, output):
            # every weight is used once per output position (conv) or per sample (fc)
            macs[name] = output.numel() // output.shape[1] * module.weight.numel()

        return hook

    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            params[name] = own
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(record(name))
    with torch.no_grad(), plain_forward(model):  # the hooks are on the modules folding bypasses
        model.eval()(torch.empty(1, 3, *image_hw, device="meta"))
    per_input = len(SCALES)  # conv3 of the unit network has one input per scale
    return tuple({n: (c // per_input if n.endswith(".conv3") else c) for n, c in d.items()} for d in (macs, params))


# ----------------------------------------------------------------------------- 6. inherited weights

_SA_PARAM = re.compile(r"^(layer\d+\.\d+)\.(conv2|bn2)\.(\d+)\.(\w+)$")
_CONV3 = re.compile(r"^(layer\d+\.\d+)\.conv3\.weight$")


def inherit_weights(
    state_dict: Mapping[str, torch.Tensor], seed: Allocation, selection: Selection
) -> Dict[str, torch.Tensor]:
    """The seed's weights restricted to the kept SA neurons: a published-layout state_dict for
    ScaleNetClassifier(selection.allocation). conv2/bn2 rows are selected, branches that keep
    nothing are dropped, conv3 keeps the matching input columns; everything else is copied."""
    kept: Dict[str, Tuple[Tuple[int, ...], ...]] = {}
    seed_widths: Dict[str, Tuple[int, ...]] = {}
    n = 0
    for s, st in enumerate(seed.stages):
        for b, w in enumerate(st.blocks):
            kept[f"layer{s + 1}.{b}"] = selection.kept[n]
            seed_widths[f"layer{s + 1}.{b}"] = tuple(w)
            n += 1
    out = {}
    for key, value in state_dict.items():
        m_sa, m_c3 = _SA_PARAM.match(key), _CONV3.match(key)
        if m_sa and m_sa.group(1) in kept:
            block, _, i, field = m_sa.groups()
            idx = kept[block][int(i)]
            if not idx:
                continue  # the branch keeps nothing: pruned, no conv, no BN
            out[key] = value if field == "num_batches_tracked" else value[list(idx)].clone()
        elif m_c3 and m_c3.group(1) in kept:
            block = m_c3.group(1)
            offsets = np.cumsum((0,) + seed_widths[block][:-1])
            cols = [int(offsets[i]) + c for i, idx in enumerate(kept[block]) for c in idx]
            out[key] = value[:, cols].clone()
        else:
            out[key] = value.clone()
    return out


def inherit_detector_weights(seed: SeedCheckpoint, selection: Selection) -> Dict[str, torch.Tensor]:
    """A seed detector's state_dict with its ScaleNet body pruned to the kept SA neurons
    (`inherit_weights`); everything else (FPN, RPN, ROI heads) as in the seed. It loads by exact
    name into the same detector config with MODEL.SCALENET.ALLOCATION set to the new allocation."""
    detector = seed.detector
    body = inherit_weights(seed.state_dict, seed.allocation, selection)
    out = {k: v.clone() for k, v in detector.model.items() if not k.startswith(detector.prefix)}
    out.update({detector.prefix + to_d2_key(k): v for k, v in body.items()})
    return out


# ----------------------------------------------------------------------------- 7. pipeline + reports


@dataclass(frozen=True)
class AllocationResult:
    allocation: Allocation  # with provenance
    selection: Selection
    seed: SeedCheckpoint
    next_step: Optional[Selection] = None  # FLOPs target only: the next larger neuron step


def _size_key(size: Tuple[int, int]) -> str:
    """224 for (224, 224) (the existing provenance keys), else e.g. 800x1344."""
    return "224" if size == (224, 224) else _size_text(size)


def _refuse_untrained(seed) -> None:
    gammas = [v.flatten() for k, v in seed.state_dict.items() if re.fullmatch(r"layer\d\.\d+\.bn2\.\d+\.weight", k)]
    if not gammas:
        return
    values = torch.cat(gammas).float()
    if bool((values == values[0]).all()):
        raise NeuronAllocationError(
            f"seed checkpoint {seed.path}: all {values.numel()} scale-branch BN gammas equal {values[0].item():g}, "
            "as in an untrained network; the allocation would be the tie-break order, not learnt. Expected a "
            "trained seed (tools/train_classifier.py); pass --force to allocate from it anyway"
        )


def allocate_from_checkpoint(
    seed_checkpoint: str,
    width_multiplier: Optional[float] = None,
    target_gflops: Optional[float] = None,
    name: str = "allocation",
    force: bool = False,
    cost_exponent: float = 0.0,
    flops_size: Optional[Tuple[int, int]] = None,
) -> AllocationResult:
    """Seed checkpoint + budget (exactly one of width_multiplier, target_gflops) -> allocation with provenance.

    The seed is a classifier (tools/train_classifier.py) or a seed detector (train_net.py's
    checkpoint). `target_gflops` is counted at 224x224, or at `flops_size` (height, width), e.g.
    a detection input (800, 1344); both count the ImageNet classifier's convs and fc (1000 classes
    for a detector's seed), so budgets compare across seeds.
    A seed whose scale-branch BN gammas are all equal (untrained: BN starts at 1) is refused
    unless `force`: its ranking, hence the allocation, would be the tie-break order only."""
    if (width_multiplier is None) == (target_gflops is None):
        raise NeuronAllocationError("budget: give exactly one of width_multiplier and target_gflops")
    if target_gflops is not None and not (
        isinstance(target_gflops, (int, float)) and math.isfinite(target_gflops) and target_gflops > 0
    ):
        raise NeuronAllocationError(f"FLOPs target {target_gflops!r} GFLOPs keeps nothing: expected a number > 0")
    seed = load_seed_checkpoint(seed_checkpoint)
    if not force:
        _refuse_untrained(seed)
    ranking = NeuronRanking(
        seed.allocation, seed.state_dict, source=f"seed checkpoint {seed.path}", cost_exponent=cost_exponent
    )
    next_step = None
    size = _hw(flops_size or 224)
    if width_multiplier is not None:
        sel = select_multiplier(ranking, seed.allocation, width_multiplier, seed.num_classes, size)
        budget = {"width_multiplier": float(width_multiplier)}
    else:
        sel, next_step = search_flops_target(ranking, target_gflops * 1e9, seed.num_classes, size)
        budget = {
            "target_gflops": float(target_gflops),
            "width_multiplier": sel.width_multiplier,
            f"next_step_flops_{_size_key(size)}": next_step.flops if next_step else None,
        }
    if size != (224, 224):
        budget["flops_size"] = list(size)
        budget[f"flops_{_size_key(size)}"] = sel.flops
    detector = seed.detector
    provenance = {
        "method": METHOD,
        "importance": IMPORTANCE,
        "cost_exponent": ranking.cost_exponent,
        "tie_break": TIE_BREAK,
        "seed_kind": "classification" if detector is None else "detection",
        "seed_checkpoint": os.path.abspath(seed.path),
        "seed_sha256": seed.sha256,
        "seed_allocation": seed.allocation.name,
        "seed_multiplier": seed.meta.get("multiplier"),
        "seed_epoch": seed.epoch,
        "seed_iteration": seed.iteration,
        "budget": budget,
        "stage_widths": list(sel.stage_widths),
        "num_classes": seed.num_classes,
        "params": sel.params,
        "flops_224": count_flops(sel.allocation, 224, seed.num_classes) if size != (224, 224) else sel.flops,
        "flops_convention": "multiply-accumulates of conv and fc layers at 224x224 (fvcore's count)",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if detector is not None:
        provenance["seed_config"] = detector.config
        provenance["seed_datasets"] = detector.datasets
    allocation = dataclasses.replace(sel.allocation, name=name, provenance=provenance)
    return AllocationResult(allocation=allocation, selection=sel, seed=seed, next_step=next_step)


def format_summary(allocation: Allocation, num_classes: int = 1000) -> str:
    """Per-stage text table: kept neurons per scale for every block, stage totals, params and FLOPs."""
    head = "".join(f"{'c' + str(s):>7}" for s in SCALES)
    lines = [f"allocation {allocation.name!r}", f"{'block':<10}{head}{'total':>8}"]
    for s, st in enumerate(allocation.stages):
        for b, w in enumerate(st.blocks):
            lines.append(f"{st.name + '.' + str(b):<10}" + "".join(f"{c:>7}" for c in w) + f"{sum(w):>8}")
        tot = [sum(w[i] for w in st.blocks) for i in range(len(SCALES))]
        share = "  ".join(f"x{sc}: {100 * t / max(1, sum(tot)):.0f}%" for sc, t in zip(SCALES, tot))
        lines.append(f"{st.name + ' sum':<10}" + "".join(f"{t:>7}" for t in tot) + f"{sum(tot):>8}   ({share})")
    lines.append(
        f"params {count_params(allocation, num_classes) / 1e6:.2f} M, "
        f"FLOPs {count_flops(allocation, 224, num_classes) / 1e9:.3f} G (MACs at 224x224)"
    )
    return "\n".join(lines)


SCALE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def plot_allocation(allocation: Allocation, title: Optional[str] = None, others: Sequence[Allocation] = ()) -> bytes:
    """PNG bytes: stacked bars of neurons per scale for every block (the paper's allocation figure),
    above the same as shares of each block, which keeps the narrow early stages readable.

    With `others` (allocations of the same blocks, e.g. an ImageNet one beside a detection one),
    each block gets one bar per allocation, side by side, the first plain, the others hatched."""
    # Figure + Agg canvas directly: no global matplotlib backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    allocations = [allocation, *others]
    for other in others:
        if other.blocks_per_stage != allocation.blocks_per_stage:
            raise NeuronAllocationError(
                f"chart: allocation {other.name!r} has blocks {other.blocks_per_stage}, {allocation.name!r} has "
                f"{allocation.blocks_per_stage}; expected allocations of the same blocks side by side"
            )
    labels = [f"{st.name}.{b}" for st in allocation.stages for b in range(len(st.blocks))]
    fig = Figure(figsize=(max(6.0, 0.28 * len(labels) * len(allocations) + 2.5), 6.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 2)})
    x = np.arange(len(labels))
    width = 0.8 / len(allocations)
    top = 0.0
    for n, alloc in enumerate(allocations):
        rows = np.array([w for st in alloc.stages for w in st.blocks], dtype=float).reshape(-1, len(SCALES))
        shares = 100 * rows / rows.sum(axis=1, keepdims=True)
        offset = (n - (len(allocations) - 1) / 2) * width
        hatch = None if n == 0 else "//"
        for ax, values in ((axes[0], rows), (axes[1], shares)):
            bottom = np.zeros(len(labels))
            for i, scale in enumerate(SCALES):
                used = n == 0 and values[:, i].any()  # a scale pruned from every block gets no legend entry
                ax.bar(
                    x + offset,
                    values[:, i],
                    bottom=bottom,
                    color=SCALE_COLOURS[i],
                    width=width,
                    hatch=hatch,
                    edgecolor="white" if hatch else None,
                    label=f"scale {scale}" if used else "_",
                )
                bottom += values[:, i]
            if ax is axes[0]:
                top = max(top, bottom.max())
        if others:  # which bar is which
            axes[0].bar(
                [0], [0], color="lightgrey", hatch=hatch, edgecolor="white" if hatch else None, label=alloc.name
            )
    axes[0].set_ylabel("neurons (output channels)", fontsize=8)
    axes[1].set_ylabel("share of the block (%)", fontsize=8)
    axes[0].set_ylim(0, top * 1.1)
    axes[1].set_ylim(0, 100)
    for ax in axes:
        start = 0
        for st in allocation.stages:
            if start:
                ax.axvline(start - 0.5, color="grey", linestyle="--", linewidth=0.8)
            if ax is axes[0]:
                ax.text(start + (len(st.blocks) - 1) / 2, top * 1.02, st.name, ha="center", va="bottom", fontsize=8)
            start += len(st.blocks)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, rotation=90, fontsize=7)
    axes[1].set_xlim(-0.6, len(labels) - 0.4)
    names = " vs ".join(a.name for a in allocations)
    axes[0].set_title(title or f"{names}: neurons per scale in every SA layer", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
