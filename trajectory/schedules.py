"""Recording schedules: which optimizer steps get their parameters stored.

A schedule answers ``step in schedule`` for the state after ``step`` updates (step 0 is the
initial state). Long runs stay small with :class:`Windows` (dense early, sparse later) or
:class:`Pairs` (steps t and t+1 at chosen t, so every analysed pair is one exact SGD update).

Every schedule has a JSON description (stored in the archive) and a short text form for the
CLI, parsed by :func:`parse_schedule`::

    every            every step
    every:10         steps 0, 10, 20, ...
    steps:0,5,100    exactly these steps
    pairs:0,100,1000 steps 0,1, 100,101, 1000,1001
    pairs-every:500  steps 0,1, 500,501, 1000,1001, ...
    window:0-1000:1,1000-:100   every step in [0, 1000), then every 100th
    a+b              union of two schedules (e.g. "every:100+pairs:55")
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Sequence

__all__ = ["Schedule", "Every", "Steps", "Pairs", "Windows", "Union", "parse_schedule", "schedule_from_dict"]


class Schedule(ABC):
    """Which steps to record. Subclasses implement ``__contains__`` and ``to_dict``."""

    @abstractmethod
    def __contains__(self, step: object) -> bool: ...

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    def __or__(self, other: "Schedule") -> "Schedule":
        return Union([self, other])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    def steps_until(self, n_steps: int) -> list[int]:
        """Scheduled states of a run of ``n_steps`` updates (states 0 to n_steps inclusive)."""
        return [s for s in range(n_steps + 1) if s in self]


class Every(Schedule):
    """Every ``k``-th step from ``start`` (``Every()`` records every step)."""

    def __init__(self, k: int = 1, start: int = 0):
        if k < 1:
            raise ValueError(f"Every(k) needs k >= 1, got {k}")
        self.k, self.start = int(k), int(start)

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and step >= self.start and (step - self.start) % self.k == 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "every", "k": self.k, "start": self.start}


class Steps(Schedule):
    """Exactly the listed steps."""

    def __init__(self, steps: Iterable[int]):
        self.steps = sorted({int(s) for s in steps})
        self._set = set(self.steps)

    def __contains__(self, step: object) -> bool:
        return step in self._set

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "steps", "steps": self.steps}


class Pairs(Schedule):
    """Sparse pairs: steps t and t+1 for each chosen t, so each pair is one exact SGD update.

    Give the ``at`` list, or a ``period`` (t = offset, offset+period, ...), or both.
    """

    def __init__(self, at: Iterable[int] = (), period: int | None = None, offset: int = 0):
        self.at = sorted({int(t) for t in at})
        if period is not None and period < 2:
            raise ValueError("Pairs(period) needs period >= 2 (period 1 is Every())")
        self.period, self.offset = period, int(offset)
        self._set = set(self.at) | {t + 1 for t in self.at}

    def _periodic(self, step: int) -> bool:
        if self.period is None:
            return False
        r = (step - self.offset) % self.period
        return step >= self.offset and (r == 0 or (r == 1 and step > self.offset))

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and (step in self._set or self._periodic(step))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "pairs", "at": self.at, "period": self.period, "offset": self.offset}


class Windows(Schedule):
    """Piecewise ``Every``: a list of (start, stop, every); stop None means open-ended."""

    def __init__(self, windows: Sequence[tuple[int, int | None, int]]):
        self.windows = [(int(a), None if b is None else int(b), int(k)) for a, b, k in windows]
        for a, b, k in self.windows:
            if k < 1 or (b is not None and b <= a):
                raise ValueError(f"bad window ({a}, {b}, {k}): need start < stop and every >= 1")

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):
            return False
        return any(step >= a and (b is None or step < b) and (step - a) % k == 0 for a, b, k in self.windows)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "windows", "windows": [list(w) for w in self.windows]}


class Union(Schedule):
    """Steps in any of the member schedules."""

    def __init__(self, members: Iterable[Schedule]):
        self.members = list(members)

    def __contains__(self, step: object) -> bool:
        return any(step in m for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "union", "members": [m.to_dict() for m in self.members]}


def schedule_from_dict(d: dict[str, Any]) -> Schedule:
    kind = d.get("kind")
    if kind == "every":
        return Every(d.get("k", 1), d.get("start", 0))
    if kind == "steps":
        return Steps(d["steps"])
    if kind == "pairs":
        return Pairs(d.get("at", ()), d.get("period"), d.get("offset", 0))
    if kind == "windows":
        return Windows([tuple(w) for w in d["windows"]])
    if kind == "union":
        return Union(schedule_from_dict(m) for m in d["members"])
    raise ValueError(f"unknown schedule kind {kind!r}")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_schedule(text: str) -> Schedule:
    """Parse the CLI text form (see the module docstring); raises ValueError with the accepted forms."""
    text = text.strip()
    try:
        if "+" in text:
            return Union(parse_schedule(part) for part in text.split("+"))
        kind, _, arg = text.partition(":")
        if kind == "every":
            return Every(int(arg) if arg else 1)
        if kind == "steps":
            return Steps(_ints(arg))
        if kind == "pairs":
            return Pairs(_ints(arg))
        if kind == "pairs-every":
            period, _, offset = arg.partition("@")
            return Pairs(period=int(period), offset=int(offset or 0))
        if kind == "window":
            windows = []
            for part in arg.split(","):
                span, _, every = part.partition(":")
                a, _, b = span.partition("-")
                windows.append((int(a), int(b) if b else None, int(every or 1)))
            return Windows(windows)
    except ValueError as err:
        raise ValueError(f"bad schedule {text!r}: {err}") from None
    raise ValueError(
        f"bad schedule {text!r}; use every, every:K, steps:A,B, pairs:T1,T2, pairs-every:P[@OFFSET], "
        "window:A-B:K,B-:K2, or a union joined by '+'"
    )
