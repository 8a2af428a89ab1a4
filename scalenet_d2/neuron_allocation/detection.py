"""Seed detectors: the over-complete seed trained on the detection task itself, with the
network-slimming L1 penalty on its SA branch norms' scales (MODEL.SCALENET.GAMMA_L1).

The penalty is the one of tools/train_classifier.py --gamma-l1 (loss + GAMMA_L1 x sum |gamma|
over the SA branch norms). train_net.py applies it as its gradient, GAMMA_L1 x sign(gamma),
added just before each optimizer step (after DDP's all-reduce and AMP's unscaling), so that
detectron2's training loop and loss dict stay as they are.
"""

import re
from typing import List, Tuple

import torch
from detectron2.engine import HookBase

__all__ = [
    "GAMMA_NEAR_ZERO",
    "sa_gamma_parameters",
    "gamma_l1_config_problem",
    "add_gamma_l1",
    "seed_optimizer_params",
    "SGDWithGammaL1",
    "gamma_sparsity",
    "GammaSparsity",
]

# |gamma| below this counts as near zero in the metrics: a neuron the allocation will likely drop
GAMMA_NEAR_ZERO = 1e-2

_SA_NORM = re.compile(r"(^|\.)res[2-5]\.\d+\.bn2\.\d+$")


def _sa_norms(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if _SA_NORM.search(n)]


def sa_gamma_parameters(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable SA branch norm scale of the model's ScaleNet
    (res2..res5, `bn2.<branch>.weight`); none with FrozenBN, whose scales are buffers."""
    return [
        (f"{n}.weight", m.weight)
        for n, m in _sa_norms(model)
        if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.requires_grad
    ]


def gamma_l1_config_problem(cfg):
    """Why MODEL.SCALENET.GAMMA_L1 cannot work with this config, naming the keys; None if it can."""
    weight = cfg.MODEL.SCALENET.GAMMA_L1
    if weight == 0:
        return None
    if not weight > 0:
        return f"MODEL.SCALENET.GAMMA_L1 {weight}: expected 0 (off) or a small positive number, e.g. 1e-4"
    if "scalenet" not in cfg.MODEL.BACKBONE.NAME:
        return (
            f"MODEL.SCALENET.GAMMA_L1 {weight} penalises the SA branch norms of a ScaleNet, but MODEL.BACKBONE.NAME is "
            f"{cfg.MODEL.BACKBONE.NAME}; expected a ScaleNet backbone (e.g. build_scalenet_fpn_backbone)"
        )
    if cfg.MODEL.SCALENET.NORM == "FrozenBN":
        return (
            f"MODEL.SCALENET.GAMMA_L1 {weight} needs norm scales that train, but MODEL.SCALENET.NORM is FrozenBN (its "
            "scales never move); expected BN, SyncBN or GN"
        )
    if cfg.MODEL.BACKBONE.FREEZE_AT >= 2:
        return (
            f"MODEL.SCALENET.GAMMA_L1 {weight} needs every SA layer to train, but MODEL.BACKBONE.FREEZE_AT "
            f"{cfg.MODEL.BACKBONE.FREEZE_AT} freezes res2..res{cfg.MODEL.BACKBONE.FREEZE_AT}; expected 0 or 1"
        )
    return None


def _trainable_sa_gammas(model: torch.nn.Module, weight: float, key: str) -> List[torch.nn.Parameter]:
    named = sa_gamma_parameters(model)
    trainable = {n for n, _ in named}
    frozen = [f"{n}.weight" for n, _ in _sa_norms(model) if f"{n}.weight" not in trainable]
    if not named or frozen:
        raise ValueError(
            f"{key} {weight}: the model has {len(named)} trainable SA branch norm scales"
            + (f" and {len(frozen)} frozen ones (first: {frozen[0]})" if frozen else "")
            + "; expected every SA scale (res2..res5 bn2.<branch>.weight) to be a trainable parameter"
        )
    return [p for _, p in named]


@torch.no_grad()
def _add_l1_gradient(params, weight: float) -> None:
    """The gradient of weight x sum |p|: weight x sign(p), added to each p's gradient."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.add_(torch.sign(p), alpha=weight)


def add_gamma_l1(optimizer: torch.optim.Optimizer, model: torch.nn.Module, weight: float):
    """Adds the L1 penalty's gradient, weight x sign(gamma), to the SA scales' gradients before
    every optimizer step (train_net.py's MODEL.SCALENET.GAMMA_L1). Returns the torch hook handle."""
    params = _trainable_sa_gammas(model, weight, "MODEL.SCALENET.GAMMA_L1")
    return optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: _add_l1_gradient(params, weight))


def seed_optimizer_params(model: torch.nn.Module, gamma_l1: float, **kwargs) -> List[dict]:
    """LazyConfigs' optimizer params (for `SGDWithGammaL1`): detectron2's
    get_default_optimizer_params(model, **kwargs), with the SA branch norms' scales in groups of
    their own that carry "gamma_l1"."""
    from detectron2.solver import get_default_optimizer_params

    sa = {id(p) for p in _trainable_sa_gammas(model, gamma_l1, "optimizer.params.gamma_l1")}
    groups = []
    for group in get_default_optimizer_params(model, **kwargs):
        for penalised in (False, True):
            params = [p for p in group["params"] if (id(p) in sa) == penalised]
            if params:
                groups.append(dict(group, params=params, **({"gamma_l1": gamma_l1} if penalised else {})))
    return groups


class SGDWithGammaL1(torch.optim.SGD):
    """torch's SGD that first adds gamma_l1 x sign(p) to the gradients of the param groups that
    carry "gamma_l1" (`seed_optimizer_params`): the L1 penalty of seed training, for LazyConfigs."""

    def step(self, closure=None):
        for group in self.param_groups:
            if group.get("gamma_l1"):
                _add_l1_gradient(group["params"], group["gamma_l1"])
        return super().step(closure)


@torch.no_grad()
def gamma_sparsity(model: torch.nn.Module) -> Tuple[float, float]:
    """(mean |gamma|, share of |gamma| < GAMMA_NEAR_ZERO) over the SA branch norm scales."""
    gammas = torch.cat([p.detach().abs().flatten().float() for _, p in sa_gamma_parameters(model)])
    return float(gammas.mean()), float((gammas < GAMMA_NEAR_ZERO).float().mean())


class GammaSparsity(HookBase):
    """Writes the SA scales' mean |gamma| and near-zero share to the metrics (metrics.json,
    TensorBoard) every `period` iterations and at the last one: sparsity visible while training."""

    def __init__(self, model: torch.nn.Module, period: int):
        self._model = model
        self._period = period

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self._period == 0 or next_iter == self.trainer.max_iter:
            mean, near_zero = gamma_sparsity(self._model)
            self.trainer.storage.put_scalars(sa_gamma_abs_mean=mean, sa_gamma_near_zero=near_zero, smoothing_hint=False)
