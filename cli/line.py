"""``sgdwalk line A.h5:STEP B.h5:STEP``: the loss on the straight line between two recorded points.

A thin layer over :func:`trajectory.analysis.line.analyze_line`: two records of one archive (θ₀ → θ_T) or of two
archives with the same layout (two seeds). Loaded by the ``sgdwalk`` group only when invoked.
"""
from __future__ import annotations

import json
import math

import click

__all__ = ["line_command"]


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.6g}"


@click.command("line")
@click.argument("a")
@click.argument("b")
@click.option("--alphas", default=None, help="Grid of t on θ_A + t·(θ_B − θ_A): start:stop:count or a comma list [0:1:21].")
@click.option("--eval", "eval_", default="test", show_default=True, help="Evaluation data: test, train or subset:N.")
@click.option("--bn", default="train", show_default=True, type=click.Choice(["train", "eval", "recompute"]), help="BatchNorm policy.")
@click.option("--dtype", default="float64", show_default=True, type=click.Choice(["float32", "float64"]))
@click.option("--loss", default="cross_entropy", show_default=True, type=click.Choice(["cross_entropy", "mse"]))
@click.option("--device", default=None, help="Torch device (default: cuda when available).")
@click.option("--se-chunks", default=10, show_default=True, type=int, help="Data chunks for standard errors (0: none).")
@click.option("--trust-specs", is_flag=True, help="Build model/data specs stored in the archive that are not sgdwalk's zoo.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the result as JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the table.")
def line_command(a: str, b: str, alphas, eval_, bn, dtype, loss, device, se_chunks, trust_specs, out, as_json) -> None:
    """Loss on the straight line from A to B, each ARCHIVE:STEP (STEP: an optimizer step, first or last).

    Curve, floor (grid minimum), barrier max(path) − max(ends) with its standard error, and whether the loss
    decreases monotonically. A and B may be two archives with the same layout (e.g. two seeds).
    """
    from trajectory.analysis.line import analyze_line

    res = analyze_line(a, b, alphas=alphas, eval=eval_, bn=bn, dtype=dtype, loss=loss, device=device,
                       trust_specs=trust_specs, se_chunks=se_chunks)
    if out:
        res.save(out)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=1))
        return
    for k, e in zip("AB", res.ends):
        click.echo(f"{k}: {e['path']} step {e['step']} (record {e['record']}, {e['identity']})")
    click.echo(f"distance ‖θ_B − θ_A‖ = {_fmt(res.distance)}; eval {res.settings['eval']}, {res.settings['dtype']}, bn {res.settings['bn']}")
    click.echo(f"{'t':>8} {'loss':>12} {'se':>10} {'acc':>8}")
    for t, l, s, c in zip(res.t, res.loss, res.loss_se, res.acc):
        click.echo(f"{t:8.4g} {_fmt(l):>12} {_fmt(s):>10} {_fmt(c):>8}")
    click.echo(f"floor at t = {_fmt(res.floor_t)} (loss {_fmt(res.floor_loss)}); barrier {_fmt(res.barrier)} ± "
               f"{_fmt(res.barrier_se)} at t = {_fmt(res.barrier_t)}; monotonic: {'yes' if res.monotonic else 'no'}")
    if res.max_rise_t:
        click.echo(f"largest rise {_fmt(res.max_rise)} ± {_fmt(res.max_rise_se)} from t = {_fmt(res.max_rise_t[0])} "
                   f"to t = {_fmt(res.max_rise_t[1])}")
