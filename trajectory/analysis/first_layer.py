"""The shared affine first layer: along a line, the first layer's output is the lerp of its two end outputs.

If the first weighted module a model's forward calls is a ``Linear``, ``Conv1d``, ``Conv2d`` or ``Embedding``
whose input does not depend on the state (parameters or buffers), its output is affine in its weight and bias:
at ``θ(t) = θ_A + t·(θ_B − θ_A)`` it is exactly ``f(x; W_A) + t·(f(x; W_B) − f(x; W_A))``. Along a line of many
points, the layer is then computed twice per line instead of once per point, and each point gets a lerp.

The layer is found with a probe forward (hooks, so user modules with their own ``forward`` work too): every
floating state entry is made a leaf that requires grad, and the first call of one of those module types is
accepted only if its input carries no autograd history (it depends on the data alone), the module is called
exactly once, its weight and bias are plain parameters stored in the archive's parameter row, and (for
``Embedding``) no ``max_norm`` renormalises the weight. Otherwise sharing stays off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["FirstLayer", "find_first_layer", "SharedLines"]

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


_PLAIN_FORWARDS = tuple(c.forward for c in _AFFINE)


class _Stop(Exception):
    pass


@dataclass
class FirstLayer:
    """The shareable first layer: the module, its path and its parameters' slices of the state vector."""

    module: nn.Module
    name: str
    views: dict[str, tuple[int, int, tuple[int, ...]]]  # local name ('weight', 'bias') -> (start, stop, shape)

    def capture_input(self, model: nn.Module, x: torch.Tensor) -> tuple[Any, ...]:
        """The positional arguments this layer receives when ``model`` runs on ``x`` (the forward stops there)."""
        got: list[tuple] = []

        def pre(_m, args):
            got.append(args)
            raise _Stop

        h = self.module.register_forward_pre_hook(pre)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            h.remove()
        if not got:  # pragma: no cover - the probe saw this call
            raise RuntimeError("the shared first layer was not called")
        return got[0]

    def outputs(self, rows: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
        """The layer's output for each state row of ``rows`` (U, n_state) on the captured input: (U, n, ...)."""
        outs = []
        for r in rows:
            p = {k: r[s:e].view(shape) for k, (s, e, shape) in self.views.items()}
            outs.append(functional_call(self.module, p, args))
        return torch.stack(outs)


def find_first_layer(model: nn.Module, views: list[tuple[str, int, int, tuple]], n_params: int,
                     ints: dict[str, torch.Tensor], x: torch.Tensor) -> FirstLayer | None:
    """The shareable first layer of ``model`` on inputs like ``x``, or None (see the module docstring)."""
    param_names = {name for name, s, e, shape in views if s < n_params}
    calls: list[tuple[nn.Module, bool]] = []
    xs = x[: min(2, len(x))]

    def pre(m, args):  # probe 1: the first affine call, and whether its input depends on the state
        if isinstance(m, _AFFINE):
            calls.append((m, any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)))
            raise _Stop

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    try:
        with torch.enable_grad():
            sd = model.state_dict(keep_vars=True)
            state = {name: sd[name].detach().clone().requires_grad_(True) for name, s, e, shape in views}
            state.update(ints)
            functional_call(model, state, (xs,))
    except _Stop:
        pass
    except Exception:  # e.g. BatchNorm before the first layer (its statistics cannot require grad): no sharing
        return None
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        return None
    seen = [0]

    def count(m, args):  # probe 2: how often the candidate is called in a whole forward
        seen[0] += 1

    h = calls[0][0].register_forward_pre_hook(count)
    try:
        with torch.no_grad():
            model(xs)
    except Exception:
        return None
    finally:
        h.remove()
    calls.append((calls[0][0], False) if seen[0] > 1 else (nn.Identity(), False))
    first, dep = calls[0]
    if dep or sum(1 for m, _ in calls if m is first) != 1:
        return None
    if isinstance(first, nn.Embedding) and first.max_norm is not None:
        return None
    name = next((n for n, m in model.named_modules() if m is first), None)
    if name is None or sum(1 for m in model.modules() if m is first) != 1:
        return None
    if type(first).forward not in _PLAIN_FORWARDS or "forward" in first.__dict__:
        return None  # a subclass with its own forward may not be affine in its weights
    out: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    for local in ("weight", "bias"):
        t = first._parameters.get(local)
        if t is None:
            if local == "weight" or local in first._buffers:
                return None
            continue
        full = f"{name}.{local}" if name else local
        if full not in param_names:
            return None
        s, e, shape = next((s, e, shape) for n, s, e, shape in views if n == full)
        out[local] = (s, e, tuple(shape))
    if set(first._parameters) - {"weight", "bias"} or first._forward_hooks or first._forward_pre_hooks:
        return None
    return FirstLayer(first, name, out)


class SharedLines:
    """First-layer outputs of the points of one pass on one data chunk, from the outputs at their lines' ends.

    ``ends_a``/``ends_b`` (U, n, ...) are the layer's outputs at the lines' two ends, ``inv`` (K,) maps each point
    to its line and ``t`` (K,) is its position on it.
    """

    def __init__(self, ends_a: torch.Tensor, ends_b: torch.Tensor, inv: torch.Tensor, t: torch.Tensor):
        self.a, self.b, self.inv, self.t = ends_a, ends_b, inv, t

    def point(self, k: int) -> torch.Tensor:
        u = int(self.inv[k])
        return torch.lerp(self.a[u], self.b[u], float(self.t[k]))

    def all(self) -> torch.Tensor:
        tt = self.t.to(self.a.dtype).view(-1, *([1] * (self.a.dim() - 1)))
        return torch.lerp(self.a[self.inv], self.b[self.inv], tt)


def swap_forward(module: nn.Module, holder: list) -> Callable[[], None]:
    """Make ``module`` return ``holder[0]`` instead of computing; returns the undo function."""
    module.forward = lambda *a, **k: holder[0]

    def undo() -> None:
        if "forward" in module.__dict__:
            del module.forward

    return undo
