"""Which optimizer state sgdwalk records, how it is gathered per record, and how a resumed run gets it back.

Why: separating the update from the gradient (momentum-aware stability, Adam's preconditioned sharpness) needs
the optimizer's per-parameter state at every recorded step, not only the parameters (issue 14 item 5). The
recorder snapshots it with the parameters (:class:`trajectory.Recorder` ``optimizer_state=True``); this module
decides the keys, lists the state tensors in the archive's params order, and restores a recorded state into a
fresh optimizer so a resumed run continues its momentum instead of restarting it at zero.

Keys (``archive.format.OPTIMIZER_KEYS``): ``momentum_buffer`` (SGD with momentum > 0), ``exp_avg`` and
``exp_avg_sq`` (Adam, AdamW; also ``max_exp_avg_sq`` with amsgrad). ``step`` is Adam's ``state['step']``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .archive import format as fmt
from .errors import RecorderError

__all__ = ["recorded_state_keys", "gather_state", "state_step_tensor", "restore_optimizer_state"]


def _present_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    keys: set[str] = set()
    for state in optimizer.state.values():
        keys.update(k for k, v in state.items() if v is not None)
    return keys


def recorded_state_keys(optimizer: torch.optim.Optimizer) -> tuple[tuple[str, ...], bool]:
    """(keys to record, whether the optimizer keeps a ``step`` count); RecorderError (one line) if none apply.

    An optimizer that already holds state (a resumed run) is read as it is: the supported keys it has. Before
    its first step torch has created no state yet, so the keys follow from the class and hyperparameters:
    SGD with momentum > 0, Adam and AdamW (their subclasses too).
    """
    cls = type(optimizer).__name__
    if cls == "ZeroRedundancyOptimizer":
        raise RecorderError(
            "ZeroRedundancyOptimizer shards the optimizer state across ranks; sgdwalk records the full state of "
            "one optimizer: drop optimizer_state=True or use a plain optimizer"
        )
    present = _present_keys(optimizer)
    if present:
        keys = tuple(k for k in fmt.OPTIMIZER_KEYS if k in present)
        if not keys:
            raise RecorderError(
                f"optimizer {cls} keeps state {sorted(present)}, none of which sgdwalk records "
                f"({', '.join(fmt.OPTIMIZER_KEYS)}); drop optimizer_state=True"
            )
        return keys, "step" in present
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        if not any(float(g.get("momentum", 0) or 0) > 0 for g in groups):
            raise RecorderError("SGD without momentum keeps no optimizer state to record; drop optimizer_state=True or set momentum > 0")
        return ("momentum_buffer",), False
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if any(g.get("amsgrad") for g in groups) else ())
        return keys, True
    raise RecorderError(
        f"optimizer {cls} has no state yet and sgdwalk cannot tell which it will keep; optimizer_state=True "
        "records SGD (momentum > 0), Adam and AdamW, or an optimizer whose state already holds "
        f"{', '.join(fmt.OPTIMIZER_KEYS)}"
    )


def gather_state(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], key: str) -> list[torch.Tensor | None]:
    """``optimizer.state[p][key]`` for each parameter in order, None where the parameter has no such state yet."""
    state = optimizer.state
    out: list[torch.Tensor | None] = []
    for p in params:
        s = state.get(p)
        v = s.get(key) if s else None
        out.append(v if isinstance(v, torch.Tensor) else None)
    return out


def state_step_tensor(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | float | None:
    """``state['step']`` of the first parameter (in params order) that has one; None when none has."""
    state = optimizer.state
    for p in params:
        s = state.get(p)
        if s and "step" in s:
            return s["step"]
    return None


def restore_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    recorded: Mapping[str, torch.Tensor],
) -> int:
    """Put a recorded state (:meth:`Trajectory.optimizer_state`) back into ``optimizer``; returns the parameters set.

    The flat rows are in the params layout of ``model`` (:class:`~trajectory.archive.layout.Layout`). Parameters
    outside the optimizer's groups, or whose recorded state is all zero (no state), keep none. A record taken before the first update (Adam step 0, or an
    all-zero SGD buffer) restores nothing: torch then starts the state itself, exactly as the recorded run did.
    """
    from .archive.layout import PARAMS, Layout

    layout = Layout.from_module(model)
    tensors = model.state_dict(keep_vars=True)
    entries = [e for e in layout.entries if e.dataset == PARAMS]
    params = [tensors[e.name] for e in entries]
    offsets = [e.offset for e in entries]
    keys = [k for k in recorded if k != "step"]
    step = recorded.get("step")
    step_value = float(step) if step is not None else float("nan")
    if not keys:
        return 0
    if step_value == step_value and step_value == 0.0:
        return 0
    if step_value != step_value and all(not torch.any(recorded[k] != 0) for k in keys):
        return 0
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    n = 0
    for p, off in zip(params, offsets):
        if id(p) not in in_groups:
            continue
        numel = p.numel()
        if all(not torch.any(recorded[k][off : off + numel] != 0) for k in keys):
            continue  # zeros are how the archive stores "no state" (frozen, or not yet stepped)
        st = optimizer.state[p]
        for k in keys:
            st[k] = recorded[k][off : off + numel].view(p.shape).to(device=p.device, dtype=p.dtype).clone()
        if step_value == step_value:
            group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
            on_device = bool(group.get("capturable") or group.get("fused"))
            st["step"] = torch.tensor(step_value, dtype=torch.float32, device=p.device if on_device else "cpu")
        n += 1
    return n
