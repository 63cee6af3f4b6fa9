"""Momentum-aware edge of stability (issue 13 item 5): the threshold against torch's own SGD on quadratics, and the
analyzer's ``eos_ratio`` = λ_max·lr/(2 + 2β) on a run recorded with ``SGD(momentum=0.9)`` against an exact Hessian."""
from __future__ import annotations


import pytest
import torch

from test_analysis_support import record_mlp
from test_curvature_engine import N_EVAL, exact_hessian
from trajectory.analysis import analyze
from trajectory.analysis.curvature.sharpness import eos_critical_step, sgd_momentum


def _torch_sgd_stable(lam: float, lr: float, **kw) -> bool:
    """Run torch.optim.SGD on f(θ) = λθ²/2 for 3000 steps (float64): does |θ| shrink?"""
    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([theta], lr=lr, **kw)
    for _ in range(3000):
        opt.zero_grad()
        (0.5 * lam * theta ** 2).sum().backward()
        opt.step()
    return bool(theta.abs().item() < 1.0)


@pytest.mark.parametrize("beta,damp,nesterov", [(0.0, 0.0, False), (0.9, 0.0, False), (0.5, 0.3, False),
                                                (0.9, 0.0, True), (0.6, 0.0, True)])  # torch refuses Nesterov with dampening
def test_threshold_is_where_torch_sgd_turns_unstable(beta, damp, nesterov):
    crit = eos_critical_step(beta, damp, nesterov)
    lr = 0.1
    kw = {"momentum": beta, "dampening": damp, "nesterov": nesterov} if beta else {}
    assert _torch_sgd_stable(crit / lr * 0.99, lr, **kw)
    assert not _torch_sgd_stable(crit / lr * 1.01, lr, **kw)


def test_closed_forms_and_recorded_optimizer_parsing():
    assert eos_critical_step(0.0) == 2.0
    assert eos_critical_step(0.9) == pytest.approx(3.8)  # (2 + 2β), Cohen et al. 2021
    assert eos_critical_step(0.9, nesterov=True) == pytest.approx(3.8 / 2.8)
    sgd = {"class": "torch.optim.sgd.SGD", "defaults": {"momentum": 0.0},
           "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": False}]}
    assert sgd_momentum(sgd) == (0.9, 0.1, False)
    assert sgd_momentum("") == (0.0, 0.0, False)  # no optimizer recorded: plain SGD assumed
    assert sgd_momentum({"class": "torch.optim.adam.Adam", "param_groups": [{"lr": 1e-3}]}) is None


@pytest.fixture(scope="module")
def momentum_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("eosm") / "run.h5"
    return record_mlp(path, 3, seed=4, make_opt=lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9))


def test_momentum_run_eos_ratio_uses_two_plus_two_beta(momentum_archive, tmp_path):
    rep = analyze(momentum_archive, tmp_path / "r.h5", metrics=["hessian_top", "sharpness"], eval=f"subset:{N_EVAL}",
                  dtype="float64", steps="0:2", options={"k": 1, "tol": 1e-9, "iters": 150, "ascent_steps": 1, "noise_draws": 2})
    for name in ("hessian_top", "sharpness"):
        t = rep.tables[name].arrays()
        for j, pair in enumerate(t["pair"]):
            evals, _, _ = exact_hessian(momentum_archive, lambda traj: (traj.params(int(pair)), None))
            assert t["lr"][j] == pytest.approx(0.2)
            assert t["momentum"][j] == pytest.approx(0.9)
            assert t["eos_threshold"][j] == pytest.approx((2 + 2 * 0.9) / 0.2, rel=1e-12)
            assert t["eos_ratio"][j] == pytest.approx(evals[0] * 0.2 / (2 + 2 * 0.9), rel=1e-6)
