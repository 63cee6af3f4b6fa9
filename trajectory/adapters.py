"""Adapters: how a batch becomes (inputs, targets) and a model output becomes logits.

The analyzer evaluates ``loss(model(inputs), targets)`` with one input tensor per sample and logits out.
Models trained by frameworks rarely look like that: a Hugging Face model takes a dict of tensors and returns
a ``ModelOutput``; a LightningModule may have no ``forward`` at all and compute its logits inside
``training_step``. An :class:`Adapter` bridges the two with three small methods:

``batch(batch) -> (inputs, targets)``
    A collated batch (or a single item) of the training data -> one input tensor and the class labels.
``output(out) -> logits``
    Whatever the model returns -> a (N, classes) tensor (or (N, ...) for ``mse``).
``wrap(model) -> nn.Module``
    The model as the analyzer needs it: ``forward(inputs) -> logits``. The wrapped module has the *same*
    state-dict names as ``model`` (no ``model.`` prefix): it is a shallow copy whose class is a subclass of
    ``type(model)`` with a new ``forward``; parameters and submodules are shared with ``model``. So the
    archive's layout check and every state vector line up unchanged, and the evaluator and the curvature code
    need no change.

Built-in adapters, by name (:func:`get_adapter`):

``"huggingface"`` (:class:`HuggingFace`)
    dict batches with a ``labels`` (or ``label``) key; the other numeric fields (``input_ids``,
    ``attention_mask``, ...) are stacked, in sorted key order, into one (N, K, ...) input tensor that the
    wrapped model unpacks into keyword arguments; the output's ``.logits`` are the logits.
``"lightning"`` (:class:`Lightning`)
    a LightningModule with ``forward`` is used as it is. Without ``forward``, its ``training_step`` logic
    gives the logits: the step runs on ``(inputs, dummy targets)`` and the tensor handed to the first
    ``F.cross_entropy`` / ``F.nll_loss`` / ``F.mse_loss`` call (also through ``nn.CrossEntropyLoss``) is
    taken as the model output (the step is stopped right there).

An adapter is stored in an archive inside the model spec, as the built-in factory
``trajectory.adapters:adapted {"adapter": {...}, "model": {<the model's spec>}}``; the Lightning and Hugging
Face callbacks record it, so ``sgdwalk analyze`` rebuilds the wrapped model by itself. A Hugging Face model
built from its config (``trajectory.adapters:hf_from_config``) needs no trust flag: only classes of the
``transformers`` package are built, from a JSON config, with no remote code.
"""
from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any, Callable

from .errors import SpecError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "Adapter",
    "HuggingFace",
    "Lightning",
    "get_adapter",
    "adapter_from_spec",
    "adapt",
    "adapted",
    "adapted_spec",
    "hf_from_config",
    "hf_model_spec",
    "ADAPTED_TARGET",
    "HF_CONFIG_TARGET",
    "LABEL_KEYS",
    "input_fields",
]

#: The built-in factory that rebuilds a model and wraps it in an adapter (model spec of adapted archives).
ADAPTED_TARGET = "trajectory.adapters:adapted"
#: The built-in factory that builds a 🤗 Transformers model class from a JSON config (random weights).
HF_CONFIG_TARGET = "trajectory.adapters:hf_from_config"
#: Keys of a dict item that hold the class label, in order of preference.
LABEL_KEYS = ("labels", "label")


def input_fields(item: dict) -> list[str]:
    """The fields of a dict item (or collated batch) that are stacked as inputs, sorted by name.

    Numeric, non-boolean fields besides the label whose shape is the most common one (ties: more
    dimensions), so a per-sample scalar such as ``idx`` next to token sequences is left out.
    """
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    for k in sorted(item):
        if k in LABEL_KEYS or isinstance(item[k], (str, bytes)):
            continue
        try:
            t = torch.as_tensor(item[k])
        except (TypeError, ValueError, RuntimeError):
            continue  # strings, ragged lists: not model inputs
        if t.dtype != torch.bool and not t.is_complex():
            shapes[k] = tuple(t.shape)
    if not shapes:
        return []
    counts: dict[tuple[int, ...], int] = {}
    for shape in shapes.values():
        counts[shape] = counts.get(shape, 0) + 1
    best = max(counts, key=lambda sh: (counts[sh], len(sh)))
    return [k for k, sh in shapes.items() if sh == best]


def _stack_dict(batch: dict, keys: list[str] | None, what: str) -> "tuple[torch.Tensor, torch.Tensor, list[str]]":
    import torch

    label = next((k for k in LABEL_KEYS if k in batch), None)
    if label is None:
        raise SpecError(f"{what} is a dict without a {' or '.join(repr(k) for k in LABEL_KEYS)} key (keys: {sorted(batch)})")
    y = torch.as_tensor(batch[label])
    if keys is None:
        keys = input_fields(batch)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise SpecError(f"{what} lacks the input field(s) {missing} the model was trained with")
    if not keys:
        raise SpecError(f"{what} has no numeric input field besides {label!r}")
    tensors = [torch.as_tensor(batch[k]) for k in keys]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise SpecError(f"{what}: input fields {keys} have different shapes {sorted(shapes)}; pad them to one length")
    dtype = torch.promote_types(*(t.dtype for t in tensors)) if len(tensors) > 1 else tensors[0].dtype
    # a collated batch (1-d labels) stacks to (N, K, ...); one item (a scalar label) to (K, ...)
    x = torch.stack([t.to(dtype) for t in tensors], dim=1 if y.dim() >= 1 else 0)
    return x, y, keys


class Adapter:
    """Maps a batch to (inputs, targets) and a model output to logits; see the module docstring.

    Subclasses set :attr:`name` and may override :meth:`batch`, :meth:`output` and :meth:`call`; ``kwargs``
    (JSON-serialisable) are what :meth:`to_spec` records so that the same adapter is rebuilt for analysis.
    """

    name = "default"

    def __init__(self, **kwargs: Any):
        self.kwargs = json.loads(json.dumps(kwargs, sort_keys=True))

    # ------------------------------------------------------------------ the interface
    def batch(self, batch: Any) -> "tuple[torch.Tensor, torch.Tensor]":
        """A collated batch or one item -> (inputs, targets). Default: ``(x, y)`` pairs and label dicts."""
        import torch

        if isinstance(batch, dict):
            x, y, _ = _stack_dict(batch, self.kwargs.get("input_keys"), "a batch")
            return x, y
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            try:
                return torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
            except (TypeError, ValueError, RuntimeError) as err:
                raise SpecError(f"a batch's (x, y) are not tensors ({' '.join(str(err).split())}); use an adapter") from None
        raise SpecError(f"a batch of type {type(batch).__name__} is neither (x, y) nor a dict with labels; use an adapter")

    def output(self, out: Any) -> "torch.Tensor":
        """Model output -> logits: a tensor as it is, ``.logits`` / ``["logits"]`` of an output object, else the first element."""
        import torch

        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, dict):
            logits = out.get("logits")
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]
        if not isinstance(logits, torch.Tensor):
            raise SpecError(f"cannot find logits in a model output of type {type(out).__name__}; give the adapter an output mapping")
        return logits

    def call(self, model: "nn.Module", forward: Callable[..., Any], x: "torch.Tensor") -> Any:
        """Run the model on one input tensor; ``forward`` is the model class's own forward, bound."""
        return forward(x)

    # ------------------------------------------------------------------ wrapping and storing
    def wrap(self, model: "nn.Module") -> "nn.Module":
        """``model`` with ``forward(inputs) -> logits``; same parameters, buffers and state-dict names."""
        return _wrap(model, self)

    def to_spec(self) -> dict[str, Any]:
        """JSON object naming this adapter (``{"name": ..., "kwargs": ...}``), as stored in a model spec."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


class HuggingFace(Adapter):
    """🤗 Transformers: dict batches with ``labels``, outputs with ``.logits``.

    ``input_keys``: the fields ``forward`` takes (keyword arguments). ``fields``: every numeric field of a
    data item besides the label, sorted - what :func:`~trajectory.analysis.data.materialize` stacks; the
    inputs are picked from them by name (the Trainer likewise drops columns ``forward`` does not take).
    Without ``fields`` the stacked data must hold exactly ``input_keys``. The callback records both.
    """

    name = "huggingface"

    def __init__(self, input_keys: list[str] | None = None, fields: list[str] | None = None):
        kw: dict[str, Any] = {}
        if input_keys is not None:
            kw["input_keys"] = sorted(input_keys)
        if fields is not None:
            kw["fields"] = sorted(fields)
        super().__init__(**kw)

    def call(self, model: "nn.Module", forward: Callable[..., Any], x: "torch.Tensor") -> Any:
        keys = self.kwargs.get("input_keys")
        if keys is None:
            raise SpecError("the huggingface adapter needs input_keys to unpack stacked inputs")
        fields = self.kwargs.get("fields") or keys
        k = x.shape[1] if x.dim() >= 2 else 1
        if k == len(keys):
            pos = range(len(keys))
        elif k == len(fields):
            pos = [fields.index(name) for name in keys]
        else:
            raise SpecError(
                f"the model takes the input fields {keys}, but the data gives {k} numeric field(s); "
                "the analysis data must hold these fields plus 'labels' (drop the others)"
            )
        return forward(**{name: x[:, i] for name, i in zip(keys, pos)})


class _Captured(Exception):
    def __init__(self, logits: Any):
        self.logits = logits


def _LossCapture() -> Any:
    """A torch function mode that stops ``training_step`` at its loss and hands back the loss's input (the logits).

    Why a mode and not patching ``torch.nn.functional``: modes are thread-local (a global patch was visible to
    every thread while active) and see the loss however the module reached it (``F.cross_entropy``, a
    ``from torch.nn.functional import cross_entropy`` alias, ``nn.CrossEntropyLoss``)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    targets = {F.cross_entropy, F.nll_loss, F.mse_loss}

    class Capture(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
            kwargs = kwargs or {}
            if func in targets:
                raise _Captured(args[0] if args else kwargs.get("input"))
            return func(*args, **kwargs)

    return Capture()


class Lightning(Adapter):
    """PyTorch Lightning: ``forward`` when the module defines one, else the logits inside ``training_step``."""

    name = "lightning"

    def call(self, model: "nn.Module", forward: Callable[..., Any], x: "torch.Tensor") -> Any:
        if _overrides_forward(model):
            return forward(x)
        import warnings

        import torch

        dummy = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        try:
            with warnings.catch_warnings(), _LossCapture():
                warnings.simplefilter("ignore")  # self.log() outside a Trainer
                model.training_step((x, dummy), 0)
        except _Captured as got:
            return got.logits
        raise SpecError(
            f"{type(model).__qualname__} has no forward() and its training_step computes no F.cross_entropy, "
            "F.nll_loss or F.mse_loss on its output; define forward(x) -> logits"
        )


def _overrides_forward(model: "nn.Module") -> bool:
    """True unless ``forward`` is the LightningModule/nn.Module placeholder."""
    from torch import nn

    for klass in type(model).__mro__:
        if "forward" in klass.__dict__:
            mod = getattr(klass, "__module__", "")
            if klass is nn.Module or mod.startswith(("pytorch_lightning.", "lightning.")):
                return False
            if getattr(klass, "_sgdwalk_wrapper", False):
                continue
            return True
    return False


_ADAPTERS: dict[str, type[Adapter]] = {"default": Adapter, "huggingface": HuggingFace, "hf": HuggingFace, "lightning": Lightning}
_WRAPPERS: dict[type, type] = {}


def get_adapter(name: str | Adapter | None, **kwargs: Any) -> Adapter:
    """An adapter by name (``huggingface``/``hf``, ``lightning``, ``default``), or the instance given."""
    if isinstance(name, Adapter):
        return name
    cls = _ADAPTERS.get(str(name or "default").lower())
    if cls is None:
        raise SpecError(f"unknown adapter {name!r}; built-in adapters: huggingface, lightning")
    return cls(**kwargs)


def adapter_from_spec(obj: Any) -> Adapter:
    """Rebuild an adapter from :meth:`Adapter.to_spec`'s JSON object."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise SpecError(f"an adapter spec must be a JSON object with a 'name', got {obj!r}")
    kwargs = obj.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SpecError(f"adapter spec kwargs must be a JSON object, got {kwargs!r}")
    try:
        return get_adapter(obj["name"], **kwargs)
    except TypeError as err:
        raise SpecError(f"adapter spec {obj!r}: {err}") from None


def _wrap(model: "nn.Module", adapter: Adapter) -> "nn.Module":
    if getattr(type(model), "_sgdwalk_wrapper", False):
        model = model.__dict__["_sgdwalk_inner"]
    base = type(model)
    sub = _WRAPPERS.get(base)
    if sub is None:

        def forward(self: Any, x: Any) -> Any:
            ad = self.__dict__["_sgdwalk_adapter"]
            bound = base.forward.__get__(self, base)
            return ad.output(ad.call(self, bound, x))

        sub = type(base.__name__, (base,), {"forward": forward, "_sgdwalk_wrapper": True, "__module__": base.__module__,
                                             "__qualname__": base.__qualname__})
        _WRAPPERS[base] = sub
    new = copy.copy(model)  # shares _parameters/_buffers/_modules: no name prefix, no copy of the weights
    new.__class__ = sub
    new.__dict__["_sgdwalk_adapter"] = adapter
    new.__dict__["_sgdwalk_inner"] = model
    return new


def adapt(model: "nn.Module", adapter: str | Adapter = "default", **kwargs: Any) -> "nn.Module":
    """``model`` wrapped for analysis: ``adapt(hf_model, "huggingface", input_keys=["input_ids"])``.

    Pass the result to :func:`trajectory.analysis.analyze` (``model=``) or the :mod:`trajectory.landscape`
    functions. The state dict is the model's own, so it matches archives recorded from ``model``.
    """
    return get_adapter(adapter, **kwargs).wrap(model)


# ---------------------------------------------------------------------------------------------- spec factories
def adapted(adapter: dict, model: dict, _trusted: bool = False) -> "nn.Module":
    """Built-in model factory of adapted archives: build the inner model spec, wrap it in the adapter.

    :class:`trajectory.specs.Spec` builds this target with the trust of the call: the inner spec is imported
    only if it is built-in or the caller trusts the archive (``_trusted`` is set by ``Spec.build``).
    """
    from .specs import Spec, build_model

    inner = Spec(model.get("target", ""), model.get("kwargs") or {}) if isinstance(model, dict) else None
    if inner is None:
        raise SpecError(f"adapted model spec: 'model' must be a spec object, got {model!r}")
    return adapter_from_spec(adapter).wrap(build_model(inner, trusted=_trusted))


def adapted_spec(model_spec: Any, adapter: Adapter) -> Any:
    """The model spec to record for ``model_spec`` (a Spec or target text) seen through ``adapter``."""
    from .specs import Spec

    if isinstance(model_spec, str):
        model_spec = Spec.from_json(model_spec) if model_spec.lstrip().startswith("{") else Spec(model_spec)
    if model_spec.target == ADAPTED_TARGET:
        return model_spec
    return Spec(ADAPTED_TARGET, {"adapter": adapter.to_spec(), "model": json.loads(model_spec.to_json())})


def hf_from_config(architecture: str, config: dict) -> "nn.Module":
    """A 🤗 Transformers model of class ``transformers.<architecture>`` from a config dict (random weights).

    Only classes exported by the ``transformers`` package that derive from ``PreTrainedModel`` are built,
    never remote code; the initial weights do not matter (every analysed state comes from the archive).
    """
    try:
        import transformers
    except ImportError:
        raise SpecError("this archive's model is a 🤗 Transformers model: pip install sgdwalk[hf]") from None
    if not isinstance(architecture, str) or not architecture.isidentifier():
        raise SpecError(f"hf_from_config: architecture {architecture!r} is not a class name")
    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SpecError(f"hf_from_config: transformers has no model class {architecture!r}")
    if not isinstance(config, dict) or "model_type" not in config:
        raise SpecError("hf_from_config: config must be the model's config dict (with 'model_type')")
    cfg_kwargs = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version", "trust_remote_code", "auto_map")}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **cfg_kwargs)
    return cls(cfg)


def hf_model_spec(model: Any) -> Any:
    """A built-in spec that rebuilds ``model`` (a transformers class) from its config; None if not possible."""
    from .specs import Spec

    cfg = getattr(model, "config", None)
    cls = type(model)
    try:
        import transformers

        exported = getattr(transformers, cls.__name__, None) is cls
    except ImportError:  # pragma: no cover
        return None
    if cfg is None or not exported or not hasattr(cfg, "to_json_string"):
        return None
    try:
        config = json.loads(cfg.to_json_string(use_diff=False))
    except (TypeError, ValueError):
        return None
    return Spec(HF_CONFIG_TARGET, {"architecture": cls.__name__, "config": config})
