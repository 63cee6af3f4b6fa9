"""sgdwalk's built-in model and dataset factories (the "zoo").

The zoo exists so that an archive can name the model and data it was recorded with by a short,
importable spec (see :mod:`trajectory.specs`) and a *separate process* - the analysis CLI, a
notebook, another machine - can rebuild both without the training script. Every factory here is
deterministic given ``torch.manual_seed`` (models) or its own ``seed`` argument (data), never
downloads anything and never unpickles untrusted input.

This package's ``__init__`` deliberately imports neither torch nor torchvision: the registry below
is plain data, so :mod:`trajectory.specs` can decide whether a spec is built-in (and therefore safe
to import without the user's say-so) before anything heavy is loaded. The factories themselves are
imported lazily on first attribute access, e.g. ``trajectory.zoo.mlp``.

Factories
---------
Models (``trajectory.zoo.models``, contract ``factory(**kwargs) -> torch.nn.Module``):
    mlp, mlp_bn, cnn, cnn_bn, vgg11_bn, resnet18, preact_resnet, preact_resnet20, preact_resnet56

Data (``trajectory.zoo.data``, contract
``factory(split="train", augment=False, **kwargs) -> torch.utils.data.Dataset``):
    mnist1d, cifar10, synthetic

See ``docs/zoo.md`` for each factory's keyword arguments.
"""
from __future__ import annotations

import importlib
from typing import Any


#: Module holding the model factories; a built-in model spec's target is ``f"{MODELS_MODULE}:{name}"``.
MODELS_MODULE = "trajectory.zoo.models"
#: Module holding the data factories; a built-in data spec's target is ``f"{DATA_MODULE}:{name}"``.
DATA_MODULE = "trajectory.zoo.data"

#: Short names of the model factories. This tuple *is* the trust boundary: a spec whose target is
#: ``trajectory.zoo.models:<name>`` for a name listed here is built without ``trusted=True``.
#: Anything else - including other attributes reachable from the zoo modules, such as
#: ``trajectory.zoo.models:torch.load`` - is treated as user code. Keep it in sync with
#: ``trajectory.zoo.models.__all__`` (a test checks).
MODEL_FACTORIES: tuple[str, ...] = (
    "mlp",
    "mlp_bn",
    "cnn",
    "cnn_bn",
    "vgg11_bn",
    "resnet18",
    "preact_resnet",
    "preact_resnet20",
    "preact_resnet56",
    "transformer",
)

#: Short names of the data factories; same role as :data:`MODEL_FACTORIES` for
#: ``trajectory.zoo.data:<name>`` targets.
DATA_FACTORIES: tuple[str, ...] = ("mnist1d", "cifar10", "synthetic")

_DATA_HELPERS: tuple[str, ...] = ("DatasetInfo", "dataset_info", "write_cifar10_standin")

# The factories themselves are lazy attributes (``__getattr__`` below): the registry is the list.
__all__ = [
    "MODELS_MODULE",
    "DATA_MODULE",
    "MODEL_FACTORIES",
    "DATA_FACTORIES",
    "builtin_targets",
    *MODEL_FACTORIES,
    *DATA_FACTORIES,
    *_DATA_HELPERS,
]


def builtin_targets() -> frozenset[str]:
    """Every ``module:factory`` target that sgdwalk builds without asking the user to trust it."""
    return frozenset(
        [f"{MODELS_MODULE}:{name}" for name in MODEL_FACTORIES]
        + [f"{DATA_MODULE}:{name}" for name in DATA_FACTORIES]
    )


def __getattr__(name: str) -> Any:
    # PEP 562 lazy attributes: importing trajectory.zoo stays free of torch until a factory is used.
    if name in MODEL_FACTORIES:
        return getattr(importlib.import_module(MODELS_MODULE), name)
    if name in DATA_FACTORIES or name in _DATA_HELPERS:
        return getattr(importlib.import_module(DATA_MODULE), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
