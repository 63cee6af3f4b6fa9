"""Bounded scalar minimisation written as a generator, so many minimisations can run in lock step.

:func:`bounded_brent` is Brent's method on a closed interval (golden-section steps combined with
successive parabolic interpolation), the algorithm of scipy's ``minimize_scalar(method="bounded")``
(``fminbound``), transcribed so that it *yields* each abscissa it wants evaluated and receives the
true function value back. The replay engine drives one generator per pair and evaluates the
requested points of all pairs in a single batched pass.

    gen = bounded_brent(lo, hi, xtol)
    x = next(gen)
    while True:
        try:
            x = gen.send(f(x))
        except StopIteration as stop:
            x_best, f_best, n_evals = stop.value
            break
"""
from __future__ import annotations

import math
from typing import Generator

__all__ = ["bounded_brent", "endpoint_brent", "run_lockstep"]

_GOLDEN = 0.5 * (3.0 - math.sqrt(5.0))
_SQRT_EPS = math.sqrt(2.2e-16)


def bounded_brent(lo: float, hi: float, xtol: float = 1e-5, maxiter: int = 100) -> Generator[float, float, tuple[float, float, int]]:
    """Minimise a function on ``[lo, hi]``; yields points, receives values, returns (x, f(x), evaluations).

    Terminates when the bracket around the best point is within ``xtol`` (absolute, plus a relative
    part ``sqrt(eps)*|x|``), as scipy's ``fminbound``. A NaN value ends the search at once with a NaN result.
    """
    a, b = float(lo), float(hi)
    if not a < b:
        raise ValueError(f"empty interval [{lo}, {hi}]")
    fulc = a + _GOLDEN * (b - a)
    nfc = xf = fulc
    rat = e = 0.0
    x = xf
    fx = yield x
    num = 1
    if math.isnan(fx):
        return x, fx, num
    fu = math.inf
    ffulc = fnfc = fx
    xm = 0.5 * (a + b)
    tol1 = _SQRT_EPS * abs(xf) + xtol / 3.0
    tol2 = 2.0 * tol1
    while abs(xf - xm) > (tol2 - 0.5 * (b - a)):
        golden = True
        if abs(e) > tol1:  # try a parabolic step
            golden = False
            r = (xf - nfc) * (fx - ffulc)
            q = (xf - fulc) * (fx - fnfc)
            p = (xf - fulc) * q - (xf - nfc) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            r = e
            e = rat
            if (abs(p) < abs(0.5 * q * r)) and (p > q * (a - xf)) and (p < q * (b - xf)):
                rat = (p + 0.0) / q
                x = xf + rat
                if ((x - a) < tol2) or ((b - x) < tol2):
                    si = math.copysign(1.0, xm - xf) if xm != xf else 1.0
                    rat = tol1 * si
            else:
                golden = True
        if golden:
            e = (a - xf) if xf >= xm else (b - xf)
            rat = _GOLDEN * e
        si = math.copysign(1.0, rat) if rat != 0 else 1.0
        x = xf + si * max(abs(rat), tol1)
        fu = yield x
        num += 1
        if math.isnan(fu):
            return x, fu, num
        if fu <= fx:
            if x >= xf:
                a = xf
            else:
                b = xf
            fulc, ffulc = nfc, fnfc
            nfc, fnfc = xf, fx
            xf, fx = x, fu
        else:
            if x < xf:
                a = x
            else:
                b = x
            if (fu <= fnfc) or (nfc == xf):
                fulc, ffulc = nfc, fnfc
                nfc, fnfc = x, fu
            elif (fu <= ffulc) or (fulc == xf) or (fulc == nfc):
                fulc, ffulc = x, fu
        xm = 0.5 * (a + b)
        tol1 = _SQRT_EPS * abs(xf) + xtol / 3.0
        tol2 = 2.0 * tol1
        if num >= maxiter:
            break
    return xf, fx, num


def endpoint_brent(end: float, f_end: float, other: float, xtol: float = 1e-5, maxiter: int = 100):
    """Minimise on the grid interval between ``end`` (the grid minimum, at an end of the segment) and ``other``.

    First probes ``end`` moved inwards by ``delta = max(4·xtol, 1e-4)`` (capped at half the interval): if the
    loss there is not lower than ``f_end``, the floor is the end itself (one evaluation, the usual case
    while the loss still falls along the whole update); otherwise bounded Brent runs on the interval.
    """
    delta = min(max(4 * xtol, 1e-4), 0.5 * abs(other - end))
    probe = end + delta if other > end else end - delta
    fp = yield probe
    if math.isnan(fp):
        return probe, fp, 1
    if fp >= f_end:
        return end, f_end, 1
    lo, hi = (end, other) if other > end else (other, end)
    x, fx, n = yield from bounded_brent(lo, hi, xtol, maxiter)
    if fp < fx:
        x, fx = probe, fp
    return x, fx, n + 1


def run_lockstep(generators, evaluate):
    """Drive several :func:`bounded_brent` generators together.

    ``evaluate(requests)`` gets a list of ``(generator_index, x)`` and returns the values in the same
    order; it is called once per round with every still-running generator's request. Returns the
    generators' results in order.
    """
    results = [None] * len(generators)
    pending = {}
    for i, g in enumerate(generators):
        pending[i] = next(g)
    while pending:
        reqs = list(pending.items())
        values = evaluate(reqs)
        pending = {}
        for (i, _), v in zip(reqs, values):
            try:
                pending[i] = generators[i].send(float(v))
            except StopIteration as stop:
                results[i] = stop.value
    return results
