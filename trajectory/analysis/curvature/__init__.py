"""Curvature of the loss along a trajectory: Hessian-vector products and the estimators built on them.

* :class:`Objective` (``objective.py``): mean loss over fixed data as a function of a flat parameter vector,
  with batched Hessian- (or Gauss-Newton-) vector products (torch.func forward-over-reverse, or double backprop).
* ``linalg.py``: Lanczos with full reorthogonalisation, top-k eigenpairs with residuals, power iteration with
  deflation, Hutchinson and Hutch++ traces, stochastic Lanczos quadrature and Gaussian-broadened densities.
* ``sharpness.py``: Keskar's ε-sharpness and the Gaussian-perturbation loss increase.
* ``autotune.py``: the HVP mode and data chunk chosen by timing the candidates (``hvp=auto``).
* ``runcache.py``: state shared by the curvature metrics of one run (the measured choice; top eigenpairs, so that
  ``sharpness`` reuses ``hessian_top``'s Lanczos), bounded and living as long as the run.

The metrics ``hessian_top``, ``hessian_trace``, ``hessian_esd`` and ``sharpness`` live in
:mod:`trajectory.analysis.metrics.curvature`.
"""
from .linalg import (
    EigenResult,
    LanczosResult,
    gaussian_density,
    hutchinson,
    hutchpp,
    lanczos,
    power_deflation,
    slq,
    top_eigen,
)
from .objective import HVP_MODES, OPERATORS, Objective
from .sharpness import eps_sharpness, gaussian_increase

__all__ = [
    "Objective", "HVP_MODES", "OPERATORS", "lanczos", "top_eigen", "power_deflation", "hutchinson", "hutchpp",
    "slq", "gaussian_density", "eps_sharpness", "gaussian_increase", "EigenResult", "LanczosResult",
]
