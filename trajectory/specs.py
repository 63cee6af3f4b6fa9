"""Importable model and data specs: how an archive names the code that rebuilds its run.

An sgdwalk archive records *what* was trained on *which* data so that a separate process (the
analysis CLI, a notebook, a colleague's machine) can rebuild the model and the dataset without the
training script. It does so with a :class:`Spec`: a ``"package.module:factory"`` target plus a JSON
object of keyword arguments. Specs are stored as canonical JSON text, never as pickles.

Spec string format
------------------
* ``target`` is ``"package.module:attribute"``: a dotted, importable module path, a colon, and a
  (possibly dotted) attribute path inside that module, e.g. ``"trajectory.zoo.models:mlp"`` or
  ``"mylab.nets:make_wide_resnet"``. Every component must be a Python identifier. Modules are
  also looked up in the current working directory (``"net:Net"`` finds ``./net.py``).
* ``target`` may instead be ``"path/to/file.py:attribute"``: the file is loaded as a module under a
  private name (never as ``__main__``, so its ``if __name__ == "__main__":`` block does not run).
  Relative paths are relative to the current working directory.
* ``kwargs`` is a JSON object (string keys; numbers, strings, booleans, null, lists and nested
  objects). Tuples become lists, exactly as they will be after a JSON round trip.
* Canonical text (:meth:`Spec.to_json`): ``json.dumps({"target": ..., "kwargs": ...}, sort_keys=True)``.
* On the command line a spec is a target or zoo short name plus an optional JSON kwargs string,
  see :meth:`Spec.parse`, :func:`resolve_model_spec` and :func:`resolve_data_spec`.

Factory contracts
-----------------
Model factory: ``factory(**kwargs) -> torch.nn.Module``. Given the same kwargs and the same
``torch.manual_seed`` it must build the same architecture with the same initial parameters and the
same state-dict keys; the archive's layout table is checked against that state dict.

Data factory: ``factory(split: str = "train", augment: bool = False, **kwargs) -> Dataset``.
A factory (or Dataset class) that takes no ``split``/``augment`` parameters is accepted too: it is
taken to build the training split, and asking it for ``split="test"`` (``--eval test``) fails with
one line that says so.

* It returns a map-style ``torch.utils.data.Dataset`` (``__len__`` and ``__getitem__``) whose items
  are ``(x, y)`` pairs with ``y`` an integer class label (a Python ``int`` or a 0-d integer tensor),
  or dicts with a ``labels``/``label`` key (Hugging Face style; the other numeric fields are the
  inputs, see :func:`trajectory.analysis.data.materialize` and :mod:`trajectory.adapters`).
* ``split`` is ``"train"`` or ``"test"``. The recorder's minibatch indices refer to the ``"train"``
  split **in dataset order**, so that order must be a deterministic function of the kwargs: the
  same kwargs in another process must give the same example at the same index.
* ``augment=True`` asks for the training-time random augmentation (the paper's authors evaluate the
  loss along the path with it); ``augment=False`` must be deterministic. Factories whose data has no
  augmentation accept and ignore the flag.

Trust rule
----------
An archive is data, never code the user did not choose. :meth:`Spec.build` imports a target only
if it is one of sgdwalk's own zoo factories (:attr:`Spec.is_builtin`) or the caller passes
``trusted=True`` (``--trust-specs`` on the CLI). Otherwise it raises :class:`UntrustedSpecError`
*before importing anything*, so a spec such as ``"os:system"`` read from a downloaded archive can do
nothing. Specs named by the user on the command line (``--model``/``--data``) are the user's choice
and are built trusted by the CLI.

Importing never trains
----------------------
While a spec's module is imported for analysis, :func:`importing_spec` names it; a
:class:`~trajectory.Recorder` opened during that import (a training script without an
``if __name__ == "__main__":`` guard) raises :class:`~trajectory.errors.RecorderError` with one line
that says so, instead of silently starting a second training run.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import threading
from collections.abc import Iterator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from trajectory.adapters import ADAPTED_TARGET, HF_CONFIG_TARGET
from trajectory.errors import SgdwalkError, SpecError, UntrustedSpecError
from trajectory import textsafe
from trajectory.zoo import (
    DATA_FACTORIES,
    DATA_MODULE,
    MODEL_FACTORIES,
    MODELS_MODULE,
    builtin_targets,
)

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps `import trajectory.specs` free of torch
    import torch
    from torch.utils.data import Dataset

__all__ = [
    "Spec",
    "DataShape",
    "resolve_model_spec",
    "resolve_data_spec",
    "build_model",
    "build_dataset",
    "size_model_spec",
    "SPLITS",
    "importing_spec",
]

#: The dataset splits every data factory must accept.
SPLITS: tuple[str, ...] = ("train", "test")

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_TARGET_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
#: "path/to/file.py:attr": any path without a colon or a newline, ending in .py
_FILE_TARGET_RE = re.compile(rf"[^:\n\x00]+\.py:{_IDENT}(?:\.{_IDENT})*")
_BUILTIN_TARGETS = builtin_targets()

_TRUST_HINT = (
    "pass --trust-specs (CLI) or trusted=True (API) if you trust where it came from, "
    "or pass --model/--data explicitly"
)


_IMPORTING = threading.local()


def importing_spec() -> str | None:
    """The module a spec import is loading right now in this thread, or None.

    The recorder asks this so that a training script imported for its model class (a module without
    an ``if __name__ == "__main__":`` guard) fails at once instead of training again.
    """
    stack = getattr(_IMPORTING, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def _importing(module: str) -> Iterator[None]:
    stack = getattr(_IMPORTING, "stack", None)
    if stack is None:
        stack = _IMPORTING.stack = []
    stack.append(module)
    try:
        yield
    finally:
        stack.pop()


def _import_file(path: str) -> Any:
    """Load ``path`` (a .py file) as a module under a private name, once per absolute path.

    The private name (``_sgdwalk_spec_<stem>_<hash>``) is never ``__main__``, so the file's
    ``if __name__ == "__main__":`` block does not run; the module is kept in ``sys.modules`` so that
    classes defined there stay picklable and a second build does not execute the file again.
    """
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise SpecError(f"spec file {path!r} does not exist (relative paths start at {os.getcwd()})")
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"_sgdwalk_spec_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has a loader
        raise SpecError(f"cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = os.path.dirname(full)
    added = folder not in sys.path
    if added:  # sibling modules of the file import as they do when it runs as a script
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _import_module(module: str) -> Any:
    """``importlib.import_module`` that also finds modules in the current working directory.

    The ``sgdwalk`` console script does not put the working directory on ``sys.path`` (``python -m``
    does), so ``--model net:Net`` next to ``net.py`` would otherwise fail with "No module named 'net'".
    """
    cwd = os.getcwd()
    added = "" not in sys.path and cwd not in sys.path
    if added:
        sys.path.append(cwd)  # after site-packages: never shadows an installed package
    try:
        return importlib.import_module(module)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _one_line(text: object) -> str:
    """Collapse whitespace so that a message embedded from another exception stays on one line (control
    characters escaped, cut to a bounded length: specs come from archives and command lines)."""
    return textsafe.one_line(text if isinstance(text, BaseException) else str(text))


#: Spec JSON limits (docs/cli.md, "Limits"): longer or deeper text is refused before it is parsed.
MAX_SPEC_CHARS = 64 * 1024
MAX_SPEC_DEPTH = 32
MAX_TARGET_CHARS = 1000


def load_spec_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` for spec text from a user or an archive, within :data:`MAX_SPEC_CHARS` and
    :data:`MAX_SPEC_DEPTH` (checked before parsing); any problem is one :class:`SpecError` line."""
    return textsafe.load_json(text, what, error=SpecError, max_chars=MAX_SPEC_CHARS, max_depth=MAX_SPEC_DEPTH)


def _canonical_kwargs(kwargs: object, where: str) -> dict[str, Any]:
    """Return ``kwargs`` as it will read back from JSON, or raise SpecError if it cannot be stored.

    Canonicalising at construction means ``Spec(t, {"hidden": (100,)}) ==
    Spec.from_json(spec.to_json())``: what a process builds is exactly what the archive records.
    """
    if not isinstance(kwargs, Mapping):
        raise SpecError(f"{where}: kwargs must be a JSON object (a dict), got {type(kwargs).__name__}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise SpecError(f"{where}: kwargs keys must be strings, got {bad[0]!r}")
    try:
        text = json.dumps(dict(kwargs), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: kwargs are not JSON-serialisable ({_one_line(err)})") from err
    return json.loads(text)


@dataclass(frozen=True)
class Spec:
    """An importable factory plus the keyword arguments to call it with.

    ``Spec`` is immutable and compares by value; its ``kwargs`` are stored in JSON-canonical form
    (tuples become lists). Do not mutate ``spec.kwargs`` in place - build a new Spec instead (e.g.
    ``dataclasses.replace(spec, kwargs={**spec.kwargs, "width": 64})``).

    Example::

        spec = Spec("trajectory.zoo.models:mlp", {"hidden": [100, 100]})
        model = spec.build()                       # built-in: no trust needed
        text = spec.to_json()                      # store in the archive
        Spec.from_json(text).build(num_classes=10) # another process, with an override
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.target, str) and len(self.target) > MAX_TARGET_CHARS:  # before a regex scans 1 MB
            raise SpecError(f"spec target {textsafe.safe(self.target, 120)} is {len(self.target)} characters long; "
                            f"the limit is {MAX_TARGET_CHARS}")
        if not isinstance(self.target, str) or not (
            _TARGET_RE.fullmatch(self.target) or _FILE_TARGET_RE.fullmatch(self.target)
        ):
            raise SpecError(
                f"malformed spec target {textsafe.safe(self.target, 120)}: expected 'package.module:factory' "
                "made of Python identifiers, e.g. 'trajectory.zoo.models:mlp', or 'path/to/file.py:factory'"
            )
        object.__setattr__(self, "kwargs", _canonical_kwargs(self.kwargs, f"spec {self.target!r}"))

    # Equality and hashing go through the canonical text, so they agree with what an archive
    # stores (the generated dict comparison would call {"x": 1} and {"x": True} equal).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spec):
            return NotImplemented
        return self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __str__(self) -> str:
        if not self.kwargs:
            return self.target
        return f"{self.target} {json.dumps(self.kwargs, sort_keys=True)}"

    # ------------------------------------------------------------------ introspection
    @property
    def module(self) -> str:
        """The importable module part of :attr:`target` (before the colon), or the .py file path."""
        return self.target.rpartition(":")[0]

    @property
    def attribute(self) -> str:
        """The attribute path inside :attr:`module` (after the colon)."""
        return self.target.rpartition(":")[2]

    @property
    def is_file(self) -> bool:
        """True for ``"path/to/file.py:factory"`` targets (loaded from a file, not imported by name)."""
        return self.module.endswith(".py")

    @property
    def is_builtin(self) -> bool:
        """True iff the target is one of sgdwalk's registered zoo factories.

        This is stricter than "the module is inside ``trajectory.zoo``": the zoo modules import
        torch, os and friends, so ``"trajectory.zoo.models:torch.load"`` lives in a zoo module but
        is not a zoo factory and is not built without trust. Only the exact targets listed in
        :data:`trajectory.zoo.MODEL_FACTORIES` and :data:`trajectory.zoo.DATA_FACTORIES` count.
        """
        if self.target in _BUILTIN_TARGETS or self.target == HF_CONFIG_TARGET:
            return True
        if self.target == ADAPTED_TARGET:  # built-in wrapper: as trusted as the model spec inside it
            inner = self.kwargs.get("model")
            try:
                return isinstance(inner, dict) and Spec(inner.get("target", ""), inner.get("kwargs") or {}).is_builtin
            except SpecError:
                return False
        return False

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> str:
        """Canonical JSON text: equal specs always give byte-identical text."""
        return json.dumps({"target": self.target, "kwargs": self.kwargs}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Spec:
        """Parse the text written by :meth:`to_json`. Imports nothing.

        Raises :class:`SpecError` if the text is not a JSON object with a string ``"target"``, an
        optional object ``"kwargs"`` and no other keys.
        """
        obj = load_spec_json(text, "spec text")
        if not isinstance(obj, dict) or "target" not in obj:
            raise SpecError(
                f"spec text {_shorten(text)!r} must be a JSON object with a 'target' key"
            )
        unknown = sorted(set(obj) - {"target", "kwargs"})
        if unknown:
            raise SpecError(
                f"spec text {_shorten(text)!r} has unknown key(s) {unknown}; expected only 'target' and 'kwargs'"
            )
        kwargs = obj.get("kwargs", {})
        if kwargs is None:
            kwargs = {}
        return cls(obj["target"], kwargs)

    @classmethod
    def parse(cls, text: str, kwargs_json: str | None = None) -> Spec:
        """Build a Spec from command-line text: a full target and an optional JSON kwargs object.

        ``Spec.parse("mylab.nets:wide", '{"width": 4}')``. Short zoo names are not accepted
        here; use :func:`resolve_model_spec` / :func:`resolve_data_spec`, which accept both.
        """
        if not isinstance(text, str):
            raise SpecError(f"spec target must be a string, got {type(text).__name__}")
        target = text.strip()
        kwargs: dict[str, Any] = {}
        if kwargs_json is not None and kwargs_json.strip():
            parsed = load_spec_json(kwargs_json, f"kwargs for spec {textsafe.safe(target, 120)}")
            if not isinstance(parsed, dict):
                raise SpecError(
                    f"kwargs for spec {target!r} must be a JSON object like '{{\"width\": 64}}', "
                    f"got {_shorten(kwargs_json)!r}"
                )
            kwargs = parsed
        return cls(target, kwargs)

    # ------------------------------------------------------------------ building
    def resolve(self, *, trusted: bool = False) -> Callable[..., Any]:
        """Import and return the factory without calling it.

        Raises :class:`UntrustedSpecError` (before any import) if the target is not built-in and
        ``trusted`` is false; :class:`SpecError` if the module or attribute does not exist or the
        attribute is not callable.
        """
        if not trusted and not self.is_builtin:
            raise UntrustedSpecError(
                f"refusing to import spec {self.target!r}: it is not a built-in sgdwalk zoo factory "
                f"and sgdwalk never runs code named by an archive unless asked; {_TRUST_HINT}"
            )
        try:
            with _importing(self.module):
                obj: Any = _import_file(self.module) if self.is_file else _import_module(self.module)
        except ImportError as err:
            hint = ""
            if isinstance(err, ModuleNotFoundError) and err.name == self.module.split(".")[0]:
                hint = f" (not installed, not on PYTHONPATH and not in {os.getcwd()}; a file path works too: 'path/to/{self.module.replace('.', '/')}.py:{self.attribute}')"
            raise SpecError(
                f"cannot import module {self.module!r} for spec {self.target!r}: {_one_line(err)}{hint}"
            ) from err
        walked = self.module
        for part in self.attribute.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError as err:
                raise SpecError(
                    f"spec {self.target!r}: {walked!r} has no attribute {part!r}"
                ) from err
            walked = f"{walked}.{part}"
        if not callable(obj):
            raise SpecError(
                f"spec {self.target!r} names a {type(obj).__name__}, not a callable factory"
            )
        return obj

    def build(self, *, trusted: bool = False, **overrides: Any) -> Any:
        """Import the factory and call it with ``{**self.kwargs, **overrides}``.

        ``overrides`` are runtime arguments that are not part of the recorded spec, typically
        ``split=`` and ``augment=`` for data factories, or a kwarg the user overrides on the CLI.

        Raises :class:`UntrustedSpecError` for a non-built-in target unless ``trusted=True`` (no
        import happens); :class:`SpecError` if the target cannot be imported, is not callable, does
        not accept the keyword arguments, or raises ``TypeError``/``ValueError`` while building.
        Errors sgdwalk raises on purpose inside a factory (e.g. ``DataNotFoundError``) pass through
        unchanged; other exceptions are bugs in the factory and propagate as they are.
        """
        factory = self.resolve(trusted=trusted)
        kwargs = {**self.kwargs, **overrides}
        if self.target == ADAPTED_TARGET:  # the inner spec is built under the same trust as this one
            kwargs["_trusted"] = bool(trusted)
        try:
            signature: inspect.Signature | None = inspect.signature(factory)
        except (TypeError, ValueError):  # some builtins have no introspectable signature
            signature = None
        if signature is not None:
            kwargs = self._drop_runtime_flags(signature, kwargs, overrides)
            try:
                signature.bind(**kwargs)
            except TypeError as err:
                raise SpecError(
                    f"spec {self}: {_one_line(err)}; {self.attribute} accepts {signature}"
                ) from err
        try:
            return factory(**kwargs)
        except SgdwalkError:
            raise
        except (TypeError, ValueError) as err:
            raise SpecError(
                f"spec {self} failed to build: {type(err).__name__}: {_one_line(err)}"
            ) from err


    def _drop_runtime_flags(self, signature: inspect.Signature, kwargs: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Leave out ``split``/``augment`` for a data factory that has no such parameters.

        A plain Dataset class is a valid data factory: it builds the training data. ``augment=False``
        and ``split="train"`` then mean what it does anyway; ``split="test"`` or ``augment=True``
        cannot be honoured and fail with one line.
        """
        params = signature.parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return kwargs
        out = dict(kwargs)
        for flag, harmless in (("split", "train"), ("augment", False)):
            if flag in overrides and flag not in params:
                if overrides[flag] != harmless:
                    raise SpecError(
                        f"data spec {self}: {self.attribute} takes no {flag!r} parameter, so it cannot build "
                        f"{flag}={overrides[flag]!r}; it is taken to build the training data only "
                        f"(give it a '{flag}' parameter, or use --eval subset:N / train)"
                    )
                del out[flag]
        return out


def _shorten(text: object, limit: int = 120) -> str:
    return textsafe.cut(textsafe.escape(" ".join(str(text).split())), limit)


def _resolve(name: str | Spec, kwargs: dict[str, Any], module: str, names: tuple[str, ...], kind: str) -> Spec:
    if isinstance(name, Spec):
        return Spec(name.target, {**name.kwargs, **kwargs})
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"empty {kind} spec; give a zoo name ({', '.join(names)}) or 'module:factory'")
    name = name.strip()
    if ":" in name:
        return Spec(name, kwargs)
    if name in names:
        return Spec(f"{module}:{name}", kwargs)
    raise SpecError(
        f"unknown {kind} {textsafe.safe(name, 120)}: built-in {kind}s are {', '.join(names)}; "
        "for your own code give 'package.module:factory'"
    )


def resolve_model_spec(name: str | Spec, **kwargs: Any) -> Spec:
    """Turn a zoo short name (``"mlp"``, ``"vgg11_bn"``, ...) or a full target into a model Spec.

    A string containing ``":"`` is taken as a full ``module:factory`` target; otherwise it must be
    one of :data:`trajectory.zoo.MODEL_FACTORIES`. Passing a :class:`Spec` merges ``kwargs`` into it.
    """
    return _resolve(name, kwargs, MODELS_MODULE, MODEL_FACTORIES, "model")


def resolve_data_spec(name: str | Spec, **kwargs: Any) -> Spec:
    """Turn a zoo short name (``"mnist1d"``, ``"cifar10"``, ``"synthetic"``) or a full target into a data Spec."""
    return _resolve(name, kwargs, DATA_MODULE, DATA_FACTORIES, "dataset")


def build_model(spec: Spec, *, trusted: bool = False, **overrides: Any) -> torch.nn.Module:
    """Build a model from ``spec`` and check that the factory honoured the model contract."""
    import torch

    model = spec.build(trusted=trusted, **overrides)
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"model spec {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_dataset(
    spec: Spec,
    split: str = "train",
    *,
    augment: bool = False,
    trusted: bool = False,
    **overrides: Any,
) -> Dataset:
    """Build one split of a dataset from ``spec`` and check the data factory contract.

    The result must be map-style (``__len__`` and ``__getitem__``) because recorded minibatch
    indices are replayed by position.
    """
    if split not in SPLITS:
        raise SpecError(f"unknown split {split!r} for data spec {spec}; expected one of {list(SPLITS)}")
    dataset = spec.build(trusted=trusted, split=split, augment=augment, **overrides)
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise SpecError(
            f"data spec {spec} returned {type(dataset).__name__}, not a map-style Dataset "
            "with __len__ and __getitem__"
        )
    return dataset


class DataShape(Protocol):
    """What :func:`size_model_spec` needs to know about a dataset (see ``zoo.data.DatasetInfo``)."""

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def num_classes(self) -> int: ...


def size_model_spec(spec: Spec, info: DataShape, *, trusted: bool = False) -> Spec:
    """Fill in the sizing kwargs a model factory accepts from a dataset's shape.

    The zoo factories use a small vocabulary of sizing arguments, and user factories that use the
    same names get the same service:

    ========== =====================================================================
    kwarg      value derived from ``info.input_shape`` (without the batch dimension)
    ========== =====================================================================
    in_features  product of the shape (flattened input size, for MLPs)
    in_channels  ``shape[0]`` for shapes with 2+ dims, else 1
    input_dim    number of spatial dims: ``len(shape) - 1`` for 2+ dims, else 1
    num_classes  ``info.num_classes``
    ========== =====================================================================

    Only parameters the factory names explicitly are filled, and kwargs already in ``spec`` win.
    The returned spec is the one to record: it rebuilds the same architecture without needing
    the dataset. The factory is resolved (imported) under the same trust rule as :meth:`Spec.build`.
    """
    factory = spec.resolve(trusted=trusted)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return spec
    shape = tuple(int(s) for s in info.input_shape)
    derived: dict[str, Any] = {
        "in_features": math.prod(shape) if shape else 1,
        "in_channels": shape[0] if len(shape) >= 2 else 1,
        "input_dim": len(shape) - 1 if len(shape) >= 2 else 1,
        "num_classes": int(info.num_classes),
    }
    accepted = {
        name
        for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    fill = {k: v for k, v in derived.items() if k in accepted and k not in spec.kwargs}
    if not fill:
        return spec
    return Spec(spec.target, {**spec.kwargs, **fill})
