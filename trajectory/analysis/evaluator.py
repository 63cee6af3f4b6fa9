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
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..archive.layout import BUFFERS, BUFFERS_INT, PARAMS, Layout
from .bn_groups import GroupedBatchNorm, bn_grouping, group_sizes
from .errors import AnalysisError
from .first_layer import FirstLayer, SharedLines, find_first_layer, swap_forward
from .replay_strategies import STRATEGIES, Strategy, make_strategy, mlp_plan

__all__ = ["Evaluator", "has_batchnorm"]

#: The plain-MLP bmm route is kept unless calibration measures another strategy this much faster (see calibrate()).
MLP_MARGIN = 1.5


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


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
    fast_path : allow the bmm route ('mlp' strategy) for plain MLPs.
    strategy : 'auto' (timed calibration picks one, see :meth:`calibrate`) or a name from
        :data:`~trajectory.analysis.replay_strategies.STRATEGIES` to force it.
    share_first : share the affine first layer along lines: None (calibration decides), True (whenever the
        model has a shareable first layer), False (never).
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
        strategy: str = "auto",
        share_first: bool | None = None,
        bn_seed: int = 0,
        noise: str = "crn",
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.layout = layout
        self.loss = loss
        self.bn_policy = bn
        self.bn_batch = max(2, int(bn_batch))
        if noise not in ("crn", "resample"):
            raise AnalysisError(f"--noise {noise!r}: expected crn (common random numbers) or resample")
        #: seed of the BatchNorm grouping permutation (:func:`~.bn_groups.bn_grouping`) under 'train'
        self.bn_seed = int(bn_seed)
        #: 'crn': the same BatchNorm groups at every point; 'resample': a fresh grouping at every evaluated point
        self.noise = noise
        self._noise_gen = torch.Generator().manual_seed(self.bn_seed + 7919)
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
        self._plan = mlp_plan(m, layout) if fast_path else None
        self._act_per_sample: float | None = None
        self.points_evaluated = 0  # counts model evaluations at a point over a whole data set
        self.flops_per_sample = self._linear_flops() if self._plan else None

        self.strategy_request = strategy
        if strategy != "auto" and strategy not in STRATEGIES:
            raise AnalysisError(f"unknown evaluation strategy {strategy!r}; choose auto or one of {', '.join(STRATEGIES)}")
        if strategy == "mlp" and (self._plan is None or self.has_bn):
            raise AnalysisError("evaluation strategy 'mlp' needs a plain Flatten/Linear/ReLU model without BatchNorm")
        self.share_first = share_first
        #: The calibrated evaluation strategy (JSON-able; None until :meth:`calibrate` or the first evaluate()).
        self.strategy: dict | None = None
        #: Called after every forward chunk with the number of (points x samples) evaluated (progress).
        self.on_samples: Callable[[int], None] | None = None
        self._calibrations: dict[tuple, tuple[dict, Strategy, bool]] = {}
        self._strat: Strategy | None = None
        self._share = False
        self._first: FirstLayer | None = None
        self._first_probed = False
        self._first_holder: list = [None]
        self._grouped = GroupedBatchNorm(self._bn_modules)
        self._has_conv2d = any(isinstance(mod, nn.Conv2d) for mod in m.modules())

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

    def _template_state(self) -> torch.Tensor:
        """The template model's state as one state vector (calibration input)."""
        sd = self.model.state_dict()
        vec = torch.zeros(self.n_state, device=self.device, dtype=self.dtype)
        for name, start, stop, _shape in self._views:
            vec[start:stop] = sd[name].reshape(-1).to(self.dtype)
        return vec

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

    def _first_layer(self, x: torch.Tensor) -> FirstLayer | None:
        if not self._first_probed:
            self._first = find_first_layer(self.model, self._views, self.n_params, self._int_buffers, x)
            self._first_probed = True
        return self._first

    @contextmanager
    def _first_swapped(self) -> Iterator[None]:
        """While active, the shared first layer returns ``_first_holder[0]`` instead of computing."""
        undo = swap_forward(self._first.module, self._first_holder)
        try:
            yield
        finally:
            undo()
            self._first_holder[0] = None

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

    def _clock(self) -> Callable[[], float]:
        """The calibration clock: this thread's CPU time when torch computes on one CPU thread (time-slicing by
        other processes then does not count: on a 2-core machine shared with a test suite, wall-clock timings of
        the same strategy varied 2x between runs, and the choice flipped with them), else wall-clock time."""
        if self.device.type == "cpu" and torch.get_num_threads() == 1:
            return time.thread_time
        return time.perf_counter

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ calibration
    def _candidates(self, x: torch.Tensor) -> list[tuple[str, bool]]:
        """(strategy name, share the first layer) pairs worth timing for this model and data."""
        if self.strategy_request != "auto":
            names = [self.strategy_request]
        else:
            names = []
            if self._plan is not None and not self.has_bn:
                names.append("mlp")
            names += ["vmap", "loop"]
            if self._has_conv2d and x.dim() == 4:
                names.append("loop_cl")
        first = self._first_layer(x)
        out = []
        for name in names:
            if name == "mlp":
                out.append((name, False))  # shares the first layer itself, from the lines' weights
                continue
            shares = [False, True] if (first is not None and self.share_first is None) else [bool(first is not None and self.share_first)]
            out += [(name, s) for s in shares]
        return out

    def _calibration_samples(self, kc: int, act: float, n: int, bnb: int, policy: str) -> int:
        """Samples of the timed calibration run of the current strategy: one real data chunk of a pass of ``kc``
        points (the size :meth:`_evaluate_pass` would use), whole BatchNorm groups under 'train'."""
        size = self._samples_per_forward(kc, act)
        if policy == "train":
            if self._strat.per_point:
                size = min(size, 128)
            size = max(bnb, -(-size // bnb) * bnb)  # chunks hold whole groups
        return int(min(n, size))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y: torch.Tensor, bn_batch: int | None = None) -> dict:
        """Choose the evaluation strategy by timing each candidate at the geometry it will really run; cached per
        data shape.

        Every candidate computes the same values (to float rounding), so the choice changes speed only. Each is
        timed on the data chunk it would really process (its own number of samples per model call: large for
        the per-point strategies, an activation budget shared by all points for vmap; whole BatchNorm groups
        under 'train') for a few points of one line (so the shared first layer is exercised), best of two runs
        after a warm-up; the fastest wins. Timing every candidate on one small common slice favoured vmap, whose
        per-call overhead is lower, over the per-point loop that ran the real work 1.3-2x faster (cnn_bn, the
        transformer). Single-threaded CPU runs are timed in thread CPU time (:meth:`_clock`), so that other
        processes on a shared machine do not decide the choice; candidates are timed interleaved. Returns :attr:`strategy`: ``{"name", "rate" (sample-forwards per second: one sample
        through the model at one point = 1), "candidates" {label: rate}, "device", "first_layer_shared",
        "points", "samples" (of the chosen candidate's timed run), "timed" {label: [points, samples]}, "seconds"}``.
        """
        bnb = int(bn_batch or self.bn_batch)
        # one calibration per sample shape (and BatchNorm group size where it matters): the number of samples
        # (the evaluation set, or one minibatch after another under --eval minibatch) does not change the choice
        key = (tuple(x.shape[1:]), str(x.dtype), bnb if (self.has_bn and self.bn_policy == "train") else None)
        if key in self._calibrations:
            self.strategy, self._strat, self._share = self._calibrations[key]
            return self.strategy
        t_start = time.perf_counter()
        clock = self._clock()
        n = x.shape[0]
        if n == 0:
            raise AnalysisError("the evaluation data is empty")
        cands = self._candidates(x)
        act = self._probe(x)
        kmax = 6
        base = self._template_state()
        states = base.unsqueeze(0).expand(kmax, -1).contiguous()
        lines = (base.unsqueeze(0), base.unsqueeze(0), torch.zeros(kmax, dtype=torch.long),
                 torch.linspace(0.0, 1.0, kmax, dtype=torch.float64))
        policy = self.bn_policy if self.has_bn else "eval"
        unit = min(n, 32)  # the warm-up slice
        if policy == "train":
            bnb = min(bnb, n)
            unit = min(n, max(unit, bnb))
        saved_cb, saved_pts = self.on_samples, self.points_evaluated
        self.on_samples = None
        rates: dict[str, float] = {}
        geometry: dict[str, tuple[int, int]] = {}
        chosen: tuple[float, str, bool] | None = None
        plans: list[tuple[str, str, bool, int, int, float]] = []  # label, name, share, points, samples, est. s
        try:
            # 1. warm each candidate up and size its timed run from the real geometry
            slow = False
            for i, (name, share) in enumerate(cands):
                label = name + ("+shared" if share else "")
                if slow and not share and (name, True) in cands:
                    # a slow model (ResNet-18: 30-60 s of calibration): sharing the first layer saves FLOPs at no
                    # measurable per-call cost there, so only the shared variant of each strategy is timed
                    continue
                try:
                    self._strat, self._share = make_strategy(name), share
                    for _ in range(2 if (i == 0 and len(cands) > 1) else 1):  # warm-up (lazy initialisation, caches)
                        self._sync()
                        t = clock()
                        self._evaluate_all(states[:2], x[:unit], y[:unit], bnb, _slice_lines(lines, 2), act)
                        self._sync()
                        warm = clock() - t
                except Exception:  # noqa: BLE001 - a strategy the model does not support (e.g. no batching rule)
                    if len(cands) == 1:
                        raise
                    rates[label] = 0.0
                    continue
                per = warm / (2 * unit)  # seconds per sample-forward, an upper bound (small calls)
                slow = slow or per > 2e-3
                best_warm = max((1.0 / max(p[5] / max(p[3] * p[4], 1), 1e-12) for p in plans), default=0.0)
                if warm > 0.2 and best_warm > 0 and 1.0 / max(per, 1e-12) < best_warm / 3:
                    rates[label] = 1.0 / max(per, 1e-12)  # far slower even warm: not worth timing properly
                    continue
                # the real geometry, kept within about 0.4 s a run: fewer points first (3 exercise sharing)
                kc = kmax
                m = self._calibration_samples(kc, act, n, bnb, policy)
                while kc > 3 and per * kc * m > 0.4:
                    kc -= 1
                    m = self._calibration_samples(kc, act, n, bnb, policy)
                if per * kc * m > 0.4:  # big models: fewer samples, never below the warm-up slice
                    m = max(unit, int(0.4 / max(per * kc, 1e-12)))
                    if policy == "train":
                        m = max(bnb, m - m % bnb)
                    m = min(n, m)
                else:  # small work: several chunks, so that a run is long enough to measure (~0.1 s)
                    grow = int(min(8, max(1, 0.1 / max(per * kc * m, 1e-12))))
                    m = min(n, m * grow)
                    if policy == "train" and m < n:
                        m = max(bnb, m - m % bnb)
                plans.append((label, name, share, kc, m, per * kc * m))
            # 2. timed runs, interleaved (a load change on a shared machine hits every candidate alike), best of
            # up to three rounds while a round stays short
            best: dict[str, float] = {}
            total = sum(p[5] for p in plans)
            rounds = 1 if (len(plans) <= 1 or total > 3.0) else (3 if total < 0.6 else 2)
            for _ in range(rounds):
                for label, name, share, kc, m, _est in plans:
                    if best.get(label) == float("inf"):
                        continue
                    self._strat, self._share = make_strategy(name), share
                    try:
                        self._sync()
                        t = clock()
                        self._evaluate_all(states[:kc], x[:m], y[:m], bnb, _slice_lines(lines, kc), act)
                        self._sync()
                        best[label] = min(best.get(label, float("inf")), clock() - t)
                    except Exception:  # noqa: BLE001 - failed only at the real geometry (memory, batching rule)
                        if len(plans) == 1:
                            raise
                        best[label] = float("inf")
            for label, name, share, kc, m, _est in plans:
                rate = kc * m / max(best[label], 1e-12) if best[label] < float("inf") else 0.0
                rates[label] = rate
                geometry[label] = (kc, m)
                if rate > 0 and (chosen is None or rate > chosen[0]):
                    chosen = (rate, name, share)
        finally:
            self.on_samples, self.points_evaluated = saved_cb, saved_pts
        if chosen is None:  # pragma: no cover - the loop strategy runs whatever the model
            raise AnalysisError("no evaluation strategy could run this model")
        rate, name, share = chosen
        mlp_rate = rates.get("mlp", 0.0)
        if name != "mlp" and mlp_rate > 0 and rate < MLP_MARGIN * mlp_rate:
            # the bmm route holds many points per pass while calibration times only a few, so a close call is a
            # misreading: measured end to end on the sample archive, 'loop' timed 1.11x faster here yet ran 2x slower
            rate, name, share = mlp_rate, "mlp", False
        label = name + ("+shared" if share else "")
        kc, m = geometry.get(label, (0, 0))
        info = {
            "name": label,
            "rate": float(rate),
            "candidates": {k: float(v) for k, v in rates.items()},
            "device": str(self.device),
            "first_layer_shared": bool(share or (name == "mlp" and [p for p in self._plan if p[0] != "flatten"][0][0] == "linear")),
            "points": int(kc),
            "samples": int(m),
            "timed": {k: [int(v[0]), int(v[1])] for k, v in geometry.items()},
            "seconds": time.perf_counter() - t_start,
        }
        self._strat, self._share = make_strategy(name), share
        self.strategy = info
        self._calibrations[key] = (info, self._strat, share)
        return info

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor, bn_batch: int | None = None,
                 lines: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 units: bool = False) -> tuple[np.ndarray, ...]:
        """Mean loss and accuracy over (x, y) at each row of ``states`` (K, n_state); float64 arrays.

        ``bn_batch`` overrides the BatchNorm batch size of the 'train' policy for this call (the
        engine passes the minibatch size for ``--eval minibatch``, so BN sees exactly that batch).
        ``lines = (A, B, owner, t)`` optionally tells that ``states[k] = A[owner[k]] + t[k]·(B − A)[owner[k]]``;
        the shared first layer is then computed once per line end (it is affine in the weights:
        W(t)x = W_A x + t·(W_B − W_A)x) instead of once per point. The strategy is calibrated on first use.

        Under the 'train' policy the samples are grouped by :func:`~.bn_groups.bn_grouping` (seeded permutation,
        true batches of ``bn_batch``, remainder dropped): the same groups at every point, or, with ``noise=
        'resample'``, a fresh grouping for every state. ``units=True`` also returns the per-unit losses (K, U)
        that standard errors are formed from (:mod:`~trajectory.analysis.stderr`): the per-sample losses, or under
        'train' the mean loss of each BatchNorm group (samples of one group are not independent); the mean loss
        is exactly the mean of the units.
        """
        if states.dim() != 2 or states.shape[1] != self.n_state:
            raise AnalysisError(f"state vectors must be (K, {self.n_state}), got {tuple(states.shape)}")
        if x.shape[0] == 0:
            raise AnalysisError("the evaluation data is empty")
        bnb = int(bn_batch or self.bn_batch)
        states = states.to(self.device, self.dtype)
        if self.has_bn and self.bn_policy == "train" and self.noise == "resample" and states.shape[0] > 1:
            outs = [self._evaluate_grouped(states[k : k + 1], x, y, bnb, None, units, self._fresh_seed())
                    for k in range(states.shape[0])]
            return tuple(np.concatenate([o[i] for o in outs]) for i in range(len(outs[0])))
        seed = self._fresh_seed() if self.noise == "resample" else self.bn_seed
        return self._evaluate_grouped(states, x, y, bnb, lines, units, seed)

    def _fresh_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._noise_gen))

    def _evaluate_grouped(self, states, x, y, bnb: int, lines, units: bool, seed: int) -> tuple[np.ndarray, ...]:
        """:meth:`evaluate` with the BatchNorm grouping of ``seed`` (the data permuted and cut into true batches)."""
        group = None
        if self.has_bn and self.bn_policy == "train":
            order, sizes = bn_grouping(x.shape[0], bnb, seed)
            o = order.to(x.device)
            x, y = x[o], y[o]
            bnb, group = sizes[0], len(sizes)
        self.calibrate(x, y, bnb)
        k_all = states.shape[0]
        n = x.shape[0]
        per = torch.empty((k_all, n), dtype=torch.float64, device=self.device) if units else None
        loss_sum, corr_sum = self._evaluate_all(states, x, y, bnb, lines, self._probe(x), per)
        self.points_evaluated += k_all
        acc = corr_sum / n if self.loss == "cross_entropy" else np.full(k_all, np.nan)
        if not units:
            return loss_sum / n, acc
        if group is not None:
            per = per.reshape(k_all, group, bnb).mean(-1)
        return loss_sum / n, acc, per.cpu().numpy()

    def _evaluate_all(self, states, x, y, bnb: int, lines, act: float, per=None) -> tuple[np.ndarray, np.ndarray]:
        """Summed loss and correctness (K,) over (x, y), in passes of whole lines; per-sample losses into ``per``."""
        strat = self._strat
        k_all = states.shape[0]
        loss_sum = np.zeros(k_all)
        corr_sum = np.zeros(k_all)
        if strat.per_point:
            mp = self.max_points if self.max_points is not None else 24  # one or two lines a pass
        else:
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
            sub = None
            if lines is not None:
                sub = (lines[0], lines[1], lines[2][k0:k1].to(self.device), lines[3][k0:k1].to(self.device, self.dtype))
            ls, cs = self._evaluate_pass(states[k0:k1], x, y, act, bnb, sub, None if per is None else per[k0:k1])
            loss_sum[k0:k1] = ls
            corr_sum[k0:k1] = cs
            k0 = k1
        return loss_sum, corr_sum

    def _samples_per_forward(self, kb: int, act: float) -> int:
        """Samples of one model call: the activation budget for one point (per-point strategies) or for kb."""
        if self._strat.per_point:
            budget = 4 * self.max_elems if self.device.type == "cpu" else self.max_elems
            return max(16, int(budget // act))
        return max(16, int(self.max_elems // max(1.0, kb * act)))

    def _chunks(self, n: int, size: int, groups: list[int] | None) -> list[tuple[int, int, list[int] | None]]:
        """(start, stop, group sizes) of the data chunks; chunks hold whole BatchNorm groups when grouped."""
        if groups is None:
            return [(s, min(n, s + size), None) for s in range(0, n, size)]
        out, s, cur = [], 0, []
        for g in groups:
            cur.append(g)
            if sum(cur) >= size:
                out.append((s, s + sum(cur), cur))
                s += sum(cur)
                cur = []
        if cur:
            out.append((s, s + sum(cur), cur))
        return out

    def _evaluate_pass(self, st: torch.Tensor, x, y, act, bn_batch: int, lines=None, per=None) -> tuple[np.ndarray, np.ndarray]:
        strat = self._strat
        kb = st.shape[0]
        n = x.shape[0]
        loss_sum = torch.zeros(kb, dtype=torch.float64, device=self.device)
        corr_sum = torch.zeros(kb, dtype=torch.float64, device=self.device)
        policy = self.bn_policy if self.has_bn else "eval"
        if policy not in ("eval", "train", "recompute"):  # pragma: no cover - validated earlier
            raise AnalysisError(f"unknown BatchNorm policy {policy!r}")
        self.model.eval()  # dropout off; BatchNorm batch statistics come from the grouped context
        handle = strat.prepare(self, st, clone_buffers=policy == "recompute", lines=lines)
        if policy == "recompute":
            self._recompute(handle, kb, act)
        shared_lines = None
        if self._share and lines is not None and not strat.shares_internally and self._first is not None:
            uniq, inv = torch.unique(lines[2], return_inverse=True)
            if 3 * len(uniq) <= kb:  # two layer evaluations per line pay from three points a line
                rows_a = lines[0][uniq.to(lines[0].device)].to(self.device, self.dtype)
                rows_b = lines[1][uniq.to(lines[1].device)].to(self.device, self.dtype)
                shared_lines = (rows_a, rows_b, inv, lines[3])
        groups = group_sizes(n, bn_batch) if policy == "train" else None
        size = self._samples_per_forward(kb, act)
        if groups is not None and strat.per_point:
            size = min(size, 128)  # one BatchNorm group a forward when groups are large: no per-layer split/cat
        for s, e, sizes in self._chunks(n, size, groups):
            xc = strat.adapt_input(x[s:e])
            shared = None
            if shared_lines is not None:
                args = self._first.capture_input(self.model, xc)
                shared = SharedLines(self._first.outputs(shared_lines[0], args), self._first.outputs(shared_lines[1], args),
                                     shared_lines[2], shared_lines[3])
            if sizes is not None:
                self._grouped.sizes = sizes
                with self._grouped:
                    out = strat.forward(self, handle, xc, shared)
            else:
                out = strat.forward(self, handle, xc, shared)
            l, c = self._per_sample(out, y[s:e])
            if per is not None:
                per[:, s:e] = l
            loss_sum += l.sum(1)
            if c is not None:
                corr_sum += c.sum(1)
            if self.on_samples is not None:
                self.on_samples(kb * (e - s))
        return loss_sum.cpu().numpy(), corr_sum.cpu().numpy()

    def _recompute(self, handle, kb: int, act: float) -> None:
        """Re-estimate the running statistics held in ``handle`` (cloned buffers) from the recompute batches:
        the average over the batches of their means and unbiased variances, in forwards of whole batches."""
        batches = self.recompute_batches
        size = self._samples_per_forward(kb, act)
        g = self._grouped
        g.record, g.done = True, 0
        try:
            i = 0
            while i < len(batches):
                j, tot = i, 0
                while j < len(batches) and (j == i or tot + len(batches[j]) <= size):
                    tot += len(batches[j])
                    j += 1
                xr = self._strat.adapt_input(torch.cat(batches[i:j]) if j - i > 1 else batches[i])
                g.sizes = [len(b) for b in batches[i:j]]
                with g:
                    self._strat.forward(self, handle, xr, None)
                g.done += j - i
                i = j
        finally:
            g.record, g.done, g.sizes = False, 0, None


def _slice_lines(lines, k: int):
    return (lines[0], lines[1], lines[2][:k], lines[3][:k])
