"""The ``optimizer`` metric (issue 14 item 5): the gradient recovered from the recorded optimizer state against the
minibatch gradient of a float64 training loop, the SGD update split and its first-order changes against a float64
loop, Adam's preconditioned sharpness against scipy's ``eigh(H, P)`` of the dense Hessian, the thresholds against
their closed forms and a direct simulation, and the report figure."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from trajectory import Recorder
from trajectory.analysis import analyze
from trajectory.analysis.curvature.preconditioned import adam_threshold
from trajectory.analysis.errors import AnalysisError
from trajectory.archive.reader import Trajectory

N_TRAIN, N_EVAL, BATCH, STEPS = 120, 60, 16, 4
OPTS = {"iters": 200, "tol": 1e-12}


def _model() -> nn.Module:
    """4-5-3 tanh MLP, 43 parameters, float64 (smooth, so the dense Hessian is well defined)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N_TRAIN, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN,), generator=g)
    xt = torch.randn(N_EVAL, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (N_EVAL,), generator=g)
    return x, y, xt, yt


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts]).clone()


def _train(path, make_opt, *, steps: int = STEPS, record_state: bool = True, schedule=None):
    """Train the tiny model with a torch.optim optimizer in float64, recording every step; the loop keeps its own
    copies (θ_i, minibatch gradient, optimizer state before and after) as the independent reference."""
    model = _model()
    opt = make_opt(model.parameters())
    x, y, _, _ = _data()
    g = torch.Generator().manual_seed(7)
    loop = []
    params = list(model.parameters())

    def state(key):
        return _flat([opt.state[p][key] if key in opt.state[p] else torch.zeros_like(p) for p in params])

    keys = ["momentum_buffer"] if isinstance(opt, torch.optim.SGD) else ["exp_avg", "exp_avg_sq"]
    with Recorder(path, model, optimizer=opt, optimizer_state=record_state, flush_interval=0.1, schedule=schedule) as rec:
        for _ in range(steps):
            idx = torch.randint(0, N_TRAIN, (BATCH,), generator=g)
            theta = _flat(params)
            before = {k: state(k) for k in keys}
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            grad = _flat([p.grad for p in params])
            opt.step()
            loop.append({"theta": theta, "grad": grad, "before": before, "after": {k: state(k) for k in keys},
                         "theta_next": _flat(params)})
            rec.record(batch_indices=idx, loss=loss.detach())
    return str(path), loop


def _analyze(arch, out, **kw):
    x, y, xt, yt = _data()
    rep = analyze(arch, out, metrics=["optimizer"], model=_model(), data={"train": TensorDataset(x, y), "test": TensorDataset(xt, yt)},
                  eval="test", dtype="float64", options={**OPTS, **kw.pop("options", {})}, **kw)
    return rep.tables["optimizer"].arrays()


def _eval_loss(model, theta, x, y, reduction="mean"):
    """L on (x, y) at the flat parameter vector theta, differentiable in theta (torch.func.functional_call)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    parts, pos = {}, 0
    for n, s in zip(names, shapes):
        k = int(np.prod(s))
        parts[n] = theta[pos : pos + k].view(s)
        pos += k
    return F.cross_entropy(torch.func.functional_call(model, parts, (x,)), y, reduction=reduction)


def _dense(theta):
    """Loss, gradient, dense Hessian (torch.autograd.functional.hessian) and per-sample gradients at theta, float64."""
    model = _model()
    _, _, xt, yt = _data()
    f = lambda t: _eval_loss(model, t, xt, yt)  # noqa: E731
    H = torch.autograd.functional.hessian(f, theta.clone())
    t = theta.clone().requires_grad_(True)
    loss = f(t)
    g = torch.autograd.grad(loss, t)[0]
    G = torch.stack([torch.autograd.grad(_eval_loss(model, t, xt[j : j + 1], yt[j : j + 1]), t)[0] for j in range(N_EVAL)])
    return float(loss), g.detach(), H.detach(), G.detach()


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------------------ closed forms
def _frozen_adam_stable(lam: float, lr: float, beta1: float) -> bool:
    """Adam's first-moment EMA with a frozen preconditioner (P = 1) on f(θ) = λθ²/2, 4000 steps: does |θ| shrink?"""
    theta, m = 1.0, 0.0
    for _ in range(4000):
        m = beta1 * m + (1 - beta1) * lam * theta
        theta -= lr * m
    return abs(theta) < 1.0


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9, 0.95])
def test_adam_threshold_closed_form_and_where_frozen_adam_turns_unstable(beta1):
    lr = 0.01
    thr = adam_threshold(beta1, lr)
    assert thr == pytest.approx((2 + 2 * beta1) / ((1 - beta1) * lr), rel=1e-15)
    assert _frozen_adam_stable(0.99 * thr, lr, beta1) and not _frozen_adam_stable(1.01 * thr, lr, beta1)
    assert adam_threshold(0.9, 1.0) == pytest.approx(38.0)
    assert math.isnan(adam_threshold(0.9, float("nan")))


# ------------------------------------------------------------------------------------------ SGD
SGD_CASES = {
    "heavy_ball": dict(lr=0.3, momentum=0.9),
    "dampening_wd": dict(lr=0.3, momentum=0.9, dampening=0.1, weight_decay=0.05),
    "nesterov_wd": dict(lr=0.2, momentum=0.8, nesterov=True, weight_decay=0.05),
}


@pytest.mark.parametrize("case", sorted(SGD_CASES))
def test_sgd_momentum_split_matches_a_float64_loop(case, tmp_path):
    kw = SGD_CASES[case]
    arch, loop = _train(tmp_path / "run.h5", lambda ps: torch.optim.SGD(ps, **kw))
    got = _analyze(arch, tmp_path / "r.h5")
    lr, beta, tau, wd = kw["lr"], kw["momentum"], kw.get("dampening", 0.0), kw.get("weight_decay", 0.0)
    assert list(got["pair"]) == list(range(STEPS)) and (got["status"] == 0).all() and (got["optimizer"] == 1).all()
    for r, i in enumerate(got["pair"]):
        st = loop[int(i)]
        theta, gB, m0 = st["theta"], st["grad"], st["before"]["momentum_buffer"]
        first = i == 0
        c = 1.0 if first else 1.0 - tau
        d = gB + wd * theta
        if kw.get("nesterov"):
            mom, gpart = -lr * beta * beta * m0, -lr * (1 + beta * c) * d
        else:
            mom, gpart = -lr * beta * m0, -lr * c * d
        delta = st["theta_next"] - theta
        np.testing.assert_allclose((mom + gpart).numpy(), delta.numpy(), rtol=1e-10, atol=1e-14)  # the reference itself
        loss, g, H, G = _dense(theta)
        lam = float(np.linalg.eigvalsh(H.numpy())[-1])
        U = (G @ torch.stack([mom, gpart]).T).numpy()
        ref = {
            "loss": loss, "grad_norm": float(g.norm()), "lr": lr, "momentum": beta,
            "gopt_norm": float(gB.norm()), "gb_norm": float(gB.norm()), "cos_gopt_gb": 1.0,
            "update_norm": float(delta.norm()), "cos_update": _cos(delta, -g),
            "mom_norm": float(mom.norm()), "grad_part_norm": float(gpart.norm()),
            "cos_grad_g": _cos(gpart, -g), "pred_change": float(g @ delta),
            "pred_change_mom": float(g @ mom), "pred_change_grad": float(g @ gpart),
            "share_mom": float(g @ mom) / float(g @ (mom + gpart)),
            "pred_change_mom_se": float(U[:, 0].std(ddof=1) / np.sqrt(N_EVAL)),
            "pred_change_grad_se": float(U[:, 1].std(ddof=1) / np.sqrt(N_EVAL)),
            "noise_units": N_EVAL, "lambda_max": lam,
            "eos_threshold": (2 + 2 * beta) / (lr * (1 + beta + beta * (1 - tau)) if kw.get("nesterov") else lr * (1 - tau)),
        }
        ref["eos_ratio"] = lam / ref["eos_threshold"]
        if not first:
            ref["cos_mom_g"] = _cos(mom, -g)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k][r], v, rtol=1e-8, atol=1e-13, err_msg=f"{case} pair {i} {k}")
        assert got["rel_err_gopt"][r] < 1e-10 and got["update_residual"][r] < 1e-10
        assert got["converged"][r]
        assert np.isnan(got["precond_lambda_max"][r])


# ------------------------------------------------------------------------------------------ Adam
ADAM_CASES = {
    "adam": (torch.optim.Adam, dict(lr=0.05)),
    "adam_l2": (torch.optim.Adam, dict(lr=0.05, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)),
    "adamw": (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    "amsgrad": (torch.optim.Adam, dict(lr=0.05, amsgrad=True)),
}


@pytest.mark.parametrize("case", sorted(ADAM_CASES))
def test_adam_preconditioned_sharpness_matches_eigh_of_the_dense_hessian(case, tmp_path):
    cls, kw = ADAM_CASES[case]
    arch, loop = _train(tmp_path / "run.h5", lambda ps: cls(ps, **kw))
    got = _analyze(arch, tmp_path / "r.h5")
    lr = kw["lr"]
    beta1, beta2 = kw.get("betas", (0.9, 0.999))
    eps, wd = kw.get("eps", 1e-8), kw.get("weight_decay", 0.0 if cls is torch.optim.Adam else 0.01)
    decoupled = cls is torch.optim.AdamW
    vkey = "max_exp_avg_sq" if kw.get("amsgrad") else "exp_avg_sq"
    assert (got["status"] == 0).all() and (got["optimizer"] == (3 if decoupled else 2)).all()
    with Trajectory(arch) as traj:
        for r, i in enumerate(got["pair"]):
            st = loop[int(i)]
            theta, gB = st["theta"], st["grad"]
            s = int(i) + 1  # Adam's step count after the update leaving record i
            v = traj.optimizer_state(int(i) + 1)[vkey].double()
            assert float(traj.optimizer_state(int(i) + 1)["step"]) == s
            if vkey == "exp_avg_sq":  # the recorded state is the loop's own
                np.testing.assert_allclose(v.numpy(), st["after"]["exp_avg_sq"].numpy(), rtol=1e-15)
            P = (1 - beta1 ** s) * (torch.sqrt(v / (1 - beta2 ** s)) + eps)
            loss, g, H, _ = _dense(theta)
            Hs = H + (0.0 if decoupled else wd) * torch.eye(len(theta), dtype=torch.float64)
            lam = float(scipy.linalg.eigh(Hs.numpy(), np.diag(P.numpy()), eigvals_only=True)[-1])
            lam_eig = float(np.max(np.linalg.eigvals(np.diag(1 / P.numpy()) @ Hs.numpy()).real))
            assert lam == pytest.approx(lam_eig, rel=1e-9)
            delta = st["theta_next"] - theta
            pg = g / P
            ref = {
                "precond_lambda_max": lam, "eos_threshold": (2 + 2 * beta1) / ((1 - beta1) * lr),
                "loss": loss, "grad_norm": float(g.norm()), "momentum": beta1,
                "gopt_norm": float(gB.norm()), "gb_norm": float(gB.norm()),
                "update_norm": float(delta.norm()), "cos_update": _cos(delta, -g),
                "cos_update_pg": _cos(delta, -pg), "precond_step_norm": lr * float(pg.norm()),
                "bias_correction1": 1 - beta1 ** s, "p_min": float(P.min()), "p_max": float(P.max()),
            }
            ref["eos_ratio"] = lam / ref["eos_threshold"]
            for k, val in ref.items():
                np.testing.assert_allclose(got[k][r], val, rtol=1e-8, atol=1e-13, err_msg=f"{case} pair {i} {k}")
            assert got["rel_err_gopt"][r] < 1e-9 and got["update_residual"][r] < 1e-10
            assert got["masked"][r] == 0 and got["converged"][r]
            assert np.isnan(got["lambda_max"][r]) and np.isnan(got["share_mom"][r])


def test_sgd_lambda_max_is_hessian_tops_through_the_shared_lanczos(tmp_path):
    """With hessian_top in the same run (same options, same seeded start vector) SGD's λ_max is the same number."""
    arch, _ = _train(tmp_path / "run.h5", lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9), steps=2)
    x, y, xt, yt = _data()
    rep = analyze(arch, tmp_path / "r.h5", metrics=["optimizer", "hessian_top"], model=_model(), eval="test",
                  data={"train": TensorDataset(x, y), "test": TensorDataset(xt, yt)}, dtype="float64",
                  options={"iters": 30, "tol": 1e-6, "at": "record"})
    opt, top = rep.tables["optimizer"].arrays(), rep.tables["hessian_top"].arrays()
    np.testing.assert_array_equal(opt["lambda_max"], top["lambda_max"])
    np.testing.assert_array_equal(opt["eos_ratio"], top["eos_ratio"])


def test_recovered_gradients_from_the_state_alone_match_the_loop(tmp_path):
    """The split functions on the recorded rows (no model, no data) give the loop's minibatch gradients."""
    from trajectory.analysis.curvature.preconditioned import adam_split, parse_optimizer, sgd_split

    for name, make, split in (
        ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9, dampening=0.2, weight_decay=0.05), "sgd"),
        ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1), "adam"),
    ):
        arch, loop = _train(tmp_path / f"{name}.h5", make, steps=3)
        with Trajectory(arch) as traj:
            hp = parse_optimizer(traj.attrs["optimizer"])
            for i in range(3):
                s0, s1 = traj.optimizer_state(i), traj.optimizer_state(i + 1)
                th = traj.params(i).double()
                if split == "sgd":
                    out = sgd_split(hp, th, s0["momentum_buffer"], s1["momentum_buffer"], 0.3)
                else:
                    out = adam_split(hp, th, s0["exp_avg"], s1["exp_avg"], s1["exp_avg_sq"], float(s1["step"]), 0.05)
                np.testing.assert_allclose(out["g"].numpy(), loop[i]["grad"].numpy(), rtol=1e-9, atol=1e-14, err_msg=f"{name} {i}")
                np.testing.assert_allclose(out["update"].numpy(), (loop[i]["theta_next"] - loop[i]["theta"]).numpy(),
                                           rtol=1e-9, atol=1e-14, err_msg=f"{name} {i}")


# ------------------------------------------------------------------------------------------ refusals and NaN rows
def test_archive_without_optimizer_state_is_one_error_naming_the_flag(tmp_path):
    arch, _ = _train(tmp_path / "run.h5", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), steps=2, record_state=False)
    with pytest.raises(AnalysisError) as e:
        _analyze(arch, tmp_path / "r.h5")
    msg = str(e.value)
    assert "\n" not in msg and "--record-optimizer-state" in msg and "optimizer_state=True" in msg


def test_unsupported_optimizer_and_bad_options_are_one_error():
    from trajectory.analysis.curvature.preconditioned import parse_optimizer
    from trajectory.analysis.metrics.optimizer import OptimizerMetric

    with pytest.raises(AnalysisError, match="SGD, Adam and AdamW.*RMSprop"):
        parse_optimizer({"class": "torch.optim.rmsprop.RMSprop", "param_groups": [{"lr": 0.1}]})
    with pytest.raises(AnalysisError, match="records no optimizer"):
        parse_optimizer("")
    two = lambda **b: {"class": "torch.optim.adamw.AdamW", "param_groups": [  # noqa: E731
        {"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}, {"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, **b}]}
    assert parse_optimizer(two(weight_decay=0.0)).weight_decay == 0.01  # AdamW's no-decay group: allowed
    with pytest.raises(AnalysisError, match="different betas"):
        parse_optimizer(two(weight_decay=0.0, betas=[0.8, 0.999]))
    sgd2 = {"class": "torch.optim.sgd.SGD", "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
                                                            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}]}
    with pytest.raises(AnalysisError, match="different weight_decay"):
        parse_optimizer(sgd2)
    with pytest.raises(AnalysisError, match="at must be 'record'"):
        OptimizerMetric(at="floor")
    with pytest.raises(AnalysisError, match="noise"):
        OptimizerMetric(noise="bootstrap")
    with pytest.raises(AnalysisError, match="iters"):
        OptimizerMetric(iters=0)


def test_pairs_spanning_several_steps_get_nan_rows_with_a_reason(tmp_path):
    arch, _ = _train(tmp_path / "run.h5", lambda ps: torch.optim.Adam(ps, lr=0.05), steps=4, schedule="every:2")
    got = _analyze(arch, tmp_path / "r.h5")
    assert len(got["pair"]) == 2 and (got["status"] == 1).all()
    assert np.isnan(got["precond_lambda_max"]).all() and np.isnan(got["gopt_norm"]).all()


def test_adam_step_count_that_does_not_advance_is_a_nan_row_with_a_reason(tmp_path, monkeypatch):
    """A skipped optimizer step (e.g. AMP's GradScaler) leaves Adam's step count unchanged across a pair: status 3."""
    arch, _ = _train(tmp_path / "run.h5", lambda ps: torch.optim.Adam(ps, lr=0.05), steps=3)
    real = Trajectory.optimizer_state

    def stalled(self, i):
        out = real(self, i)
        if i == 2:
            out["step"] = torch.tensor(1.0, dtype=torch.float64)  # as at record 1
        return out

    monkeypatch.setattr(Trajectory, "optimizer_state", stalled)
    got = _analyze(arch, tmp_path / "r.h5")
    assert got["status"].tolist() == [0, 3, 3]  # 1 -> 1 and 1 -> 3 across pairs 1 and 2
    assert np.isnan(got["precond_lambda_max"][1:]).all() and np.isfinite(got["precond_lambda_max"][0])


def test_summary_shows_the_recorded_optimizers_columns(tmp_path):
    from trajectory.analysis.metrics.optimizer import OptimizerMetric

    arch, _ = _train(tmp_path / "run.h5", lambda ps: torch.optim.Adam(ps, lr=0.05), steps=2)
    got = _analyze(arch, tmp_path / "r.h5")
    s = OptimizerMetric().summarize(got)
    assert s["pairs"] == s["computed"] == 2 and "median_share_mom" not in s
    assert s["median_precond_lambda_max"] == pytest.approx(float(np.median(got["precond_lambda_max"])))


# ------------------------------------------------------------------------------------------ report
def test_report_draws_the_optimizer_figure(tmp_path):
    from trajectory.report import build_report

    arch, _ = _train(tmp_path / "sgd.h5", lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9), steps=3)
    arch2, _ = _train(tmp_path / "adam.h5", lambda ps: torch.optim.Adam(ps, lr=0.05), steps=3)
    _analyze(arch, tmp_path / "sgd_r.h5")
    _analyze(arch2, tmp_path / "adam_r.h5")
    res = build_report([str(tmp_path / "sgd_r.h5"), str(tmp_path / "adam_r.h5")], tmp_path / "rep")
    assert "optimizer" in res.figures and "optimizer" not in res.omitted
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Optimizer-aware analysis" in html


def test_rows_round_trip_through_to_pandas(tmp_path):
    import trajectory

    pytest.importorskip("pandas")
    arch, _ = _train(tmp_path / "run.h5", lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9), steps=2)
    got = _analyze(arch, tmp_path / "r.h5")
    df = trajectory.Results(tmp_path / "r.h5").to_pandas("optimizer")
    assert df["pair"].tolist() == [0, 1]
    for col, want in got.items():
        if col in df.columns:
            np.testing.assert_array_equal(df[col].to_numpy(dtype=np.float64), np.asarray(want, dtype=np.float64), err_msg=col)
