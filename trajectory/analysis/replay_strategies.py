"""Ways to run a model at K state vectors on a chunk of data; the evaluator picks one per model by timing.

Every strategy computes the same function (the model's outputs at each point, shape ``(K, n, ...)``) and differs
only in how the work is laid out, which decides the speed on a given model and device:

``mlp``      plain ``Flatten/Linear/ReLU`` MLPs: batched matrix products (``baddbmm``) on the stacked weights;
             the first layer is shared along lines at the weight level (two products per line).
``vmap``     ``vmap(functional_call)`` over the K stacked state dicts: one model call per data chunk for all
             points. Pays on small models where per-call overhead dominates; slow where batching rules are
             missing or poor (grouped convolutions, pooling with indices, fused attention kernels).
``loop``     one ``functional_call`` per point over large sample chunks, the state dict being views into the
             state vector (no copy): the model's own kernels at full batch size.
``loop_cl``  ``loop`` with 4-D convolution weights and inputs in channels-last memory format (oneDNN/cuDNN's
             preferred layout for 2-D convolutions).

The evaluator wraps any of them with the BatchNorm policy (grouped batch statistics, recomputed running
statistics) and, for ``vmap``/``loop``/``loop_cl``, the shared affine first layer (:mod:`.first_layer`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..archive.layout import PARAMS, Layout
from .first_layer import SharedLines

__all__ = ["Strategy", "MlpStrategy", "VmapStrategy", "LoopStrategy", "mlp_plan", "STRATEGIES"]


def mlp_plan(model: nn.Module, layout: Layout) -> list | None:
    """If ``model`` is a Sequential of Flatten/Linear/ReLU, the list of ops for the bmm route."""
    if not isinstance(model, nn.Sequential):
        return None
    plan: list[tuple] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return None
            plan.append(("flatten",))
        elif isinstance(m, nn.Linear):
            wname, bname = f"{name}.weight", f"{name}.bias"
            if wname not in layout or layout[wname].dataset != PARAMS:
                return None
            has_b = m.bias is not None
            if has_b and (bname not in layout or layout[bname].dataset != PARAMS):
                return None
            plan.append(("linear", wname, bname if has_b else None))
        elif isinstance(m, nn.ReLU):
            plan.append(("relu",))
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue  # dropout is off in evaluation
        else:
            return None
    if not any(p[0] == "linear" for p in plan) or plan[-1][0] != "linear":
        return None
    return plan


class Strategy:
    """How K points are run on a data chunk. ``per_point``: one model call per point (sample chunks are sized
    for one point's activations, not K points')."""

    name = ""
    per_point = False
    shares_internally = False  # the strategy shares the first layer itself (from the lines' weights)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def prepare(self, ev: Any, st: torch.Tensor, clone_buffers: bool, lines=None) -> Any:
        raise NotImplementedError

    def forward(self, ev: Any, handle: Any, x: torch.Tensor, shared: SharedLines | None) -> torch.Tensor:
        raise NotImplementedError


class VmapStrategy(Strategy):
    name = "vmap"

    def prepare(self, ev, st, clone_buffers, lines=None):
        return ev._batched_state(st, clone_buffers=clone_buffers)

    def forward(self, ev, handle, x, shared):
        model, ints = ev.model, ev._int_buffers
        if shared is None:
            return vmap(lambda p: functional_call(model, (p, ints), (x,)))(handle)
        holder = ev._first_holder

        def f(p, pre):
            holder[0] = pre
            return functional_call(model, (p, ints), (x,))

        with ev._first_swapped():
            return vmap(f)(handle, shared.all())


class LoopStrategy(Strategy):
    per_point = True

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last
        self.name = "loop_cl" if channels_last else "loop"

    def adapt_input(self, x):
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, ev, st, clone_buffers, lines=None):
        out = []
        for k in range(st.shape[0]):
            row = st[k]
            d = {}
            for name, start, stop, shape in ev._views:
                v = row[start:stop].view(shape)
                if clone_buffers and start >= ev.n_params:
                    v = v.clone()
                elif self.channels_last and len(shape) == 4:
                    v = v.contiguous(memory_format=torch.channels_last)
                d[name] = v
            d.update(ev._int_buffers)
            out.append(d)
        return out

    def forward(self, ev, handle, x, shared):
        model = ev.model
        if shared is None:
            return torch.stack([functional_call(model, p, (x,)) for p in handle])
        holder = ev._first_holder
        outs = []
        with ev._first_swapped():
            for k, p in enumerate(handle):
                holder[0] = shared.point(k)
                outs.append(functional_call(model, p, (x,)))
        return torch.stack(outs)


class MlpStrategy(Strategy):
    name = "mlp"
    shares_internally = True

    def prepare(self, ev, st, clone_buffers, lines=None):
        return st, (self._first_layer_lines(ev, lines) if lines is not None else None)

    def forward(self, ev, handle, x, shared):
        st, first = handle
        return self._forward_mlp(ev, st, x, st.shape[0], first)

    @staticmethod
    def _first_layer_lines(ev, lines):
        """Weights of the first Linear layer at the lines' ends: (Wa, ba, Wd, bd, runs, t), or None."""
        ops = [p for p in ev._plan if p[0] != "flatten"]
        if not ops or ops[0][0] != "linear":
            return None
        _, wname, bname = ops[0]
        A, B, owner, t = lines
        uniq, inv = torch.unique(owner, return_inverse=True)
        if 3 * len(uniq) > len(owner):  # fewer than 3 points per line: two products per line do not pay
            return None
        # runs of consecutive points on the same line (evaluate_lines keeps a line's points together)
        change = torch.nonzero(inv[1:] != inv[:-1]).flatten().tolist()
        starts = [0] + [c + 1 for c in change]
        stops = [c + 1 for c in change] + [len(inv)]
        runs = [(a, b, int(inv[a])) for a, b in zip(starts, stops)]
        la = A[uniq.to(A.device)].to(ev.device, ev.dtype)
        lb = B[uniq.to(B.device)].to(ev.device, ev.dtype)
        we = ev.layout[wname]
        u = la.shape[0]
        wa = la[:, we.offset : we.stop].view(u, *we.shape)
        wd = (lb[:, we.offset : we.stop] - la[:, we.offset : we.stop]).view(u, *we.shape)
        if bname is not None:
            be = ev.layout[bname]
            ba = la[:, be.offset : be.stop].view(u, 1, -1)
            bd = (lb[:, be.offset : be.stop] - la[:, be.offset : be.stop]).view(u, 1, -1)
        else:
            ba = bd = None
        return wa, ba, wd, bd, runs, t.view(-1, 1, 1)

    @staticmethod
    def _forward_mlp(ev, states, x, kb, first=None):
        h = x
        n = x.shape[0]
        batched = False
        for op in ev._plan:
            if op[0] == "linear" and not batched and first is not None:
                wa, ba, wd, bd, runs, t = first
                u = wa.shape[0]
                xe = h.reshape(n, -1).unsqueeze(0).expand(u, n, wa.shape[2])
                base = torch.bmm(xe, wa.transpose(1, 2)) if ba is None else torch.baddbmm(ba, xe, wa.transpose(1, 2))
                delta = torch.bmm(xe, wd.transpose(1, 2)) if bd is None else torch.baddbmm(bd, xe, wd.transpose(1, 2))
                width = base.shape[2]
                if len(runs) == 1:
                    h = torch.addcmul(base.expand(kb, n, width), t, delta.expand(kb, n, width))
                else:
                    h = torch.empty(kb, n, width, dtype=base.dtype, device=base.device)
                    for a, b, li in runs:
                        torch.addcmul(base[li].expand(b - a, n, width), t[a:b], delta[li].expand(b - a, n, width), out=h[a:b])
                batched = True
                continue
            if op[0] == "flatten":
                h = h.reshape(h.shape[0], -1) if not batched else h.reshape(h.shape[0], h.shape[1], -1)
            elif op[0] == "relu":
                h = h.relu_() if batched else torch.relu(h)
            else:
                we = ev.layout[op[1]]
                w = states[:, we.offset : we.stop].view(kb, *we.shape)  # (K, out, in)
                if not batched:
                    h2 = h.reshape(n, -1)
                    h = h2.unsqueeze(0).expand(kb, n, h2.shape[1])
                    batched = True
                if op[2] is not None:
                    be = ev.layout[op[2]]
                    b = states[:, be.offset : be.stop].view(kb, 1, be.shape[0])
                    h = torch.baddbmm(b, h, w.transpose(1, 2))
                else:
                    h = torch.bmm(h, w.transpose(1, 2))
        return h


#: Strategy names a user may force (``Evaluator(strategy=...)``).
STRATEGIES = ("mlp", "vmap", "loop", "loop_cl")


def make_strategy(name: str) -> Strategy:
    if name == "mlp":
        return MlpStrategy()
    if name == "vmap":
        return VmapStrategy()
    if name in ("loop", "loop_cl"):
        return LoopStrategy(channels_last=name == "loop_cl")
    raise ValueError(name)
