"""An autograd-capable loss over a flat parameter vector, with Hessian- and GGN-vector products.

:class:`Objective` is the mean loss L(p) = (1/N) Σ_i ℓ(f(x_i; p), y_i) of a model over fixed data, as a
function of the flat parameter vector ``p`` (archive layout order, ``n_params`` entries). Buffers (BatchNorm
running statistics) are held fixed at the values of the state the objective was built for. The data are
processed in batches and every product is the batch-size-weighted sum of per-batch products,
Σ_b (n_b/N)·H_b v, so the result does not depend on the batching (except under the BatchNorm 'train'
policy, where the batches *are* the BatchNorm batches, exactly as the analyzer's evaluator forms them).

BatchNorm policies (same meaning as for loss evaluation, see :mod:`trajectory.analysis.evaluator`):

``eval``       eval mode; running statistics are those of the state (interpolated along segments).
``train``      batch statistics of each evaluation batch of ``bn_batch`` samples; the statistics are a
               function of p and are differentiated through (the authors' protocol: train mode).
``recompute``  running statistics re-estimated at p from the fixed recompute batches, then held
               *constant* while differentiating (the Hessian of the eval-mode loss at those statistics).

Hessian-vector products:

``hvp="rev"``  (default) double backprop, ``torch.autograd.grad(g·v, p)`` with ``create_graph=True``; several
               vectors share one graph of the gradient, and while the whole data's activations fit a budget the
               graphs of every batch are kept between products at the same p (:attr:`Objective.keeps_graph`), so
               each further product is one double-backward pass (bit-identical; Lanczos applies H many times
               at one point).
``hvp="fwd"``  forward-over-reverse, ``torch.func.jvp(torch.func.grad(L_b), (p,), (v,))``; several vectors
               share one pass through ``torch.func.vmap`` over the tangents (:meth:`Objective.hvp_many`).

Which mode and chunk are fastest depends on model and device: :mod:`.autotune` measures them (``hvp=auto`` of the
curvature metrics). Every loss, gradient and product is reported through :attr:`Objective.on_samples` in
sample-forward equivalents (progress).

``operator="ggn"`` replaces H by the generalised Gauss-Newton matrix G = Jᵀ H_ℓ J (positive semi-definite
for cross-entropy and mse), computed as a jvp followed by a vjp.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

# torch's forward-mode AD loads its jvp decompositions through torch.jit.script on first use, which warns that
# jit.script is deprecated: torch's own internals, nothing a user can act on, printed in the middle of `analyze`.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__all__ = ["Objective", "HVP_MODES", "OPERATORS", "COST_LOSS", "COST_GRAD", "COST_HVP"]

HVP_MODES = ("fwd", "rev")
OPERATORS = ("hessian", "ggn")

#: work per sample in sample-forward equivalents (one sample through the model at one point = 1), for progress
COST_LOSS, COST_GRAD, COST_HVP = 1.0, 3.0, 5.0

#: activation elements (per pass) that one data chunk may hold; bounds the memory of an HVP.
DEFAULT_BUDGET_CPU = 1 << 24
DEFAULT_BUDGET_GPU = 1 << 27
#: activation elements of the whole data up to which rev-mode products keep their gradient graphs (Objective.keeps_graph)
KEEP_BUDGET_CPU = 1 << 25
KEEP_BUDGET_GPU = 1 << 28


def _loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "cross_entropy":
        return lambda out, y: F.cross_entropy(out.reshape(out.shape[0], -1), y)
    if kind == "mse":
        return lambda out, y: (out.reshape(out.shape[0], -1) - y.reshape(out.shape[0], -1).to(out.dtype)).pow(2).mean()
    raise ValueError(f"unknown loss {kind!r}")


class Objective:
    """Mean loss over fixed data as a function of a flat parameter vector (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Template (deep-copied here); its floating tensors are cast to ``dtype`` on ``device``.
    param_views : list of (name, start, stop, shape)
        Where each parameter lives in the flat vector.
    buffers : dict name -> tensor
        Buffer values (floating and integer) held fixed.
    x, y : evaluation data (already on the device).
    loss : 'cross_entropy' | 'mse'
    bn : 'eval' | 'train' | 'recompute' (models without BatchNorm: any, ignored)
    bn_batch : BatchNorm batch size under 'train'.
    recompute_batches : inputs that re-estimate running statistics under 'recompute'.
    p0 : the parameter vector at which 'recompute' estimates statistics (required for 'recompute').
    chunk : samples per data chunk for 'eval'/'recompute' (default from an activation budget).
    """

    def __init__(self, model: nn.Module, param_views, buffers: dict, x: torch.Tensor, y: torch.Tensor, *,
                 loss: str = "cross_entropy", bn: str = "eval", bn_batch: int = 100,
                 recompute_batches: Sequence[torch.Tensor] = (), p0: torch.Tensor | None = None,
                 chunk: int | None = None, hvp: str = "rev", operator: str = "hessian", keep_graph: bool | None = None):
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        if operator not in OPERATORS:
            raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
        if len(x) == 0:
            raise ValueError("the evaluation data is empty")
        self.x, self.y = x, y
        self.device = x.device
        self.dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        m = copy.deepcopy(model).to(self.device)
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(self.dtype)
            t.requires_grad_(False)
        m.eval()
        self.model = m
        self.param_views = [tuple(v) for v in param_views]
        self.n = max(v[2] for v in self.param_views) if self.param_views else 0
        self.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.loss_kind = loss
        self._loss = _loss_fn(loss)
        self.hvp_mode = hvp
        self.operator = operator
        self.n_data = len(x)
        self._per_sample: float | None = None
        #: keep the rev-mode gradient graphs between products at one p: None = when they fit (see keeps_graph)
        self.keep_graph = keep_graph
        self._graphs: tuple[Any, int, list] | None = None
        bn_mods = [mod for mod in m.modules() if isinstance(mod, _BatchNorm)]
        self.bn = bn if bn_mods else "eval"
        if self.bn == "train":
            for mod in bn_mods:  # batch statistics, no running-stat updates (pure function of p)
                mod.train()
                mod.track_running_stats = False
        elif self.bn == "recompute":
            if p0 is None or not recompute_batches:
                raise ValueError("bn='recompute' needs p0 and recompute batches")
            self._recompute_stats(bn_mods, p0, recompute_batches)
        # batches: BatchNorm batches under 'train', memory-bounded chunks otherwise
        if self.bn == "train":
            nb = max(1, math.ceil(self.n_data / max(2, int(bn_batch))))
            if self.n_data // nb < 2:
                nb = max(1, self.n_data // 2)
        else:
            if chunk is None:
                chunk = self.default_chunk()
            nb = max(1, math.ceil(self.n_data / max(1, int(chunk))))
        self._split(nb)
        self.hvps = 0  # Hessian-vector products computed (one vector = one product)
        self.grads = 0
        self.losses = 0
        self._reduce: Callable[[torch.Tensor], Any] | None = None
        #: called with the work done, in sample-forward equivalents (one sample through the model = 1, a gradient
        #: ~3, a Hessian-vector product ~5), after every loss, gradient and product; the analyzer's progress bar
        self.on_samples: Callable[[float], Any] | None = None

    def _split(self, nb: int) -> None:
        idx = torch.tensor_split(torch.arange(self.n_data), nb)
        self.batches = [(int(i[0]), int(i[-1]) + 1) for i in idx if len(i)]
        self._graphs = None

    @property
    def chunk(self) -> int:
        """Samples in the largest data batch (the BatchNorm batch under 'train', a memory chunk otherwise)."""
        return max(e - s for s, e in self.batches)

    @property
    def rechunkable(self) -> bool:
        """Whether the data batches may be re-cut: not under BatchNorm 'train' (there they are the BatchNorm
        batches, part of the function) and not once :meth:`shard`-ed (every rank must cut alike)."""
        return self.bn != "train" and self._reduce is None

    def rechunk(self, chunk: int) -> "Objective":
        """Process the data in batches of about ``chunk`` samples (only the summation order changes; see
        :attr:`rechunkable`). Returns self."""
        if not self.rechunkable:
            raise ValueError("the data batches of this objective cannot be re-cut (BatchNorm 'train' or sharded)")
        self._split(max(1, math.ceil(self.n_data / max(1, int(chunk)))))
        return self

    @property
    def local_samples(self) -> int:
        """Samples this process evaluates per pass (all of them unless :meth:`shard`-ed)."""
        return sum(e - s for s, e in self.batches)

    def _report(self, per_sample: float) -> None:
        if self.on_samples is not None:
            self.on_samples(per_sample * self.local_samples)

    def shard(self, rank: int, world: int, all_reduce: Callable[[torch.Tensor], Any]) -> "Objective":
        """Split the data batches across ``world`` processes (batch j goes to rank j mod world) and sum every
        loss, gradient and product over processes with ``all_reduce`` (in place). Each batch keeps its
        weight n_b/N of the whole data, so the reduced values equal the single-process ones up to float
        summation order, under every BatchNorm policy (the batches are the same). Iterative solvers then
        see identical products on every rank and stay in lockstep."""
        if world > 1:
            if self.bn != "train" and len(self.batches) < world:
                # chunks only bound memory here (not BatchNorm batches): cut finer so every rank has work
                idx = torch.tensor_split(torch.arange(self.n_data), min(world, self.n_data))
                self.batches = [(int(i[0]), int(i[-1]) + 1) for i in idx if len(i)]
            self.batches = self.batches[rank::world]
            self._reduce = all_reduce
            self._graphs = None
        return self

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self._reduce is not None:
            self._reduce(t)
        return t

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_model(cls, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> tuple["Objective", torch.Tensor]:
        """Objective over ``model``'s parameters (named_parameters order) and its current parameter vector."""
        views, pos, flat = [], 0, []
        for name, p in model.named_parameters():
            views.append((name, pos, pos + p.numel(), tuple(p.shape)))
            pos += p.numel()
            flat.append(p.detach().reshape(-1))
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        p0 = torch.cat(flat).to(x.device, x.dtype)
        if kw.get("bn") == "recompute" and "p0" not in kw:
            kw["p0"] = p0
        return cls(model, views, buffers, x, y, **kw), p0

    def activation_elements(self) -> float:
        """Activation elements one sample produces in a forward pass (leaf-module outputs, measured once on two
        samples): what the memory budgets of chunks and kept graphs are counted in."""
        if self._per_sample is None:
            total = [0]

            def hook(_m, _i, out):
                if isinstance(out, torch.Tensor):
                    total[0] += out.numel()

            hooks = [mod.register_forward_hook(hook) for mod in self.model.modules() if not list(mod.children())]
            xs = self.x[: min(2, self.n_data)]
            try:
                with torch.no_grad():
                    self.model(xs)
            finally:
                for h in hooks:
                    h.remove()
            self._per_sample = max(1.0, total[0] / len(xs))
        return self._per_sample

    def default_chunk(self) -> int:
        """Samples per chunk such that one pass holds about a fixed number of activation elements
        (``DEFAULT_BUDGET_CPU`` / ``_GPU``), measured by a forward pass of two samples."""
        budget = DEFAULT_BUDGET_CPU if self.device.type == "cpu" else DEFAULT_BUDGET_GPU
        return int(max(16, min(self.n_data, budget // self.activation_elements())))

    @property
    def keeps_graph(self) -> bool:
        """Whether ``hvp="rev"`` keeps the gradient graphs of all its data batches between products at the same p
        (Lanczos, Hutch++ and SLQ apply the operator many times at one point): then each further product is one
        double-backward pass instead of forward + backward + double-backward, bit-identical and 1.6-2.8x faster on
        conv nets (benchmarks/bench_curvature.py). Only when the whole data's activations fit ``KEEP_BUDGET_*``."""
        if self.keep_graph is not None:
            return bool(self.keep_graph)
        budget = KEEP_BUDGET_CPU if self.device.type == "cpu" else KEEP_BUDGET_GPU
        return self.local_samples * self.activation_elements() <= budget

    def _params(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: p[s:e].view(shape) for name, s, e, shape in self.param_views}

    def _recompute_stats(self, bn_mods, p0: torch.Tensor, batches) -> None:
        bufs = {k: v.clone() for k, v in self.buffers.items()}
        names = [name for name, mod in self.model.named_modules() if isinstance(mod, _BatchNorm) and mod.track_running_stats]
        for name in names:
            bufs[f"{name}.running_mean"].zero_()
            bufs[f"{name}.running_var"].fill_(1.0)
        momenta = [mod.momentum for mod in bn_mods]
        try:
            for mod in bn_mods:
                mod.train()
            with torch.no_grad():
                params = self._params(p0.to(self.device, self.dtype))
                for j, xb in enumerate(batches):
                    for mod in bn_mods:
                        mod.momentum = 1.0 / (j + 1)
                    functional_call(self.model, (params, bufs), (xb.to(self.device, self.dtype),))
        finally:
            for mod, mom in zip(bn_mods, momenta):
                mod.momentum = mom
                mod.eval()
        self.buffers = bufs

    # ------------------------------------------------------------------ functions of p
    def _out(self, p: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return functional_call(self.model, (self._params(p), self.buffers), (self.x[s:e],))

    def _batch_loss(self, p: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return self._loss(self._out(p, s, e), self.y[s:e])

    def _w(self, s: int, e: int) -> float:
        return (e - s) / self.n_data

    def loss(self, p: torch.Tensor) -> float:
        """L(p) (no gradient)."""
        with torch.no_grad():
            local = sum(self._w(s, e) * float(self._batch_loss(p, s, e)) for s, e in self.batches)
        self.losses += 1
        self._report(COST_LOSS)
        return float(self._sum(torch.tensor([float(local)], dtype=torch.float64, device=self.device))[0])

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        """L(p) as a differentiable tensor (for torch.autograd, e.g. torch.autograd.functional.hessian).
        Over this process's batches only when the objective is :meth:`shard`-ed."""
        return sum(self._w(s, e) * self._batch_loss(p, s, e) for s, e in self.batches)

    def loss_grad(self, p: torch.Tensor) -> tuple[float, torch.Tensor]:
        """L(p) and ∇L(p)."""
        # torch.autograd.grad, not torch.func.grad: bit-identical gradients, and without functorch's wrapping
        # about 1.5x faster on conv nets with BatchNorm (benchmarks/bench_curvature.py)
        q = p.detach().clone().requires_grad_(True)
        g = torch.zeros_like(q)
        total = 0.0
        with torch.enable_grad():
            for s, e in self.batches:
                lb = self._batch_loss(q, s, e)
                g.add_(torch.autograd.grad(lb, q)[0], alpha=self._w(s, e))
                total += self._w(s, e) * float(lb.detach())
        self.grads += 1
        self._report(COST_GRAD)
        if self._reduce is not None:  # one collective for loss and gradient together
            both = self._sum(torch.cat([g, torch.tensor([total], dtype=g.dtype, device=g.device)]))
            return float(both[-1]), both[:-1]
        return total, g

    # ------------------------------------------------------------------ curvature products
    def hvp(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H(p)·v (or G(p)·v for operator='ggn') for one vector v (n,)."""
        return self.hvp_many(p, v.unsqueeze(0))[0]

    def hvp_many(self, p: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """H(p)·v for every row v of V (k, n); rows share the forward pass where the mode allows it."""
        p_in = p
        p = p.detach()
        V = V.to(p.dtype)
        out = torch.zeros_like(V)
        if self.operator == "hessian" and self.hvp_mode == "rev" and self.keeps_graph:
            for (s, e), (q, g) in zip(self.batches, self._kept_graphs(p_in)):
                out.add_(self._rev_apply(q, g, V, keep=True), alpha=self._w(s, e))
        else:
            self._graphs = None
            for s, e in self.batches:
                out.add_(self.batch_products(p, V, s, e), alpha=self._w(s, e))
        self.hvps += V.shape[0]
        self._report(COST_HVP * V.shape[0])
        return self._sum(out)

    def batch_products(self, p: torch.Tensor, V: torch.Tensor, s: int, e: int, mode: str | None = None) -> torch.Tensor:
        """H_b·v (the Hessian of the mean loss of samples s:e) for every row v of V, by ``mode`` (default
        :attr:`hvp_mode`); unweighted, not counted, not reduced. The unit :mod:`.autotune` times."""
        mode = mode or self.hvp_mode
        if self.operator == "ggn":
            return self._ggn_batch(p, V, s, e)
        if mode == "fwd":
            f = lambda q: self._batch_loss(q, s, e)  # noqa: E731
            gf = grad(f)
            one = lambda v: jvp(gf, (p,), (v,))[1]  # noqa: E731
            return vmap(one)(V) if V.shape[0] > 1 else one(V[0]).unsqueeze(0)
        q, g = self._rev_graph(p, s, e)
        return self._rev_apply(q, g, V, keep=False)

    def _rev_graph(self, p: torch.Tensor, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, ∇L_b(q)) with the graph of the gradient kept for double backprop; q a leaf copy of p."""
        q = p.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(self._batch_loss(q, s, e), q, create_graph=True)[0]
        return q, g

    @staticmethod
    def _rev_apply(q: torch.Tensor, g: torch.Tensor, V: torch.Tensor, keep: bool) -> torch.Tensor:
        """H_b·v for every row v of V by backprop through the gradient's graph (kept afterwards when ``keep``)."""
        out = torch.empty_like(V)
        with torch.enable_grad():
            for j in range(V.shape[0]):
                out[j] = torch.autograd.grad(g, q, grad_outputs=V[j], retain_graph=keep or j + 1 < V.shape[0])[0]
        return out

    def _kept_graphs(self, p: torch.Tensor) -> list:
        """The gradient graphs of every batch at p, built on the first product at p and kept until a product at
        another p (identified by the very tensor object and its version counter: the caller's p is held, so its
        memory cannot be reused by another vector)."""
        if self._graphs is not None and self._graphs[0] is p and self._graphs[1] == p._version:
            return self._graphs[2]
        self._graphs = None  # free the previous point's graphs first
        pd = p.detach()
        self._graphs = (p, p._version, [self._rev_graph(pd, s, e) for s, e in self.batches])
        return self._graphs[2]

    def release(self) -> None:
        """Drop kept gradient graphs (they also go with the objective)."""
        self._graphs = None

    def _ggn_batch(self, p: torch.Tensor, V: torch.Tensor, s: int, e: int) -> torch.Tensor:
        f = lambda q: self._out(q, s, e)  # noqa: E731
        out, vjp_fn = vjp(f, p)
        nb = e - s
        res = []
        for j in range(V.shape[0]):
            _, jv = jvp(f, (p,), (V[j],))
            o = out.reshape(nb, -1)
            u = jv.reshape(nb, -1)
            if self.loss_kind == "cross_entropy":
                sm = torch.softmax(o, -1)
                hu = (sm * u - sm * (sm * u).sum(-1, keepdim=True)) / nb
            else:
                hu = u * (2.0 / (nb * o.shape[1]))
            res.append(vjp_fn(hu.reshape(out.shape))[0])
        return torch.stack(res)

    def matmat(self, p: torch.Tensor, block: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
        """V (k, n) -> H·V rows, in blocks of ``block`` vectors (memory of vmap grows with the block)."""

        def mm(V: torch.Tensor) -> torch.Tensor:
            if V.dim() == 1:
                return self.hvp(p, V)
            return torch.cat([self.hvp_many(p, V[i : i + block]) for i in range(0, V.shape[0], block)])

        return mm


def objective_for(ctx: Any, state: torch.Tensor, pair: int, **kw: Any) -> "Objective | None":
    """The :class:`Objective` of a replay context at ``state``: the run's model, loss, device, dtype, BatchNorm
    policy and evaluation data for ``pair`` (``ctx.data(pair)``: the evaluation set, or the pair's minibatch under
    ``--eval minibatch``, whose BatchNorm batch is then the whole minibatch as in loss evaluation). The state's
    buffers are held fixed. ``kw``: hvp, operator, chunk. None when the pair has no data."""
    from ...archive.layout import BUFFERS, BUFFERS_INT, PARAMS

    data = ctx.data(pair)
    if data is None:
        return None
    x, y = data
    ev = ctx.evaluator
    n_params = ev.n_params
    state = state.detach().to(ev.device, ev.dtype)
    views, bufs = [], {}
    sd = None
    for e in ev.layout.entries:
        if e.dataset == PARAMS:
            views.append((e.name, e.offset, e.stop, tuple(e.shape)))
        elif e.dataset == BUFFERS:
            bufs[e.name] = state[n_params + e.offset : n_params + e.stop].view(tuple(e.shape))
        elif e.dataset == BUFFERS_INT:
            sd = ev.model.state_dict() if sd is None else sd
            bufs[e.name] = sd[e.name]
    minibatch = getattr(getattr(ctx, "eval", None), "kind", "") == "minibatch"
    bn_batch = len(x) if minibatch else ev.bn_batch
    if ev.bn_policy == "train" and getattr(ev, "has_bn", False):
        # the evaluator's BatchNorm groups (seeded permutation, true batches, remainder dropped): curvature
        # differentiates exactly the loss the interpolation metrics measure at the same point
        from ..bn_groups import bn_grouping

        order, sizes = bn_grouping(len(x), bn_batch, getattr(ev, "bn_seed", 0))
        order = order.to(x.device)
        x, y, bn_batch = x[order], y[order], sizes[0]
    obj = Objective(ev.model, views, bufs, x, y, loss=ev.loss, bn=ev.bn_policy, bn_batch=bn_batch,
                    recompute_batches=ev.recompute_batches, p0=state[:n_params], **kw)
    shard = getattr(ctx, "data_shard", None)
    if shard is not None:
        obj.shard(shard.rank, shard.world, shard.all_reduce)
    return obj
