"""``sgdwalk train``: train a zoo model (or your own factory) with SGD or Adam, recording its trajectory.

A thin layer over :func:`trajectory.training.train`; loaded by the ``sgdwalk`` group only when invoked.
"""
from __future__ import annotations

import json
import sys

import click

from ._util import EXIT_INTERRUPTED, json_object as _json_object

__all__ = ["train_command"]


@click.command("train")
@click.option("--model", default="mlp", show_default=True, help="Zoo model (mlp, mlp_bn, cnn, cnn_bn, vgg11_bn, resnet18, preact_resnet20, ...) or 'package.module:factory'.")
@click.option("--data", default="mnist1d", show_default=True, help="Zoo data set (mnist1d, cifar10, synthetic) or 'package.module:factory'.")
@click.option("--model-kwargs", metavar="JSON", help="Model factory arguments as a JSON object, e.g. '{\"hidden\": [100, 100]}'.")
@click.option("--data-kwargs", metavar="JSON", help="Data factory arguments as a JSON object, e.g. '{\"num_samples\": 2000}'.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Local directory of a data set read from disk (CIFAR-10: the folder holding cifar-10-batches-py/). Never downloaded.")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Learning rate.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Minibatch size.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Total number of SGD updates of the run.")
@click.option("--momentum", type=float, default=0.0, show_default=True, help="SGD momentum (0 keeps every update exactly replayable).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help="Weight decay (L2, added to the gradient).")
@click.option("--optimizer", "optimizer_name", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True, help="torch.optim.SGD or torch.optim.Adam.")
@click.option("--betas", default="0.9,0.999", show_default=True, metavar="B1,B2", help="Adam's betas.")
@click.option("--eps", type=float, default=1e-8, show_default=True, help="Adam's eps.")
@click.option("--record-optimizer-state", is_flag=True, help="Also record the optimizer state (SGD momentum buffer; Adam exp_avg, exp_avg_sq) with every record; --append then continues from it.")
@click.option("--lr-drop", multiple=True, metavar="STEP:FACTOR", help="Multiply the learning rate by FACTOR from update STEP on (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initialisation and of the minibatch order.")
@click.option("--record", "schedule", default="every", show_default=True, metavar="SCHEDULE", help="Which steps to record: every | every:K | steps:A,B | pairs:T1,T2 | pairs-every:P | window:0-1000:1,1000-:100 | A+B.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Archive to write (.h5).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--append", is_flag=True, help="Resume from the last record of an existing --out and train up to --steps.")
@click.option("--codec", default=None, help="Archive codec (default: the lossless default; see docs/format.md).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available).")
@click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--augment", is_flag=True, help="Use the data set's training augmentation (CIFAR-10: random crop and flip).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--quiet", "-q", is_flag=True, help="Quiet: no progress bar and no summary lines (warnings and errors still go to stderr; --json still prints).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
def train_command(
    model: str,
    data: str,
    model_kwargs: str | None,
    data_kwargs: str | None,
    data_dir: str | None,
    lr: float,
    batch_size: int,
    steps: int,
    momentum: float,
    weight_decay: float,
    optimizer_name: str,
    betas: str,
    eps: float,
    record_optimizer_state: bool,
    lr_drop: tuple[str, ...],
    seed: int,
    schedule: str,
    out: str,
    overwrite: bool,
    append: bool,
    codec: str | None,
    device: str | None,
    num_workers: int,
    augment: bool,
    no_progress: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Train a model with SGD (or Adam) and record its trajectory to an archive.

    \b
    Examples:
      sgdwalk train --out run.h5
      sgdwalk train --model mlp --model-kwargs '{"hidden": [32, 32]}' --steps 300 --out small.h5
      sgdwalk train --model vgg11_bn --data cifar10 --data-dir ~/data --lr 0.1 --batch-size 100 \\
          --weight-decay 1e-4 --steps 50000 --record window:0-500:1,500-:100 --out vgg.h5
      sgdwalk train --optimizer adam --lr 0.001 --record-optimizer-state --out adam.h5
    """
    from trajectory.training import TrainingInterrupted, train

    if overwrite and append:
        raise ValueError("--overwrite and --append exclude each other")
    try:
        summary = train(
            model,
            data,
            model_kwargs=_json_object(model_kwargs, "--model-kwargs"),
            data_kwargs=_json_object(data_kwargs, "--data-kwargs"),
            lr=lr,
            batch_size=batch_size,
            steps=steps,
            momentum=momentum,
            weight_decay=weight_decay,
            optimizer=optimizer_name,
            betas=betas,
            eps=eps,
            record_optimizer_state=record_optimizer_state,
            seed=seed,
            schedule=schedule,
            out=out,
            mode="w" if overwrite else ("a" if append else "x"),
            codec=codec,
            device=device,
            num_workers=num_workers,
            data_dir=data_dir,
            augment=augment,
            progress=not (quiet or no_progress),
            lr_drop=list(lr_drop) or None,
        )
    except TrainingInterrupted as stop:
        s = stop.summary
        click.echo(
            f"interrupted after {s['final_step']} steps: {s['out']} is closed and holds {s['records']} records "
            f"(resume with --append)",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    if summary["first_nonfinite_step"] is not None:
        click.echo(f"warning: the loss became NaN/Inf at step {summary['first_nonfinite_step']}; lower --lr", err=True)
    if quiet:
        return
    loss = "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4g}"
    acc = "-" if summary["final_accuracy"] is None else f"{summary['final_accuracy']:.3f}"
    rate = f", {summary['steps_per_second']:.1f} steps/s" if summary["steps_per_second"] else ""
    click.echo(
        f"trained steps {summary['start_step']}..{summary['final_step']} on {summary['device']} "
        f"in {summary['seconds']:.1f} s{rate}; last minibatch loss {loss}, accuracy {acc}"
    )
    click.echo(f"wrote {summary['out']}: {summary['records']} records ({summary['recorded']} new), codec {summary['codec']}")
