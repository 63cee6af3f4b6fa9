"""Round trip: what the recorder writes, the reader returns bit-exact, under every lossless codec."""
from __future__ import annotations

import random

import h5py
import numpy as np
import pytest
import torch

from conftest import make_mlp, sgd_run
from trajectory import Recorder, Trajectory
from trajectory.archive.codecs import CODECS, get_codec

LOSSLESS = sorted(n for n, c in CODECS.items() if not c.lossy)
LOSSY = sorted(n for n, c in CODECS.items() if c.lossy)


def _record(path, steps=40, batchnorm=True, chunk_rows=None, **kw):
    model = make_mlp(batchnorm=batchnorm)
    snaps: list = []
    with Recorder(path, model, chunk_rows=chunk_rows, **kw) as rec:
        sgd_run(rec, model, steps, snapshots=snaps)
    return model, snaps


def test_every_record_reads_back_bit_exact_and_maps_to_state_dict(archive_path):
    model, snaps = _record(archive_path, steps=40, chunk_rows=8)  # 41 records: 5 full chunks + a partial one
    with Trajectory(archive_path) as traj:
        assert len(traj) == 41
        assert list(traj.steps) == list(range(41))
        assert traj.closed_cleanly and not traj.lossy
        assert list(traj.layout.names()) == list(model.state_dict().keys())
        for i in range(len(traj)):
            sd = traj.state_dict(i)
            assert list(sd) == list(snaps[i])
            for name, value in snaps[i].items():
                assert sd[name].dtype == value.dtype and sd[name].shape == value.shape
                assert torch.equal(sd[name], value), (i, name)
        # load_into puts the record back into a fresh model, buffers (BatchNorm statistics) included
        fresh = make_mlp(batchnorm=True, seed=123)
        traj.load_into(fresh, 17)
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, snaps[17][name])


def test_random_access_sequential_and_block_reads_agree(archive_path):
    _, snaps = _record(archive_path, steps=50, chunk_rows=8)
    with Trajectory(archive_path) as traj:
        names = traj.layout.names("params")
        expect = [torch.cat([s[n].reshape(-1) for n in names]) for s in snaps]
        order = list(range(len(traj)))
        random.Random(0).shuffle(order)
        for i in order:  # random order defeats the reader's XOR-chain shortcut
            assert torch.equal(traj.params(i), expect[i])
        block = traj.params_block(5, 29)
        assert block.shape == (24, traj.n_params)
        for j, i in enumerate(range(5, 29)):
            assert torch.equal(block[j], expect[i])
        pairs = list(traj.pairs())
        assert len(pairs) == 50
        for p in pairs:
            assert torch.equal(p.params_a, expect[p.index]) and torch.equal(p.params_b, expect[p.index + 1])
            assert p.span == 1 and len(p.batch_indices) == 16


@pytest.mark.parametrize("codec", LOSSLESS)
def test_lossless_codecs_are_bit_exact(tmp_path, codec):
    path = tmp_path / f"{codec}.h5"
    _, snaps = _record(path, steps=12, codec=codec, chunk_rows=8)
    with Trajectory(path) as traj:
        assert traj.codec.name == codec and not traj.lossy
        for i in (0, 7, 8, 12, 3):
            for name, value in traj.state_dict(i).items():
                assert torch.equal(value, snaps[i][name])


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codecs_are_marked_and_close(tmp_path, codec):
    path = tmp_path / f"{codec}.h5"
    _, snaps = _record(path, steps=10, codec=codec, batchnorm=False)
    with Trajectory(path) as traj:
        assert traj.lossy and traj.attrs["lossy"] is True
        rel = 2.0**-8 if codec.startswith("bf16") else 2.0**-10
        for i in range(len(traj)):
            for name, value in traj.state_dict(i).items():
                assert torch.allclose(value, snaps[i][name], rtol=rel, atol=1e-6)
            # and really lossy: not bit-identical everywhere
        assert any(not torch.equal(traj.state_dict(5)[n], snaps[5][n]) for n in snaps[5])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_model_dtypes_round_trip_exactly(tmp_path, dtype):
    model = make_mlp(dtype=dtype)
    path = tmp_path / "d.h5"
    with Recorder(path, model) as rec:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        rec.record()
    with Trajectory(path) as traj:
        for name, value in traj.state_dict(1).items():
            assert value.dtype == dtype
            assert torch.equal(value, model.state_dict()[name])
        assert traj.file["params"].attrs["logical_dtype"] == ("float64" if dtype == torch.float64 else "float32" if dtype == torch.bfloat16 else "float16")


def test_xor_transform_is_applied_on_disk(archive_path):
    """The default codec stores XOR-ed bits, first row of each chunk whole: readable with h5py alone."""
    _, snaps = _record(archive_path, steps=20, chunk_rows=8, batchnorm=False)
    import hdf5plugin  # noqa: F401  (registers the filters, as a plain reader would)

    with h5py.File(archive_path, "r") as f:
        ds = f["params"]
        assert ds.attrs["transform"] == "xor" and ds.dtype == np.uint32
        raw = ds[8:16]  # one whole chunk
        values = np.bitwise_xor.accumulate(raw, axis=0).view(np.float32)
        names = [r["name"].decode() for r in f["layout"][()] if r["dataset"] == b"params"]
        expect = np.stack([torch.cat([snaps[i][n].reshape(-1) for n in names]).numpy() for i in range(8, 16)])
        assert np.array_equal(values, expect)
        assert not np.array_equal(raw[1], expect[1].view(np.uint32))  # really XOR-ed


def test_append_continues_the_archive(archive_path):
    model = make_mlp()
    snaps: list = []
    with Recorder(archive_path, model, chunk_rows=8) as rec:
        opt = sgd_run(rec, model, 5, snapshots=snaps)
    with Recorder(archive_path, model, mode="a", chunk_rows=8) as rec:
        assert rec.step == 5
        more: list = []
        sgd_run(rec, model, 6, seed=3, snapshots=more)
    with Trajectory(archive_path) as traj:
        assert list(traj.steps) == list(range(12))
        expected = snaps + more[1:]
        for i in range(12):
            for name, value in traj.state_dict(i).items():
                assert torch.equal(value, expected[i][name])


def test_scalars_and_batches_are_keyed_by_the_update_they_describe(archive_path):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(archive_path, model, optimizer=opt) as rec:
        for s in range(6):
            rec.record(batch_indices=[s, s + 100], custom=float(s) * 2)
    with Trajectory(archive_path) as traj:
        for i in range(6):
            assert list(traj.batch_indices(i)) == [i, i + 100]
        assert len(traj.batch_indices(6)) == 0  # the last record has no leaving update yet
        assert np.allclose(traj.scalars["custom"][:6], np.arange(6) * 2.0)
        assert np.isnan(traj.scalars["custom"][6])
        assert np.allclose(traj.scalars["lr"][:6], 0.05)
        steps, values = traj.scalar_history("custom")
        assert list(steps) == list(range(6))
        assert traj.attrs["optimizer"]["class"] == "torch.optim.sgd.SGD"
        assert traj.attrs["optimizer"]["param_groups"][0]["lr"] == 0.05
