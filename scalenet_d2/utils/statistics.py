"""Mean, spread and the difference between two arms of runs (e.g. ScaleNet-50 and its ResNet
twin over seeds), with a 95% confidence interval: paired by seed where both arms ran the same
seeds, else Welch's t (unequal variances). COCO box AP moves by about 0.2-0.3 between
identical runs, so one run per arm cannot tell small differences apart."""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from scipy import stats

__all__ = ["Summary", "Difference", "finite_values", "summarize", "t_interval", "difference"]

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    mean: float
    sd: Optional[float]  # sample standard deviation; None for one run
    n: int


@dataclass(frozen=True)
class Difference:
    """first arm minus second: mean difference, its 95% interval and how it was computed."""

    mean: float
    low: float
    high: float
    method: str  # "paired t (n seeds)" or "Welch t"
    df: float

    @property
    def includes_zero(self) -> bool:
        return self.low <= 0 <= self.high

    @property
    def spread_observed(self) -> bool:
        """False where every run of both arms gave the same value (or every pair the same
        difference): the t interval then has width 0, which says nothing about another run."""
        return self.low < self.high


def finite_values(values: Sequence[Optional[float]]) -> Tuple[List[float], int]:
    """(the finite values, how many others there were): None is a metric that was not recorded;
    NaN or inf one that could not be computed (detectron2 writes AP as NaN where a dataset has no
    objects of a size, mask AP where there is no detection), which no mean may absorb."""
    present = [float(v) for v in values if v is not None]
    kept = [v for v in present if math.isfinite(v)]
    return kept, len(present) - len(kept)


def summarize(values: Sequence[Optional[float]]) -> Optional[Summary]:
    """Mean, sample standard deviation and n of the finite values; None where there is none."""
    values, _ = finite_values(values)
    if not values:
        return None
    mean = math.fsum(values) / len(values)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return Summary(mean, sd, len(values))


def t_interval(summary: Summary) -> tuple:
    """The 95% interval of an arm's mean (at least 2 values)."""
    return _interval(summary.mean, summary.sd / math.sqrt(summary.n), summary.n - 1)


def _interval(mean: float, se: float, df: float) -> tuple:
    if se == 0:
        return mean, mean
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, df) * se
    return mean - half, mean + half


def difference(first: Dict[int, float], second: Dict[int, float], paired: bool) -> Optional[Difference]:
    """The difference of two arms' means, each given as {seed or run index: value}, over their
    finite values; paired by seed where `paired`, over the seeds both arms have a finite value for.
    None where an arm (or the pairs) has fewer than 2 finite values: no spread is known then."""
    a = {k: float(v) for k, v in first.items() if v is not None and math.isfinite(float(v))}
    b = {k: float(v) for k, v in second.items() if v is not None and math.isfinite(float(v))}
    if paired:
        seeds = sorted(a.keys() & b.keys())
        if len(seeds) < 2:
            return None
        deltas = summarize([a[k] - b[k] for k in seeds])
        low, high = _interval(deltas.mean, deltas.sd / math.sqrt(deltas.n), deltas.n - 1)
        return Difference(deltas.mean, low, high, f"paired t ({deltas.n} seeds)", deltas.n - 1)
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = summarize(list(a.values())), summarize(list(b.values()))
    va, vb = sa.sd**2 / sa.n, sb.sd**2 / sb.n
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1)) if se > 0 else float(sa.n + sb.n - 2)
    low, high = _interval(sa.mean - sb.mean, se, df)
    return Difference(sa.mean - sb.mean, low, high, "Welch t", df)
