"""Every evaluation strategy against a plain float64 per-point loop, on small instances of every model family.

The reference loads each state vector into a float64 copy of the model (plain torch, no sgdwalk code on the
path) and evaluates point by point: BatchNorm 'train' as one forward per group of the tensor_split grouping,
'recompute' as sequential training-mode forwards with a cumulative average, 'eval' in eval mode.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from trajectory.archive.layout import BUFFERS, PARAMS, Layout
from trajectory.analysis.bn_groups import GroupedBatchNorm, group_sizes
from trajectory.analysis.errors import AnalysisError
from trajectory.analysis.evaluator import Evaluator
from trajectory.zoo.models import cnn, cnn_bn, mlp, mlp_bn, preact_resnet, transformer

N, BN_BATCH, POINTS = 26, 8, 5  # 26 samples in true batches of 8 -> 3 groups of 8 (seeded permutation), 2 dropped


# ------------------------------------------------------------------------------------------- models
class _Residual(nn.Module):
    """Custom forward whose first layer feeds a branch and a residual (sharing applies)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.a = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(torch.relu(self.bn(self.a(torch.tanh(h)))) + h)


class _TwiceUsed(nn.Module):
    """The first layer is applied twice (the second time to a state-dependent input): no sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 12)
        self.bn = nn.BatchNorm1d(12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        return self.out(self.inp(torch.relu(self.bn(self.inp(x)))))


class _ScaledInput(nn.Module):
    """The first Linear sees a state-dependent input (a learned scale): no sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(12))
        self.inp = nn.Linear(12, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x * self.scale)))


def _vggish() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def _resnetish() -> nn.Module:
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         BasicBlock(4, 4), BasicBlock(4, 8, stride=2, downsample=down),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


# name -> (factory, input shape, shareable first layer)
MODELS = {
    "mlp": (lambda: mlp(in_features=12, num_classes=3, hidden=(8, 8)), (12,), True),
    "mlp_bn": (lambda: mlp_bn(in_features=12, num_classes=3, hidden=(8,)), (12,), True),
    "cnn1d": (lambda: cnn(num_classes=3, width=2), (12,), True),
    "cnn2d": (lambda: cnn(in_channels=3, num_classes=3, input_dim=2, width=2), (3, 6, 6), True),
    "cnn_bn": (lambda: cnn_bn(num_classes=3, width=2), (12,), True),
    "vggish": (_vggish, (3, 8, 8), True),
    "resnetish": (_resnetish, (3, 8, 8), True),
    "preact": (lambda: preact_resnet(8, num_classes=3, width=2), (3, 6, 6), True),
    "transformer": (lambda: transformer(in_features=12, num_classes=3, patch=4, dim=8, depth=1, heads=2), (12,), True),
    "residual": (_Residual, (12,), True),
    "twice": (_TwiceUsed, (12,), False),
    "scaled": (_ScaledInput, (12,), False),
}


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _setup(name: str, seed: int = 0):
    factory, shape, shareable = MODELS[name]
    torch.manual_seed(seed)
    model = factory()
    layout = Layout.from_module(model)
    sd = model.state_dict()
    a = torch.cat([layout.flatten(sd, PARAMS), layout.flatten(sd, BUFFERS)]).double()
    n_params = layout.sizes[PARAMS]
    g = torch.Generator().manual_seed(seed + 1)
    ends = []
    for _ in range(2):  # two lines: from a perturbed record to another
        lo = a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64) * a.abs().clamp(min=0.1)
        hi = lo + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64) * a.abs().clamp(min=0.1)
        for v in (lo, hi):  # keep running variances positive
            v[n_params:] = a[n_params:] + 0.1 * torch.rand(len(a) - n_params, generator=g, dtype=torch.float64)
        ends.append((lo, hi))
    A = torch.stack([e[0] for e in ends])
    B = torch.stack([e[1] for e in ends])
    owner = torch.arange(2).repeat_interleave(POINTS)
    t = torch.linspace(0, 1, POINTS, dtype=torch.float64).repeat(2)
    states = torch.lerp(A[owner], B[owner], t.view(-1, 1))
    x = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    rec = [torch.randn(BN_BATCH, *shape, generator=g, dtype=torch.float64) for _ in range(3)]
    return model, layout, states, (A, B, owner, t), x, y, rec, shareable


def _naive(model, layout, states, x, y, bn, rec):
    """Float64 reference: load each state into the model, evaluate point by point (plain torch)."""
    m = copy.deepcopy(model).double()
    n_params = layout.sizes[PARAMS]
    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    losses = []
    for s in states:
        with torch.no_grad():
            named = dict(m.named_parameters())
            named.update(dict(m.named_buffers()))
            for e in layout.entries:
                if e.dataset == PARAMS:
                    named[e.name].copy_(s[e.offset : e.stop].view(e.shape))
                elif e.dataset == BUFFERS:
                    named[e.name].copy_(s[n_params + e.offset : n_params + e.stop].view(e.shape))
            m.eval()
            if bns and bn == "recompute":
                for mod in bns:
                    mod.reset_running_stats()
                    mod.momentum = None  # cumulative average
                    mod.train()
                for b in rec:
                    m(b)
                m.eval()
            if bns and bn == "train":
                for mod in bns:
                    mod.train()
                # true batches of BN_BATCH from a permutation seeded 0 (bn_seed default); the remainder is dropped
                perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
                total, used = 0.0, 0
                for j in range(len(x) // BN_BATCH):
                    idx = perm[j * BN_BATCH : (j + 1) * BN_BATCH]
                    total += F.cross_entropy(m(x[idx]), y[idx], reduction="sum").item()
                    used += len(idx)
                losses.append(total / used)
            else:
                losses.append(F.cross_entropy(m(x), y).item())
    return torch.tensor(losses, dtype=torch.float64)


def _strategies(name: str) -> list[str]:
    out = ["vmap", "loop"]
    if MODELS[name][1].__len__() == 3:
        out.append("loop_cl")
    if name == "mlp":
        out.append("mlp")
    return out


CASES = []
for _name in MODELS:
    torch.manual_seed(0)
    _policies = ["train", "eval", "recompute"] if _has_bn(MODELS[_name][0]()) else ["eval"]
    for _bn in _policies:
        for _strategy in _strategies(_name):
            CASES.append((_name, _bn, _strategy))


@pytest.mark.parametrize("name,bn,strategy", CASES)
def test_strategy_matches_float64_naive_loop(name, bn, strategy):
    model, layout, states, lines, x, y, rec, shareable = _setup(name)
    ref = _naive(model, layout, states, x, y, bn, rec)
    shares = [False, True] if strategy != "mlp" else [None]
    for share in shares:
        ev = Evaluator(model, layout, dtype=torch.float64, bn=bn, bn_batch=BN_BATCH, recompute_batches=rec,
                       strategy=strategy, share_first=share)
        loss, _ = ev.evaluate(states, x, y, lines=lines)
        rel = (torch.from_numpy(loss) - ref).abs().max() / ref.abs().max()
        assert rel < 1e-9, (name, bn, strategy, share, float(rel))
        assert ev.strategy["name"].split("+")[0] == strategy
        if share is not None:
            # the shared first layer is used exactly when asked and the model has one
            assert ev.strategy["first_layer_shared"] == (bool(share) and shareable)


@pytest.mark.parametrize("name,bn", [("cnn_bn", "train"), ("transformer", "eval"), ("mlp", "eval"), ("resnetish", "recompute")])
def test_auto_changes_no_value_beyond_rounding(name, bn):
    model, layout, states, lines, x, y, rec, _ = _setup(name, seed=3)
    ref = _naive(model, layout, states, x, y, bn, rec)
    ev = Evaluator(model, layout, dtype=torch.float64, bn=bn, bn_batch=BN_BATCH, recompute_batches=rec)
    info = ev.calibrate(x, y)
    assert set(info) >= {"name", "rate", "candidates", "device", "first_layer_shared"}
    assert info["rate"] > 0 and info["name"] in info["candidates"] and info["device"] == "cpu"
    assert ev.calibrate(x, y) is info  # idempotent, cached per data shape
    seen = []
    ev.on_samples = seen.append
    loss, _ = ev.evaluate(states, x, y, lines=lines)
    assert (torch.from_numpy(loss) - ref).abs().max() / ref.abs().max() < 1e-9
    used = (N // BN_BATCH) * BN_BATCH if (bn == "train" and "bn" in name) else N  # train BN drops the remainder
    assert sum(seen) == len(states) * used  # progress counts every (point x sample)
    # float32 'auto' agrees with the float64 reference to float32 rounding
    ev32 = Evaluator(model, layout, dtype=torch.float32, bn=bn, bn_batch=BN_BATCH, recompute_batches=[r.float() for r in rec])
    l32, _ = ev32.evaluate(states.float(), x.float(), y, lines=lines)
    assert (torch.from_numpy(l32) - ref).abs().max() / ref.abs().max() < 1e-4


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_batchnorm_equals_a_loop_of_per_group_forwards(channels_last):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(23, 5, 3, 4, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sizes = group_sizes(23, 6)
    assert sizes == [6, 6, 6, 5] and sum(sizes) == 23
    ref_bn = copy.deepcopy(bn).train()
    ref_bn.momentum = None
    ref = torch.cat([ref_bn(part) for part in torch.split(x, sizes)])
    g = GroupedBatchNorm([bn])
    g.sizes, g.record = sizes, True
    with g:
        got = bn(x)
    assert "forward" not in bn.__dict__  # restored on exit
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    # record mode: the running statistics are the cumulative average of the groups' statistics
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(bn.running_var, ref_bn.running_var, rtol=1e-12, atol=1e-12)
    # without recording: per-group native kernels, one group or several, running statistics untouched
    before = bn.running_mean.clone()
    g.record = False
    for sz in (sizes, [23]):
        g.sizes = sz
        with g:
            got = bn(x)
        ref = torch.cat([F.batch_norm(part, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for part in torch.split(x, sz)])
        assert torch.equal(got, ref)
        assert torch.allclose(got, copy.deepcopy(ref_bn)(x[: sz[0]]) if len(sz) == 1 else got)
    assert torch.equal(bn.running_mean, before)


def test_group_sizes_follow_tensor_split():
    for n, b in [(26, 8), (100, 100), (101, 100), (5, 100), (3, 2), (7, 3)]:
        nb = max(1, math.ceil(n / b))
        if n // nb < 2:
            nb = max(1, n // 2)
        assert group_sizes(n, b) == [len(p) for p in torch.tensor_split(torch.arange(n), nb)]


def test_unknown_or_inapplicable_strategy_is_a_one_line_error():
    model, layout, *_ = _setup("cnn_bn")
    with pytest.raises(AnalysisError, match="unknown evaluation strategy"):
        Evaluator(model, layout, strategy="fastest")
    with pytest.raises(AnalysisError, match="'mlp' needs"):
        Evaluator(model, layout, strategy="mlp")


@pytest.mark.parametrize("name,bn", [("cnn_bn", "train"), ("transformer", "eval")])
def test_calibration_times_each_candidate_at_its_real_chunk_size(name, bn):
    """Each candidate is timed on the data chunk it would really process: a common small slice (the old rule,
    32-64 samples) favoured vmap over the per-point loop that ran the real work 1.3-2x faster."""
    torch.manual_seed(0)
    model = cnn_bn() if name == "cnn_bn" else transformer()
    layout = Layout.from_module(model)
    n, bnb = 600, 100
    x = torch.randn(n, 40)
    y = torch.randint(0, 10, (n,))
    ev = Evaluator(model, layout, bn=bn, bn_batch=bnb, max_elems=1 << 16)
    info = ev.calibrate(x, y)
    act = ev._probe(x)
    timed = info["timed"]
    assert {"loop", "vmap"} <= {k.split("+")[0] for k in timed}
    for label, (points, samples) in timed.items():
        assert 3 <= points <= 6
        if bn == "train":
            assert samples % bnb == 0  # whole BatchNorm groups, as the real passes hold
        per_point = label.startswith("loop")
        # the real chunk of one model call: per-point strategies size it for one point, vmap for all its points
        real = min(128, 4 * (1 << 16) // act) if (per_point and bn == "train") else (
            4 * (1 << 16) // act if per_point else (1 << 16) // (points * act))
        expect = min(n, max(16, int(real)))
        if bn == "train":
            expect = min(n, max(bnb, -(-expect // bnb) * bnb))
        assert samples >= expect, (label, samples, expect)
    assert info["name"] in timed and [info["points"], info["samples"]] == timed[info["name"]]
