"""Paired standard errors of mean losses, from per-unit losses evaluated on the same units at every point.

Why paired: every point of an analysis is evaluated on the same samples (and, under ``--bn train``, the same
BatchNorm groups): common random numbers. The sampling error of the *difference* of two mean losses (a height,
a barrier) is then the spread of the per-unit differences, far smaller than the two marginal errors combined,
because most of a sample's loss is shared by nearby points.

Units are what :meth:`~trajectory.analysis.evaluator.Evaluator.evaluate` returns with ``units=True``: samples
(independent draws of the evaluation subset), or under ``--bn train`` BatchNorm groups (the samples of one group
share its batch statistics, so they are not independent; the group means are). With U units u_1..u_U:

* se of a mean loss        = sd(u) / sqrt(U)               (sd with ddof=1)
* se of a difference L1−L2 = sd(u1 − u2) / sqrt(U)

U < 2 (one BatchNorm group, e.g. ``--eval minibatch`` under ``--bn train``) gives NaN: no estimate.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["mean_se", "diff_se"]


def mean_se(u: np.ndarray) -> np.ndarray | float:
    """Standard error of the mean over the last axis of per-unit losses ``u`` (NaN for fewer than 2 units)."""
    u = np.asarray(u, dtype=np.float64)
    n = u.shape[-1]
    if n < 2:
        return np.full(u.shape[:-1], np.nan) if u.ndim > 1 else float("nan")
    out = u.std(axis=-1, ddof=1) / math.sqrt(n)
    return out if u.ndim > 1 else float(out)


def diff_se(u1: np.ndarray, u2: np.ndarray) -> np.ndarray | float:
    """Paired standard error of mean(u1) − mean(u2): the same units at both points (last axis)."""
    return mean_se(np.asarray(u1, dtype=np.float64) - np.asarray(u2, dtype=np.float64))
