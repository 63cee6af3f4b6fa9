"""Batched loss evaluation of many parameter vectors in one pass.

The naive way to measure a loss landscape loads one parameter vector into the model and loops a
DataLoader over the evaluation set, point after point. :class:`Evaluator` instead takes a stack of
K *state vectors* (parameters followed by floating buffers, in archive layout order), views them as
K batched state dicts without copying, and runs the model once per data chunk for all K points with
``torch.func.functional_call`` under ``torch.func.vmap``. Plain MLPs (``Flatten``/``Linear``/``ReLU``
sequences) take a faster route: batched matrix products (``baddbmm``) on the stacked weights.
Evaluation data stays on the device; K and the data are chunked so that the activations of one
pass stay within a fixed element budget (bounded memory whatever the model or data size).

BatchNorm policy (applied the same way for every metric; models without BatchNorm ignore it):

``eval``       every module in eval mode; running statistics come from the state vector, i.e. they
               are interpolated together with the parameters (the authors interpolate every
               state-dict entry).
``train``      BatchNorm layers use the statistics of each evaluation batch (the authors' choice);
               the data is split into batches of ``bn_batch`` samples (the whole minibatch for
               ``--eval minibatch``). Other modules (dropout) stay in eval mode so results are
               deterministic.
``recompute``  running statistics are re-estimated at every point from ``bn_batches`` fixed training
               batches of ``bn_batch`` samples (cumulative average), then the model is evaluated in
               eval mode.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ..archive.layout import BUFFERS, BUFFERS_INT, PARAMS, Layout
from .errors import AnalysisError

__all__ = ["Evaluator", "has_batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _mlp_plan(model: nn.Module, layout: Layout) -> list | None:
    """If ``model`` is a Sequential of Flatten/Linear/ReLU, the list of ops for the bmm fast path."""
    if not isinstance(model, nn.Sequential):
        return None
    plan = []
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


class Evaluator:
    """Mean loss and accuracy of a model at many state vectors at once.

    Parameters
    ----------
    model : nn.Module
        Template with the archive's layout (copied; the original is not touched).
    layout : Layout
        The archive's layout; a state vector is ``cat(params_row, buffers_row)``.
    device, dtype : where and in which precision to evaluate.
    bn : 'train' | 'eval' | 'recompute'
    loss : 'cross_entropy' (accuracy reported) or 'mse' (accuracy NaN).
    bn_batch : batch size for BatchNorm batch statistics ('train') and re-estimation ('recompute').
    recompute_batches : list of input tensors used to re-estimate running statistics ('recompute').
    max_elems : elements of the widest activation of one pass (points x samples x width); bounds memory
        and keeps a CPU pass in cache (default 2**20 on CPU, 2**26 on GPUs).
    max_points : most states evaluated in one pass (default: max(32, max_elems / (512 · widest activation))).
    fast_path : allow the bmm route for plain MLPs.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        bn: str = "train",
        loss: str = "cross_entropy",
        bn_batch: int = 100,
        recompute_batches: Sequence[torch.Tensor] = (),
        max_elems: int | None = None,
        max_points: int | None = None,
        fast_path: bool = True,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.layout = layout
        self.loss = loss
        self.bn_policy = bn
        self.bn_batch = max(2, int(bn_batch))
        if max_elems is None:  # cache-sized passes on CPU, large ones on GPUs
            max_elems = (1 << 20) if self.device.type == "cpu" else (1 << 26)
        self.max_elems = int(max_elems)
        self.max_points = None if max_points is None else int(max_points)
        m = copy.deepcopy(model)
        # keep integer buffers as they are; cast floating tensors only
        m = m.to(device=self.device)
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
        for p in m.parameters():
            p.requires_grad_(False)
        m.eval()
        self.model = m
        self.has_bn = has_batchnorm(m)
        self.n_params = layout.sizes[PARAMS]
        self.n_state = layout.sizes[PARAMS] + layout.sizes[BUFFERS]
        self._views = []  # (name, start, stop, shape) in the state vector
        for e in layout.entries:
            if e.dataset == PARAMS:
                self._views.append((e.name, e.offset, e.stop, e.shape))
            elif e.dataset == BUFFERS:
                self._views.append((e.name, self.n_params + e.offset, self.n_params + e.stop, e.shape))
        sd = m.state_dict()
        self._int_buffers = {e.name: sd[e.name] for e in layout.entries if e.dataset == BUFFERS_INT}
        self._bn_modules = [mod for mod in m.modules() if isinstance(mod, _BatchNorm)]
        self._bn_stat_names = set()
        for name, mod in m.named_modules():
            if isinstance(mod, _BatchNorm) and mod.track_running_stats:
                self._bn_stat_names.update({f"{name}.running_mean", f"{name}.running_var"})
        self.recompute_batches = [b.to(self.device, dtype) if b.is_floating_point() else b.to(self.device) for b in recompute_batches]
        if self.has_bn and bn == "recompute" and not self.recompute_batches:
            raise AnalysisError("--bn recompute needs training batches to re-estimate statistics")
        self._plan = _mlp_plan(m, layout) if fast_path else None
        self._act_per_sample: float | None = None
        self.points_evaluated = 0  # counts model evaluations at a point over a whole data set
        self.flops_per_sample = self._linear_flops() if self._plan else None

    # ------------------------------------------------------------------ helpers
    def _linear_flops(self) -> int:
        return sum(2 * self.layout[p[1]].numel for p in self._plan if p[0] == "linear")

    def _batched_state(self, states: torch.Tensor, clone_buffers: bool = False) -> dict[str, torch.Tensor]:
        k = states.shape[0]
        out = {}
        for name, start, stop, shape in self._views:
            v = states[:, start:stop]
            if clone_buffers and start >= self.n_params:
                v = v.clone()
            out[name] = v.reshape(k, *shape)
        return out

    def _probe(self, x: torch.Tensor) -> float:
        """Widest activation per sample and point (largest leaf-module output)."""
        if self._act_per_sample is not None:
            return self._act_per_sample
        total = [0]

        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                total[0] = max(total[0], out.numel())

        hooks = [mod.register_forward_hook(hook) for mod in self.model.modules() if not list(mod.children())]
        try:
            xs = x[: min(2, len(x))]
            with torch.no_grad():
                self.model.eval()
                self.model(xs)
        finally:
            for h in hooks:
                h.remove()
        self._act_per_sample = max(1.0, total[0] / max(1, len(xs)), float(x[0].numel()))
        return self._act_per_sample

    def _per_sample(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample loss (K, n) in float64 and per-sample correctness (K, n) or None."""
        if self.loss == "cross_entropy":
            if out.dim() != 3:
                out = out.reshape(out.shape[0], out.shape[1], -1)
            # one max pass gives both the log-sum-exp shift and the predicted class (torch.logsumexp plus
            # argmax over a short class dimension is several times slower on CPU)
            mx, pred = out.max(-1)
            lse = (out - mx.unsqueeze(-1)).exp_().sum(-1).log_().add_(mx)
            picked = out.gather(-1, y.view(1, -1, 1).expand(out.shape[0], -1, 1)).squeeze(-1)
            loss = (lse - picked).to(torch.float64)
            correct = (pred == y.view(1, -1)).to(torch.float64)
            return loss, correct
        # mse: mean over the non-batch dimensions of each sample
        yy = y.to(out.dtype).reshape(1, out.shape[1], *out.shape[2:]) if y.numel() == out[0].numel() else y.to(out.dtype).view(1, out.shape[1], -1)
        diff = (out.reshape(out.shape[0], out.shape[1], -1) - yy.reshape(1, out.shape[1], -1)).to(torch.float64)
        return diff.pow(2).mean(-1), None

    def _forward(self, states_or_dict, x: torch.Tensor, kb: int) -> torch.Tensor:
        """Outputs (K, n, ...) for K batched state dicts at the inputs x (shared)."""
        if self._plan is not None and not (self.has_bn):
            return self._forward_mlp(states_or_dict, x, kb)
        sd = states_or_dict
        ints = self._int_buffers
        model = self.model

        def f(p):
            return functional_call(model, (p, ints), (x,))

        return vmap(f)(sd)

    def _first_layer_lines(self, lines):
        """Weights of the first Linear layer at the lines' ends: (Wa, ba, Wd, bd, inverse index, t)."""
        ops = [p for p in self._plan if p[0] != "flatten"]
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
        la = A[uniq].to(self.device, self.dtype)
        lb = B[uniq].to(self.device, self.dtype)
        we = self.layout[wname]
        u = la.shape[0]
        wa = la[:, we.offset : we.stop].view(u, *we.shape)
        wd = (lb[:, we.offset : we.stop] - la[:, we.offset : we.stop]).view(u, *we.shape)
        if bname is not None:
            be = self.layout[bname]
            ba = la[:, be.offset : be.stop].view(u, 1, -1)
            bd = (lb[:, be.offset : be.stop] - la[:, be.offset : be.stop]).view(u, 1, -1)
        else:
            ba = bd = None
        return wa, ba, wd, bd, runs, t.view(-1, 1, 1)

    def _forward_mlp(self, states: torch.Tensor, x: torch.Tensor, kb: int, first=None) -> torch.Tensor:
        h = x
        n = x.shape[0]
        batched = False
        for op in self._plan:
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
                we = self.layout[op[1]]
                w = states[:, we.offset : we.stop].view(kb, *we.shape)  # (K, out, in)
                if not batched:
                    h2 = h.reshape(n, -1)
                    h = h2.unsqueeze(0).expand(kb, n, h2.shape[1])
                    batched = True
                if op[2] is not None:
                    be = self.layout[op[2]]
                    b = states[:, be.offset : be.stop].view(kb, 1, be.shape[0])
                    h = torch.baddbmm(b, h, w.transpose(1, 2))
                else:
                    h = torch.bmm(h, w.transpose(1, 2))
        return h

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bn_batch: int | None = None,
                 lines: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean loss and accuracy over (x, y) at each row of ``states`` (K, n_state); float64 arrays.

        ``bn_batch`` overrides the BatchNorm batch size of the 'train' policy for this call (the
        engine passes the minibatch size for ``--eval minibatch``, so BN sees exactly that batch).
        ``lines = (A, B, owner, t)`` optionally tells that ``states[k] = A[owner[k]] + t[k]·(B − A)[owner[k]]``;
        the MLP path then computes the first layer once per line (it is affine in the weights:
        W(t)x = W_A x + t·(W_B − W_A)x) instead of once per point.
        """
        if states.dim() != 2 or states.shape[1] != self.n_state:
            raise AnalysisError(f"state vectors must be (K, {self.n_state}), got {tuple(states.shape)}")
        states = states.to(self.device, self.dtype)
        k_all = states.shape[0]
        n = x.shape[0]
        if n == 0:
            raise AnalysisError("the evaluation data is empty")
        loss_sum = np.zeros(k_all)
        corr_sum = np.zeros(k_all)
        act = self._probe(x)
        mp = self.max_points if self.max_points is not None else max(32, int(self.max_elems // (512 * act)))
        kc_max = max(1, min(mp, k_all))
        owner = lines[2] if lines is not None else None
        k0 = 0
        while k0 < k_all:
            k1 = min(k0 + kc_max, k_all)
            if owner is not None and k1 < k_all and owner[k1] == owner[k1 - 1]:
                # end the pass at a line boundary, so each pass holds whole lines (first-layer sharing)
                cut = k1 - 1
                while cut > k0 and owner[cut] == owner[cut - 1]:
                    cut -= 1
                if cut > k0:
                    k1 = cut
            st = states[k0:k1]
            kb = k1 - k0
            sub = None
            if lines is not None:
                sub = (lines[0], lines[1], lines[2][k0:k1].to(self.device), lines[3][k0:k1].to(self.device, self.dtype))
            ls, cs = self._evaluate_chunk(st, x, y, act, bn_batch or self.bn_batch, sub)
            loss_sum[k0:k1] = ls
            corr_sum[k0:k1] = cs
            k0 = k1
        self.points_evaluated += k_all
        acc = corr_sum / n if self.loss == "cross_entropy" else np.full(k_all, np.nan)
        return loss_sum / n, acc

    def _data_chunks(self, n: int, kb: int, act: float) -> list[tuple[int, int]]:
        nc = max(1, int(self.max_elems // max(1.0, kb * act)))
        nc = min(n, max(nc, 16))
        return [(s, min(n, s + nc)) for s in range(0, n, nc)]

    def _evaluate_chunk(self, st: torch.Tensor, x, y, act, bn_batch: int, lines=None) -> tuple[np.ndarray, np.ndarray]:
        kb = st.shape[0]
        n = x.shape[0]
        loss_sum = torch.zeros(kb, dtype=torch.float64, device=self.device)
        corr_sum = torch.zeros(kb, dtype=torch.float64, device=self.device)
        policy = self.bn_policy if self.has_bn else "eval"
        if policy == "eval":
            self.model.eval()
            fast = self._plan is not None and not self.has_bn
            arg = st if fast else self._batched_state(st)
            first = self._first_layer_lines(lines) if (fast and lines is not None) else None
            for s, e in self._data_chunks(n, kb, act):
                out = self._forward_mlp(st, x[s:e], kb, first) if fast else self._forward(arg, x[s:e], kb)
                l, c = self._per_sample(out, y[s:e])
                loss_sum += l.sum(1)
                if c is not None:
                    corr_sum += c.sum(1)
        elif policy == "train":
            # batch statistics of each evaluation batch; the running-stat updates land in a clone
            sd = self._batched_state(st, clone_buffers=True)
            nb = max(1, math.ceil(n / max(2, bn_batch)))
            if n // nb < 2:
                nb = max(1, n // 2)
            self._set_bn_train(True)
            try:
                for idx in torch.tensor_split(torch.arange(n, device=self.device), nb):
                    s, e = int(idx[0]), int(idx[-1]) + 1
                    out = self._forward(sd, x[s:e], kb)
                    l, c = self._per_sample(out, y[s:e])
                    loss_sum += l.sum(1)
                    if c is not None:
                        corr_sum += c.sum(1)
            finally:
                self._set_bn_train(False)
        elif policy == "recompute":
            sd = self._batched_state(st, clone_buffers=True)
            for name in self._bn_stat_names:
                if name.endswith("running_mean"):
                    sd[name].zero_()
                else:
                    sd[name].fill_(1.0)
            momenta = [mod.momentum for mod in self._bn_modules]
            self._set_bn_train(True)
            try:
                for j, xb in enumerate(self.recompute_batches):
                    for mod in self._bn_modules:
                        mod.momentum = 1.0 / (j + 1)
                    self._forward(sd, xb, kb)
            finally:
                self._set_bn_train(False)
                for mod, mom in zip(self._bn_modules, momenta):
                    mod.momentum = mom
            self.model.eval()
            for s, e in self._data_chunks(n, kb, act):
                out = self._forward(sd, x[s:e], kb)
                l, c = self._per_sample(out, y[s:e])
                loss_sum += l.sum(1)
                if c is not None:
                    corr_sum += c.sum(1)
        else:  # pragma: no cover - validated earlier
            raise AnalysisError(f"unknown BatchNorm policy {policy!r}")
        return loss_sum.cpu().numpy(), corr_sum.cpu().numpy()

    def _set_bn_train(self, flag: bool) -> None:
        self.model.eval()
        if flag:
            for mod in self._bn_modules:
                mod.train()
