"""Parsing of the analyzer's option strings (shared by the CLI and the Python API).

* alphas: ``"0:1:21"`` (start:stop:count, both ends included), ``"-0.5:1.5:41"``, or a list ``"0,0.25,0.5,1"``.
* steps:  ``"all"``; comma-separated items, each ``S`` (the pair leaving step S), ``A:B`` (pairs whose first
  step is in [A, B)), or ``A:B:K`` (every K-th of those pairs); ``A`` or ``B`` may be empty (open).
* spans:  ``"1"`` or ``"1,2,5"`` (positive integers, in records).
* eval:   ``minibatch`` | ``subset:N`` | ``train`` | ``test``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from ..textsafe import safe
from .errors import AnalysisError

__all__ = ["parse_alphas", "parse_steps", "parse_spans", "EvalSpec", "parse_eval", "select_pairs", "pair_spans", "UPDATES",
           "BN_POLICIES", "DTYPES", "LOSSES", "parse_flush_seconds", "MAX_ALPHAS", "DEFAULT_BN_BATCH", "DEFAULT_BN_BATCHES",
           "check_bn_sizes", "bn_seed"]

BN_POLICIES = ("train", "eval", "recompute")
#: BatchNorm batch of ``--bn train`` groups and ``--bn recompute`` batches when --bn-batch is not given: the
#: authors' 100, fixed, so runs trained at different batch sizes are evaluated alike (docs/analysis.md)
DEFAULT_BN_BATCH = 100
#: training batches averaged by ``--bn recompute`` when --bn-batches is not given (measured: docs/analysis.md)
DEFAULT_BN_BATCHES = 32
#: largest --bn-batch / --bn-batches accepted (checked before any allocation)
MAX_BN = 1_000_000
DTYPES = ("float32", "float64")
LOSSES = ("cross_entropy", "mse")

#: Limits checked before anything is allocated (docs/cli.md, "Limits"): an option string longer than
#: MAX_OPTION_CHARS, an --alphas grid of more than MAX_ALPHAS points, more than MAX_SPANS spans or a span above
#: MAX_SPAN records, more than MAX_STEP_ITEMS --steps items, and --eval subset:N above MAX_SUBSET are refused.
MAX_OPTION_CHARS = 100_000
MAX_ALPHAS = 10_001
MAX_SPANS = 1_000
MAX_SPAN = 10_000_000
MAX_STEP_ITEMS = 100_000
MAX_SUBSET = 100_000_000


def _check_length(value: object, flag: str) -> None:
    if isinstance(value, str) and len(value) > MAX_OPTION_CHARS:
        raise AnalysisError(f"{flag} is {len(value)} characters long; the limit is {MAX_OPTION_CHARS}")


def _int(text: str, flag: str, what: str) -> int:
    """An integer option field; digits beyond Python's int-string limit or junk are one error line."""
    try:
        return int(text)
    except ValueError:
        raise AnalysisError(f"{flag} {what} {safe(text, 60)} is not an integer") from None


def parse_flush_seconds(value: float | str) -> float:
    """``--flush-seconds``: a finite number >= 0 (NaN would never flush: every comparison with it is false)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AnalysisError(f"--flush-seconds {safe(value, 60)} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise AnalysisError(f"--flush-seconds {safe(value, 60)}: use a finite number of seconds >= 0")
    return v


def _float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise AnalysisError(f"{what}: {safe(text, 60)} is not a number") from None
    if not math.isfinite(v):
        raise AnalysisError(f"{what}: {safe(text, 60)} is not finite")
    return v


def parse_alphas(value: str | Sequence[float] | None) -> list[float]:
    """Grid of interpolation coefficients a (θ(a) = θ_t + a·(θ_{t+1} − θ_t)), sorted and unique."""
    if value is None:
        return [round(i / 20, 12) for i in range(21)]
    _check_length(value, "--alphas")
    if isinstance(value, str):
        text = value.strip()
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise AnalysisError(f"--alphas {safe(value)}: use start:stop:count (e.g. 0:1:21) or a comma list")
            lo, hi = _float(parts[0], "--alphas"), _float(parts[1], "--alphas")
            n = _int(parts[2], "--alphas", "count")
            if n < 2 or not hi > lo:
                raise AnalysisError(f"--alphas {safe(value)}: need stop > start and count >= 2")
            if n > MAX_ALPHAS:  # before np.linspace allocates n floats
                raise AnalysisError(f"--alphas {safe(value)}: {n} points; the limit is {MAX_ALPHAS}")
            vals = [float(v) for v in np.linspace(lo, hi, n)]
        else:
            items = [p for p in text.split(",") if p.strip()]
            if len(items) > MAX_ALPHAS:
                raise AnalysisError(f"--alphas: {len(items)} points; the limit is {MAX_ALPHAS}")
            vals = [_float(p, "--alphas") for p in items]
    else:
        vals = [float(v) for v in value]
        if len(vals) > MAX_ALPHAS:
            raise AnalysisError(f"--alphas: {len(vals)} points; the limit is {MAX_ALPHAS}")
    vals = sorted({round(v, 12) for v in vals})
    if len(vals) < 2:
        raise AnalysisError("--alphas: need at least two points")
    if any(not math.isfinite(v) for v in vals):
        raise AnalysisError("--alphas: values must be finite")
    return vals


def parse_spans(value: str | int | Sequence[int] | None) -> list[int]:
    if value is None:
        return [1]
    _check_length(value, "--spans")
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        try:
            items = [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise AnalysisError(f"--spans {safe(value)}: expected positive integers such as 1,2,5") from None
    else:
        items = [int(v) for v in value]
    if not items or any(k < 1 for k in items):
        raise AnalysisError(f"--spans {safe(value)}: spans are positive integers (records apart)")
    if len(set(items)) > MAX_SPANS or max(items) > MAX_SPAN:
        raise AnalysisError(f"--spans {safe(value)}: at most {MAX_SPANS} spans, each at most {MAX_SPAN} records")
    return sorted(set(items))


def parse_steps(value: str | Sequence[int] | None) -> list[tuple[int | None, int | None, int]] | list[int] | None:
    """Return None for all pairs, else a list of items: ints (single steps), (start, stop, every) tuples, or
    ``"updates"``: keep only pairs one optimizer step apart (single SGD updates), alone or with other items."""
    if value is None:
        return None
    _check_length(value, "--steps")
    if not isinstance(value, str):
        return [int(v) for v in value]
    text = value.strip()
    if text in ("", "all", ":"):
        return None
    items: list = []
    parts = text.split(",")
    if len(parts) > MAX_STEP_ITEMS:
        raise AnalysisError(f"--steps: {len(parts)} items; the limit is {MAX_STEP_ITEMS} (use A:B or A:B:K ranges)")
    for part in parts:
        part = part.strip()
        if not part:
            continue
        if part == UPDATES:
            items.append(UPDATES)
            continue
        if ":" in part:
            bits = part.split(":")
            if len(bits) > 3:
                raise AnalysisError(f"--steps item {safe(part)}: use S, A:B or A:B:K")
            try:
                a = int(bits[0]) if bits[0].strip() else None
                b = int(bits[1]) if bits[1].strip() else None
                k = int(bits[2]) if len(bits) == 3 and bits[2].strip() else 1
            except ValueError:
                raise AnalysisError(f"--steps item {safe(part)}: bounds must be integers") from None
            if k < 1:
                raise AnalysisError(f"--steps item {safe(part)}: every-K must be >= 1")
            items.append((a, b, k))
        else:
            try:
                items.append(int(part))
            except ValueError:
                raise AnalysisError(f"--steps item {safe(part)}: expected a step number, A:B or A:B:K") from None
    return items


#: ``--steps`` item that keeps only single SGD updates (pairs whose records are one optimizer step apart)
UPDATES = "updates"


def pair_spans(steps: np.ndarray) -> np.ndarray:
    """Optimizer steps covered by each pair (i, i+1): 1 for a single SGD update, more between sparse records."""
    steps = np.asarray(steps)
    return steps[1:] - steps[:-1]


def select_pairs(steps: np.ndarray, spec) -> list[int]:
    """Record indices i of the selected pairs (i, i+1), given the archive's steps and a parsed --steps."""
    n_pairs = len(steps) - 1
    if n_pairs < 1:
        return []
    starts = steps[:-1]
    if spec is None:
        return list(range(n_pairs))
    only_updates = UPDATES in spec
    spec = [item for item in spec if item != UPDATES]
    if not spec:
        spec = [(None, None, 1)]
    chosen: set[int] = set()
    for item in spec:
        if isinstance(item, tuple):
            a, b, k = item
            idx = [i for i in range(n_pairs) if (a is None or starts[i] >= a) and (b is None or starts[i] < b)]
            chosen.update(idx[::k])
        else:
            pos = np.nonzero(starts == item)[0]
            if len(pos) == 0:
                raise AnalysisError(f"--steps: no recorded pair starts at step {item} (steps run {int(steps[0])}..{int(steps[-1])})")
            chosen.add(int(pos[0]))
    if only_updates:
        single = pair_spans(steps) == 1
        chosen = {i for i in chosen if single[i]}
    return sorted(chosen)


@dataclass(frozen=True)
class EvalSpec:
    """Which data the loss is measured on."""

    kind: str  # minibatch | subset | train | test
    n: int = 0
    seed: int = 0

    def __str__(self) -> str:
        return f"subset:{self.n}" if self.kind == "subset" else self.kind

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == "subset":
            d.update(n=self.n, seed=self.seed)
        return d


def parse_eval(value: str | EvalSpec | None, seed: int = 0) -> EvalSpec:
    if isinstance(value, EvalSpec):
        return value
    text = (value or "").strip()
    if text in ("minibatch", "train", "test"):
        return EvalSpec(text)
    if text.startswith("subset:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1 or n > MAX_SUBSET:
            raise AnalysisError(f"--eval {safe(value)}: subset size must be an integer from 1 to {MAX_SUBSET}, e.g. subset:2000")
        return EvalSpec("subset", n, int(seed))
    raise AnalysisError(f"--eval {safe(value)}: expected minibatch, subset:N, train or test")


def check_choice(value: str, choices: Iterable[str], flag: str) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise AnalysisError(f"{flag} {safe(value)}: expected one of {', '.join(choices)}")
    return value


def check_bn_sizes(bn_batch: Any, bn_batches: Any) -> None:
    """--bn-batch must be an integer >= 2 (batch statistics of one sample are undefined), --bn-batches >= 1."""
    for flag, v, lo in (("--bn-batch", bn_batch, 2), ("--bn-batches", bn_batches, 1)):
        if v is None and flag == "--bn-batch":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= MAX_BN:
            raise AnalysisError(f"{flag} {safe(str(v))}: expected an integer from {lo} to {MAX_BN}")


def bn_seed(subset_seed: int) -> int:
    """Seed of the ``--bn train`` grouping permutation (recompute batches use ``subset_seed + 1``)."""
    return int(subset_seed) + 2
