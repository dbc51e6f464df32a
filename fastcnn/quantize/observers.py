"""Activation range observers: from the values a tensor takes on the calibration data to the
(scale, zero point) of its uint8 form.

Calibration runs twice over the batches: the first pass records each tensor's min and max (all
that "minmax" needs), the second fills fixed-range histograms of its positive and negative
values (2048 bins each side), from which
  - "percentile" clips each side at the given percentile of all values (default 99.99),
  - "entropy" picks each side's clipping threshold that minimizes the KL divergence between the
    clipped histogram and its quantized version (TensorRT's calibrator; also "histogram").
"""

from __future__ import annotations

import numpy as np
import torch

from fastcnn.nn.quantized import QParams

OBSERVERS = ("minmax", "percentile", "entropy", "histogram")
BINS = 2048


def qparams_for_range(lo: float, hi: float) -> QParams:
    """uint8 asymmetric qparams covering [lo, hi] (widened to include 0, so that real zero,
    padding and ReLU's floor, is exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0 or not np.isfinite(hi - lo):
        return QParams(1.0, 0)
    scale = (hi - lo) / 255.0
    zero_point = int(np.clip(round(-lo / scale), 0, 255))
    return QParams(scale, zero_point)


def _finite(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t's finite values, how many were not): t itself when all are (one reduction)."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return t, 0
    kept = t[finite]
    return kept, t.numel() - kept.numel()


class Observer:
    """Range statistics of one tensor over the calibration batches."""

    def __init__(self, kind: str = "percentile", percentile: float = 99.99):
        if kind not in OBSERVERS:
            raise ValueError(f"unknown observer {kind!r}; choose from {', '.join(OBSERVERS)}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.kind, self.percentile = kind, percentile
        self.lo, self.hi = float("inf"), float("-inf")
        self.count = 0
        self.nonfinite = 0  # NaN and +-Inf values seen in pass 1: ignored, and warned of
        self.pos = np.zeros(BINS)
        self.neg = np.zeros(BINS)

    @property
    def needs_histogram(self) -> bool:
        return self.kind != "minmax"

    def observe_range(self, t: torch.Tensor) -> None:
        """Pass 1: min and max of the finite values (a NaN or Inf would make the range
        meaningless: counted in `nonfinite` instead)."""
        t, dropped = _finite(t.detach().float())
        self.nonfinite += dropped
        if t.numel():
            lo, hi = torch.aminmax(t)
            self.lo, self.hi = min(self.lo, lo.item()), max(self.hi, hi.item())

    def observe_histogram(self, t: torch.Tensor) -> None:
        """Pass 2: histograms of the finite values over [0, max] and [0, -min] (ranges fixed
        by pass 1)."""
        t, _ = _finite(t.detach().float().flatten())
        self.count += t.numel()
        if self.hi > 0:
            self.pos += torch.histc(t[t > 0], BINS, 0, self.hi).cpu().double().numpy()
        if self.lo < 0:
            self.neg += torch.histc(-t[t < 0], BINS, 0, -self.lo).cpu().double().numpy()

    def qparams(self) -> QParams:
        if self.lo > self.hi:  # never observed
            return QParams(1.0, 0)
        if self.kind == "minmax" or self.count == 0:
            return qparams_for_range(self.lo, self.hi)
        two_sided = self.lo < 0 < self.hi
        hi = self._clip(self.pos, self.hi, two_sided) if self.hi > 0 else 0.0
        lo = -self._clip(self.neg, -self.lo, two_sided) if self.lo < 0 else 0.0
        return qparams_for_range(lo, hi)

    def _clip(self, hist: np.ndarray, top: float, two_sided: bool) -> float:
        if self.kind == "percentile":
            return _percentile_threshold(hist, top, self.count, self.percentile)
        return _entropy_threshold(hist, top, levels=128 if two_sided else 255)


def _percentile_threshold(hist: np.ndarray, top: float, count: int, percentile: float) -> float:
    """The smallest bin edge above which at most (100 - percentile)% of all values lie."""
    allowed = count * (100.0 - percentile) / 100.0
    above = np.cumsum(hist[::-1])[::-1]  # above[i]: values in bins i..end
    fits = np.nonzero(above <= allowed)[0]
    first = fits[0] if len(fits) else len(hist)
    return top * first / len(hist) if first > 0 else top / len(hist)


def _entropy_threshold(hist: np.ndarray, top: float, levels: int, step: int = 8) -> float:
    """TensorRT's entropy calibration on one side's histogram: the clipping edge i (in bins)
    minimizing KL(P || Q), P = hist[:i] with the clipped tail added to its last bin and Q
    = hist[:i] merged into `levels` equal groups and spread back over its non-empty bins."""
    n = len(hist)
    if hist.sum() == 0:
        return top
    best_kl, best_i = float("inf"), n
    for i in range(levels, n + 1, step):
        clipped = hist[:i]
        p = clipped.copy()
        p[-1] += hist[i:].sum()  # P: the tail folded into the last bin; Q: from the bins alone
        nonzero = clipped > 0
        sizes = np.full(levels, i // levels)
        sizes[: i % levels] += 1  # np.array_split's groups
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        sums = np.add.reduceat(clipped, starts)
        used = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.repeat(np.divide(sums, used, out=np.zeros(levels), where=used > 0), sizes)
        q = np.where(nonzero, per_bin, 0.0)
        ps, qs = p[nonzero] / p.sum(), q[nonzero] / q.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return top * best_i / n
