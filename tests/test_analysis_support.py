"""Shared helpers for the analyzer tests (no tests here): tiny archives recorded with the real Recorder."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trajectory import Recorder
from trajectory.specs import Spec

MLP_KW = {"in_features": 40, "hidden": [16], "num_classes": 10}
DATA_KW = {"num_samples": 600, "seed": 3}


def mlp_spec(**kw) -> Spec:
    return Spec("trajectory.zoo.models:mlp", {**MLP_KW, **kw})


def data_spec() -> Spec:
    return Spec("trajectory.zoo.data:mnist1d", dict(DATA_KW))


def record_mlp(path, steps: int = 12, *, lr: float = 0.2, batch: int = 32, seed: int = 0, batchnorm: bool = False,
               model_spec=None, nan_at: int | None = None, every: int = 1, make_opt=None,
               optimizer_state: bool = False) -> str:
    """Train a small zoo MLP on MNIST-1D for ``steps`` updates, recording every step: plain SGD at ``lr``, or the
    optimizer ``make_opt(parameters)`` builds (its state recorded too with ``optimizer_state``)."""
    torch.manual_seed(seed)
    spec = mlp_spec(batchnorm=batchnorm)
    model = spec.build()
    ds = data_spec().build(split="train")
    x, y = ds.tensors
    opt = make_opt(model.parameters()) if make_opt is not None else torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    with Recorder(path, model, optimizer=opt, model_spec=model_spec or spec, data_spec=data_spec(),
                  schedule=f"every:{every}" if every > 1 else None, flush_interval=0.1,
                  optimizer_state=optimizer_state) as rec:
        for s in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=g)
            model.train()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if nan_at is not None and s == nan_at:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            rec.record(batch_indices=idx, loss=loss.detach())
    return str(path)


def brute_force(model: nn.Module, sa: dict, sb: dict, alphas, x, y, *, bn: str = "eval", bn_batch: int | None = None,
                loss: str = "cross_entropy", bn_seed: int = 2):
    """Plain float64 reference: load_state_dict per point and run model(x). Under bn='train' the samples are
    grouped as the analyzer does: true batches of bn_batch from torch.randperm seeded bn_seed (the analyzer's
    subset_seed + 2), the remainder dropped."""
    if bn == "train" and bn_batch:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(bn_seed))
        if len(x) >= bn_batch:
            perm = perm[: (len(x) // bn_batch) * bn_batch]
        x, y = x[perm], y[perm]
    model = model.double()
    out_l, out_a = [], []
    for a in alphas:
        sd = {}
        for k in sa:
            if sa[k].is_floating_point():
                sd[k] = (sa[k].double() + a * (sb[k].double() - sa[k].double()))
            else:
                sd[k] = sa[k]
        model.load_state_dict(sd)
        model.eval()
        if bn == "train":
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        xs = x.double()
        with torch.no_grad():
            if bn == "train" and bn_batch:
                outs = [model(c) for c in torch.split(xs, bn_batch)]
                out = torch.cat(outs)
            else:
                out = model(xs)
            if loss == "cross_entropy":
                out_l.append(float(F.cross_entropy(out, y)))
                out_a.append(float((out.argmax(1) == y).double().mean()))
            else:
                out_l.append(float(((out - y.double().view_as(out)) ** 2).mean()))
                out_a.append(float("nan"))
    return np.array(out_l), np.array(out_a)


def install_metric_plugin(site, module: str, source: str, metric: str, cls: str):
    """'Install' a metric plug-in: its module plus a NAME.dist-info (METADATA + entry_points.txt) in ``site``,
    which importlib.metadata discovers when ``site`` is on PYTHONPATH. Returns ``site``."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(source)
    dist = module.replace("_", "-")
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sgdwalk.metrics]\n{metric} = {module}:{cls}\n")
    return site
