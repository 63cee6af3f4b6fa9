"""sgdwalk: record SGD trajectories during any PyTorch training run and measure the loss landscape along them.

The public API is what this module exports; everything else may change between releases.

Names are loaded on first use (PEP 562 ``__getattr__``), so ``import trajectory`` - and with it
``sgdwalk --help`` - does not import torch, h5py or matplotlib until something needs them.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403  (every sgdwalk exception is public)
from .errors import __all__ as _error_names  # noqa: E402

#: public name -> (module, attribute), imported on first access
_LAZY: dict[str, tuple[str, str]] = {
    "Recorder": (".recorder", "Recorder"),
    "Trajectory": (".archive.reader", "Trajectory"),
    "Pair": (".archive.reader", "Pair"),
    "Layout": (".archive.layout", "Layout"),
    "RecordingBatchSampler": (".samplers", "RecordingBatchSampler"),
    "record_indices": (".samplers", "record_indices"),
    "Schedule": (".schedules", "Schedule"),
    "Every": (".schedules", "Every"),
    "Steps": (".schedules", "Steps"),
    "Pairs": (".schedules", "Pairs"),
    "Windows": (".schedules", "Windows"),
    "Union": (".schedules", "Union"),
    "parse_schedule": (".schedules", "parse_schedule"),
    "build_report": (".report", "build_report"),
    "analyze": (".analysis", "analyze"),
    "Results": (".results_frame", "Results"),
    "adapt": (".adapters", "adapt"),
}
_SUBMODULES = ("landscape", "adapters", "specs", "analysis", "archive", "report", "integrations", "zoo", "training")

__all__ = [
    "__version__",
    "Recorder",
    "Trajectory",
    "Pair",
    "Layout",
    "RecordingBatchSampler",
    "record_indices",
    "Schedule",
    "Every",
    "Steps",
    "Pairs",
    "Windows",
    "Union",
    "parse_schedule",
    "build_report",
    "analyze",
    "Results",
    "adapt",
    *_error_names,
]


def __getattr__(name: str) -> Any:
    """Import a public name (or submodule such as ``trajectory.landscape``) when it is first used."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
