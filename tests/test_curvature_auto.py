"""HVP mode/chunk chosen by measurement, one Lanczos for sharpness + hessian_top, curvature progress.

* every HVP route (rev, fwd, any chunk) equals H·v of the autograd Hessian in float64 (1e-9 relative) on tiny conv +
  BatchNorm (all three policies) and pre-activation ResNet models, and Lanczos finds eigh's top eigenvalue;
* configuration hashes of default (and other) options equal those of the code before ``hvp=auto`` existed
  (values hard-coded from commit 178cb86, computed with that commit's code);
* ``sharpness`` and ``hessian_top`` in one run compute one Lanczos per point (HVPs counted through the objective),
  and their rows equal those of separate runs;
* ``cost()`` and the ``on_samples`` progress hook.
"""
from __future__ import annotations

import copy
import gc
import json
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from test_analysis_support import record_mlp
from trajectory.analysis import analyze
from trajectory.analysis.curvature import Objective, top_eigen
from trajectory.analysis.curvature.autotune import apply, chunk_candidates, measure
from trajectory.analysis.curvature.linalg import EigenResult
from trajectory.analysis.curvature.objective import COST_GRAD, COST_HVP, COST_LOSS
from trajectory.analysis.curvature.runcache import RunCache, _CACHES, run_cache
from trajectory.analysis.errors import AnalysisError
from trajectory.analysis.metric import get_metric
from trajectory.analysis.results import config_hash
from trajectory.zoo.models import cnn_bn, preact_resnet

# ----------------------------------------------------------------------------- exact products on conv nets

N, BN_BATCH = 24, 8


def _models():
    torch.manual_seed(0)
    conv = cnn_bn(in_channels=1, num_classes=3, input_dim=1, width=2)  # Conv1d + BatchNorm1d + MaxPool1d
    x_conv = torch.randn(N, 1, 16)
    torch.manual_seed(1)
    res = preact_resnet(8, num_classes=3, width=1, in_channels=1)  # pre-activation blocks, projections, BN2d
    x_res = torch.randn(N, 1, 8, 8)
    out = {}
    for name, m, x in (("cnn_bn", conv, x_conv), ("preact_resnet8", res, x_res)):
        m = m.double()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # a generic point: no parameter at an initialisation constant, non-trivial statistics
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            for mod in m.modules():
                if isinstance(mod, _BatchNorm):
                    mod.running_mean.copy_(0.2 * torch.randn(mod.running_mean.shape, generator=g, dtype=torch.float64))
                    mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g, dtype=torch.float64))
        out[name] = (m, x.double(), torch.randint(0, 3, (N,), generator=g))
    return out


MODELS = _models()


def reference_hessian(model, x, y, bn: str, recompute_batches=()):
    """Autograd Hessian of the mean cross-entropy under a BatchNorm policy, written without the Objective:
    'eval' running statistics; 'train' batch statistics of consecutive blocks of BN_BATCH samples (size-weighted);
    'recompute' statistics re-estimated with PyTorch's cumulative average (momentum=None), then held fixed."""
    m = copy.deepcopy(model)
    names = [(k, v.shape, v.numel()) for k, v in m.named_parameters()]
    p0 = torch.cat([v.detach().reshape(-1) for v in m.parameters()])
    if bn == "recompute":
        for mod in m.modules():
            if isinstance(mod, _BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None
        m.train()
        with torch.no_grad():
            for xb in recompute_batches:
                m(xb)
    m.eval()
    if bn == "train":
        for mod in m.modules():
            if isinstance(mod, _BatchNorm):
                mod.train()
                mod.track_running_stats = False
    buffers = {k: v.detach().clone() for k, v in m.named_buffers()}
    blocks = [(s, min(s + BN_BATCH, N)) for s in range(0, N, BN_BATCH)] if bn == "train" else [(0, N)]

    def f(q):
        params, pos = {}, 0
        for k, shape, n in names:
            params[k] = q[pos : pos + n].view(shape)
            pos += n
        return sum((e - s) / N * F.cross_entropy(functional_call(m, (params, buffers), (x[s:e],)), y[s:e])
                   for s, e in blocks)

    return torch.autograd.functional.hessian(f, p0, vectorize=True), p0


@pytest.mark.parametrize("bn", ["eval", "train", "recompute"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_hvp_route_matches_eigh_of_autograd_hessian(name, bn):
    model, x, y = MODELS[name]
    rb = [x[:12], x[12:]] if bn == "recompute" else ()
    H, p0 = reference_hessian(model, x, y, bn, rb)
    n = p0.numel()
    V = torch.randn(3, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    HV = V @ H  # H symmetric
    evals = np.linalg.eigvalsh(H.numpy())
    for mode, keep in (("rev", False), ("rev", True), ("fwd", None)):
        for chunk in (None, 5):
            if chunk is not None and bn == "train":
                continue  # there the batches are the BatchNorm batches
            obj, p = Objective.from_model(model, x, y, bn=bn, bn_batch=BN_BATCH, recompute_batches=rb, hvp=mode,
                                          chunk=chunk, keep_graph=keep)
            assert torch.equal(p, p0)
            for _ in range(2):  # the second product at p runs through the kept graphs (rev, keep)
                got = obj.hvp_many(p, V)
                err = float((got - HV).norm() / HV.norm())
                assert err <= 1e-9, (mode, keep, chunk, err)
                assert float((obj.hvp(p, V[0]) - HV[0]).norm() / HV[0].norm()) <= 1e-9
    # Lanczos on the measured choice: the top eigenvalue of eigh
    obj, p = Objective.from_model(model, x, y, bn=bn, bn_batch=BN_BATCH, recompute_batches=rb)
    apply(obj, measure(obj, p))
    r = top_eigen(obj.matmat(p), n, 1, iters=n, tol=1e-12, gen=torch.Generator().manual_seed(0), like=p)
    assert abs(r.values[0] - evals[-1]) <= 1e-9 * abs(evals[-1])


def test_measure_times_both_modes_and_chunks_and_apply_keeps_products():
    model, x, y = MODELS["cnn_bn"]
    obj, p = Objective.from_model(model, x, y, bn="eval", chunk=6)
    cands = chunk_candidates(obj)
    assert cands == sorted({min(N, c) for c in (obj.default_chunk() // 4, obj.default_chunk(), 4 * obj.default_chunk())
                            if c >= 16 or c == obj.default_chunk()})
    before = obj.hvp(p, torch.ones_like(p))
    ch = measure(obj, p, chunks=[6, 12, 24])
    assert ch["by"] == "auto" and set(ch["rates"]) == {f"{m}/{c}" for m in ("rev", "fwd") for c in (6, 12, 24)}
    assert ch["rates"][f"{ch['hvp']}/{ch['chunk']}"] == max(ch["rates"].values()) == ch["samples_per_s"]
    assert obj.hvps == 1  # the one above: timing products are overhead, not counted
    json.dumps(ch)
    apply(obj, {"hvp": "fwd", "chunk": 12})
    assert obj.hvp_mode == "fwd" and obj.batches == [(0, 12), (12, 24)]
    after = obj.hvp(p, torch.ones_like(p))
    assert float((after - before).norm() / before.norm()) <= 1e-12
    # BatchNorm 'train': the batches are part of the function and never re-cut
    obj_t, _ = Objective.from_model(model, x, y, bn="train", bn_batch=BN_BATCH)
    ch = measure(obj_t, p)
    assert {k.split("/")[1] for k in ch["rates"]} == {str(BN_BATCH)}
    with pytest.raises(ValueError):
        obj_t.rechunk(12)


def test_kept_graphs_are_bit_identical_and_follow_the_point():
    model, x, y = MODELS["preact_resnet8"]
    kept, p = Objective.from_model(model, x, y, bn="eval", chunk=10, keep_graph=True)
    fresh, _ = Objective.from_model(model, x, y, bn="eval", chunk=10, keep_graph=False)
    assert Objective.from_model(model, x, y, bn="eval")[0].keeps_graph  # tiny: fits the budget by default
    V = torch.randn(2, p.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mm = kept.matmat(p)
    for _ in range(3):
        assert torch.equal(mm(V), fresh.hvp_many(p, V))
    assert kept._graphs is not None and kept._graphs[0] is p
    p2 = p + 0.05 * V[0]  # another point: new graphs, its own Hessian
    assert torch.equal(kept.hvp_many(p2, V), fresh.hvp_many(p2, V))
    assert kept._graphs[0] is p2
    p2.mul_(1.01)  # changed in place: the version counter tells
    assert torch.equal(kept.hvp_many(p2, V), fresh.hvp_many(p2, V))
    kept.rechunk(12)
    assert kept._graphs is None


def test_objective_reports_work_in_sample_forward_equivalents():
    model, x, y = MODELS["cnn_bn"]
    obj, p = Objective.from_model(model, x, y, chunk=10)
    seen = []
    obj.on_samples = seen.append
    obj.loss(p)
    obj.loss_grad(p)
    obj.hvp_many(p, torch.ones(3, p.numel(), dtype=p.dtype))
    assert seen == [COST_LOSS * N, COST_GRAD * N, 3 * COST_HVP * N] == [24.0, 72.0, 360.0]


# ----------------------------------------------------------------------------- configuration hashes

#: options-part of the configuration ({"metric", "version", "options"}) per metric and option override, computed by
#: /tmp/h3_hashes.py with the code of commit 178cb86 (before hvp=auto): they must never change
OLD_HASHES = {
    'hessian_top|{}': '2ec88ca4f329b0468b791e116d2d6579aa01ff58c87a38713f39e336f75226bd',
    'hessian_top|{"hvp": "rev"}': '2ec88ca4f329b0468b791e116d2d6579aa01ff58c87a38713f39e336f75226bd',
    'hessian_top|{"hvp": "fwd"}': 'e199cfba4c5ebf69b97a8d2d002cabc2ff4fe47492e5644f9811d6fac9b29f05',
    'hessian_top|{"operator": "ggn"}': 'd1aee11b82db7fc09a5fba0faf009962248d9f54b6d83e8d55e6d5417efb2873',
    'hessian_top|{"hvp": "fwd", "operator": "ggn"}': '4b57e39dfc9f85ddbc59efeab29a0bfda25c8318f2f2506bf02c333c186d9a0e',
    'hessian_top|{"iters": 20, "k": 3, "tol": 1e-06}': 'c0b1ba92597854eb7513d9c8bb31bdc98bfd9e4593b4f4bd1c357081bea99647',
    'hessian_trace|{}': '0e04dad1b0c9f0c993e86e4092c6d645c27b46f8f2e39279bc9d3a638ddcd9b0',
    'hessian_trace|{"hvp": "rev"}': '0e04dad1b0c9f0c993e86e4092c6d645c27b46f8f2e39279bc9d3a638ddcd9b0',
    'hessian_trace|{"hvp": "fwd"}': '1109dbefa4c176f757e328dab9ee3b10bca8971b27bda27e3fea74fc7c495a87',
    'hessian_trace|{"operator": "ggn"}': '674d497ce7d895b9a2111ee7e90939d6aefd1a5dfe3e563803c544afd862486b',
    'hessian_trace|{"hvp": "fwd", "operator": "ggn"}': '5b2856abf83eaeb8a67aa3473e5f20914acdd9579c3f575923406dcd26f0893f',
    'hessian_trace|{"iters": 20, "k": 3, "tol": 1e-06}': '0e04dad1b0c9f0c993e86e4092c6d645c27b46f8f2e39279bc9d3a638ddcd9b0',
    'hessian_esd|{}': '863e715573ff7351cf966639393f479e1f15760ceb54cbbcda80b45b16646c01',
    'hessian_esd|{"hvp": "rev"}': '863e715573ff7351cf966639393f479e1f15760ceb54cbbcda80b45b16646c01',
    'hessian_esd|{"hvp": "fwd"}': '6a080919d11dd35992c499a7d1e762822f1b22d94acbcd610f76d8bbc444b24e',
    'hessian_esd|{"operator": "ggn"}': '72ed7d06b7b18ffa49e994a0a83439fd6282f85734f9a4c09e577d5e5b00e79b',
    'hessian_esd|{"hvp": "fwd", "operator": "ggn"}': '0e3efef726ce46476f11ddb9eed3712b2a8f01c32b80de99465a96f963cbce90',
    'hessian_esd|{"iters": 20, "k": 3, "tol": 1e-06}': '863e715573ff7351cf966639393f479e1f15760ceb54cbbcda80b45b16646c01',
    'sharpness|{}': 'f929aba8aee7cd1c7fb6d15bc2c1ea8177e48b5949400fed11983026d4714e69',
    'sharpness|{"hvp": "rev"}': 'f929aba8aee7cd1c7fb6d15bc2c1ea8177e48b5949400fed11983026d4714e69',
    'sharpness|{"hvp": "fwd"}': '035c04f28582ff920f6ba487e46d3b08ab830a919fe67bb739044d0c64cc7086',
    'sharpness|{"operator": "ggn"}': 'b652d9beba85d5f128e7987993f3ad2f721e210d93cdd4a80de687e9c3d0169c',
    'sharpness|{"hvp": "fwd", "operator": "ggn"}': '687b1771598f22a529ba86ce10c3c5eef14e490f6829d3f15d2f5e8ee9f364b6',
    'sharpness|{"iters": 20, "k": 3, "tol": 1e-06}': '7e7fbde7c17cfad07fe543873429d5cc1f0eb051e2fc912a53dd5d9eb63cc4e8',
    'update_alignment|{}': '2431597f7f37958e5946c412ed6200550a15967f64f0431693396f3a6dbfad52',
    'update_alignment|{"hvp": "rev"}': '2431597f7f37958e5946c412ed6200550a15967f64f0431693396f3a6dbfad52',
    'update_alignment|{"hvp": "fwd"}': 'b058e8b77371102e2066efbda2d2c176da9f0e63aa2f2da9856727a45bb49468',
    'update_alignment|{"operator": "ggn"}': 'af2014aad1adfb8291391753b4c4c2b7bc2e988285531f5c0fb11c349bdea68b',
    'update_alignment|{"hvp": "fwd", "operator": "ggn"}': 'b2b8ad7a01cca6ec46753c5eeaa90800c095c2b2366ca142fa3f1a5f60d735e0',
    'update_alignment|{"iters": 20, "k": 3, "tol": 1e-06}': '1726780d62688e71465f9cb2524d8a6feaf5b469e514ef330f1132e648b2f99c',
}


def _options_hash(name: str, overrides: dict) -> str:
    cls = get_metric(name)
    inst = cls(**overrides)
    # version 1, as when the hashes were taken: hessian_top and sharpness are version 2 since issue 13 item 5 (their
    # eos_ratio became momentum-aware, a deliberate recompute); what must not change is the options part
    cfg = {"metric": cls.name, "version": 1,
           "options": {k: v for k, v in inst.options.items() if k not in cls.unit_options}}
    return config_hash(cfg)


@pytest.mark.parametrize("key", sorted(OLD_HASHES))
def test_configuration_hashes_equal_those_before_auto(key):
    name, _, over = key.partition("|")
    assert _options_hash(name, json.loads(over)) == OLD_HASHES[key]


@pytest.mark.parametrize("name", ["hessian_top", "hessian_trace", "hessian_esd", "sharpness", "update_alignment"])
def test_auto_is_the_default_and_hashes_like_rev(name):
    cls = get_metric(name)
    assert cls().hvp_request == "auto" and cls(hvp="rev").hvp_request == "rev"
    assert _options_hash(name, {"hvp": "auto"}) == _options_hash(name, {}) == OLD_HASHES[f"{name}|{{}}"]
    with pytest.raises(AnalysisError, match="hvp"):
        cls(hvp="fast")


# ----------------------------------------------------------------------------- one Lanczos for both metrics

OPTS = {"iters": 60, "tol": 1e-6, "ascent_steps": 2, "noise_draws": 3}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return record_mlp(tmp_path_factory.mktemp("auto") / "run.h5", steps=3, lr=0.3, seed=4)


@pytest.fixture
def hvp_count(monkeypatch):
    """Counts the Hessian-vector products of every Objective (one vector = one product)."""
    count = [0]
    orig = Objective.hvp_many

    def counted(self, p, V):
        count[0] += V.shape[0]
        return orig(self, p, V)

    monkeypatch.setattr(Objective, "hvp_many", counted)
    return count


def _run(archive, out, metrics, **opts):
    known = {k for m in metrics for k in get_metric(m).defaults}
    return analyze(archive, out, metrics=metrics, eval="subset:120", dtype="float64", steps="0:2",
                   options={k: v for k, v in {**OPTS, **opts}.items() if k in known})


def _rows(rep, name):
    t = rep.tables[name]
    return {k: t.rows[k] for k in t.sorted_keys()}


def test_sharpness_reuses_hessian_tops_lanczos_and_rows_equal_separate_runs(archive, tmp_path, hvp_count):
    both = _run(archive, tmp_path / "both.h5", ["hessian_top", "sharpness"], hvp="rev")
    n_both = hvp_count[0]
    hvp_count[0] = 0
    top = _run(archive, tmp_path / "top.h5", ["hessian_top"], hvp="rev")
    n_top = hvp_count[0]
    hvp_count[0] = 0
    sharp = _run(archive, tmp_path / "sharp.h5", ["sharpness"], hvp="rev")
    n_sharp = hvp_count[0]
    assert n_top > 0 and n_both == n_top == n_sharp  # one Lanczos per point, not two
    for name, sep in (("hessian_top", top), ("sharpness", sharp)):
        a, b = _rows(both, name), _rows(sep, name)
        assert list(a) == list(b) == [(0,), (1,)]
        for k in a:
            for col, v in a[k].items():
                np.testing.assert_array_equal(np.asarray(v), np.asarray(b[k][col]), err_msg=f"{name} {k} {col}")
    assert both.tables["hessian_top"].hash == top.tables["hessian_top"].hash
    assert both.tables["sharpness"].hash == sharp.tables["sharpness"].hash
    # sharpness's λ_max is hessian_top's
    for k, row in _rows(both, "sharpness").items():
        assert row["lambda_max"] == _rows(both, "hessian_top")[k]["lambda_max"]


def test_different_eigen_options_do_not_share(archive, tmp_path, hvp_count):
    # hessian_top with k=2 runs a different Lanczos (it stops when both pairs converge): sharpness runs its own
    _run(archive, tmp_path / "k2.h5", ["hessian_top", "sharpness"], hvp="rev", k=2)
    n_both = hvp_count[0]
    hvp_count[0] = 0
    _run(archive, tmp_path / "k2top.h5", ["hessian_top"], hvp="rev", k=2)
    n_top = hvp_count[0]
    assert n_both > n_top


def test_auto_records_its_choice_and_agrees_with_rev(archive, tmp_path, monkeypatch):
    from trajectory.analysis.metrics import curvature as cm

    seen = {}
    orig = cm._Curvature.compute

    def spy(self, ctx, units):
        rows = orig(self, ctx, units)
        seen[self.name] = self.choice()
        return rows

    monkeypatch.setattr(cm._Curvature, "compute", spy)
    auto = _run(archive, tmp_path / "auto.h5", ["hessian_top", "sharpness"])
    assert seen["hessian_top"]["by"] == "auto" and seen["hessian_top"]["hvp"] in ("rev", "fwd")
    assert {k.split("/")[0] for k in seen["hessian_top"]["rates"]} == {"rev", "fwd"}
    assert seen["sharpness"] == seen["hessian_top"]  # measured once per run, shared
    # the choice is stored with the table (outside the configuration), keyed by the run that computed the rows
    stored = auto.tables["hessian_top"].replay
    assert stored["1"]["hvp"] == seen["hessian_top"], stored
    rev = _run(archive, tmp_path / "rev.h5", ["hessian_top", "sharpness"], hvp="rev")
    assert seen["hessian_top"]["by"] == "option"
    assert auto.tables["hessian_top"].hash == rev.tables["hessian_top"].hash
    for name in ("hessian_top", "sharpness"):
        a, b = _rows(auto, name), _rows(rev, name)
        for k in a:
            for col in ("lambda_max", "loss"):
                assert abs(a[k][col] - b[k][col]) <= 1e-9 * abs(b[k][col]), (name, k, col)


# ----------------------------------------------------------------------------- the cache itself

def _result(n: int, vectors: bool = True) -> EigenResult:
    return EigenResult(np.array([1.0]), torch.zeros(1, n) if vectors else None, np.array([0.0]), 3, 4, True)


def test_run_cache_is_bounded_and_sheds_vectors_first():
    c = RunCache(vector_bytes=3 * 4 * 100, max_entries=5)
    for i in range(4):
        c.put_eigen(i, _result(100))
    assert c.get_eigen(0, need_vectors=True) is None  # oldest lost its vectors (4 x 400 bytes > 1200)
    assert c.get_eigen(0, need_vectors=False).values[0] == 1.0  # but keeps its eigenvalues
    assert all(c.get_eigen(i, need_vectors=True) is not None for i in (1, 2, 3))
    for i in range(4, 9):
        c.put_eigen(i, _result(100))
    assert len(c) == 5 and c.get_eigen(1, need_vectors=False) is None


def test_run_cache_lives_as_long_as_its_owner():
    class Owner:
        pass

    o = Owner()
    c = run_cache(o)
    assert run_cache(o) is c and run_cache(Owner()) is not c
    ref = weakref.ref(c)
    del o, c
    gc.collect()
    assert ref() is None
    assert len(_CACHES) == 0  # nothing left over from the analyze() runs above either
    assert isinstance(run_cache(object()), RunCache)  # not weakly referenceable: a private, unshared cache


# ----------------------------------------------------------------------------- cost and progress

def test_cost_and_progress_hook(archive, tmp_path, monkeypatch):
    from trajectory.analysis.metrics import curvature as cm

    log = {"calls": {}, "costs": {}}
    orig = cm._Curvature.compute

    def spy(self, ctx, units):
        # listen to the evaluator's hook (whatever the engine connected to it) during this metric's compute only
        ev = ctx.evaluator
        engine_hook = getattr(ev, "on_samples", None)
        calls = log["calls"].setdefault(self.name, [])

        def listen(n):
            calls.append(float(n))
            if engine_hook is not None:
                engine_hook(n)

        log["costs"][self.name] = log["costs"].get(self.name, 0.0) + self.cost(ctx, units)
        ev.on_samples = listen
        try:
            return orig(self, ctx, units)
        finally:
            ev.on_samples = engine_hook

    monkeypatch.setattr(cm._Curvature, "compute", spy)
    n_eval = 120
    _run(archive, tmp_path / "cost.h5", ["hessian_top", "hessian_trace", "hessian_esd"], hvp="rev", probes=6,
         esd_probes=2, esd_iters=5)
    units = 2
    k, iters = 1, OPTS["iters"]
    assert log["costs"]["hessian_top"] == units * n_eval * (COST_HVP * (iters + k) + COST_LOSS)
    assert log["costs"]["hessian_trace"] == units * n_eval * (COST_HVP * 6 + COST_LOSS)
    assert log["costs"]["hessian_esd"] == units * n_eval * COST_HVP * 2 * 5
    first = {"hessian_top": 1, "hessian_trace": 2, "hessian_esd": 1}  # Hutch++ starts with a block of probes//3 vectors
    for name, calls in log["calls"].items():
        assert calls[0] == COST_HVP * n_eval * first[name]  # the first report is the first product, straight away
        assert len(calls) >= 5  # the bar moves within a unit
        assert sum(calls) == pytest.approx(log["costs"][name], rel=1e-12)  # topped up to the estimate
