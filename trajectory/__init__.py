"""sgdwalk: record SGD trajectories during any PyTorch training run and measure the loss landscape along them.

The public API is what this module exports; everything else may change between releases.
"""
__version__ = "0.1.0"

from .archive.layout import Layout  # noqa: E402
from .archive.reader import Pair, Trajectory  # noqa: E402
from .errors import *  # noqa: E402,F401,F403  (every sgdwalk exception is public)
from .errors import __all__ as _error_names  # noqa: E402
from .recorder import Recorder  # noqa: E402
from .samplers import RecordingBatchSampler, record_indices  # noqa: E402
from .schedules import Every, Pairs, Schedule, Steps, Union, Windows, parse_schedule  # noqa: E402

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
    *_error_names,
]


def __getattr__(name: str):
    """``trajectory.build_report`` without importing matplotlib at ``import trajectory`` (the report is optional)."""
    if name == "build_report":
        from .report import build_report

        return build_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
