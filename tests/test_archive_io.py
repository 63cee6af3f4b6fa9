"""Archive I/O: block-decoded reads equal row-by-row reads, compaction keeps files near their data, checks name damage."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from trajectory import Recorder, Trajectory
from trajectory.archive.compact import storage_bytes
from trajectory.errors import ArchiveFormatError


def _record(path: Path, n: int, *, codec: str | None = None, flush_interval: float = 3600.0, chunk_rows: int = 8,
            width: int = 300, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 20), torch.nn.BatchNorm1d(20), torch.nn.Linear(20, 3))
    kw = {} if codec is None else {"codec": codec}
    states = []
    with Recorder(path, model, chunk_rows=chunk_rows, flush_interval=flush_interval, **kw) as rec:
        states.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        g = torch.Generator().manual_seed(seed)
        for s in range(n - 1):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3)
                model[1].running_mean.add_(0.1)
            rec.record(batch_indices=[s])
            states.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    return states


@pytest.mark.parametrize("codec", [None, "zstd", "bf16-xor-blosc-zstd-bit"])
def test_block_reads_equal_row_by_row_reads(tmp_path: Path, codec: str | None) -> None:
    path = tmp_path / "a.h5"
    states = _record(path, 29, codec=codec)  # 3 full chunks of 8 and a partial one of 5
    with Trajectory(path) as new, Trajectory(path, cache_bytes=0) as old:
        order = list(range(29)) + list(np.random.default_rng(1).permutation(29)) + [28, 0, 27, 8, 7]
        for i in order:
            a, b = new.params(i), old.params(i)
            assert torch.equal(a, b), i
            assert torch.equal(new.buffers(i), old.buffers(i)) and torch.equal(new.int_buffers(i), old.int_buffers(i))
            if codec is None or codec == "zstd":
                assert torch.equal(a, states[i]), i  # lossless: bit-exact
        assert torch.equal(new.params_block(3, 27), old.params_block(3, 27))
        pairs_new = [(p.index, p.params_a, p.params_b) for p in new.pairs()]
        pairs_old = [(p.index, p.params_a, p.params_b) for p in old.pairs()]
        assert len(pairs_new) == 28
        for (i, a, b), (j, c, d) in zip(pairs_new, pairs_old):
            assert i == j and torch.equal(a, c) and torch.equal(b, d)
        a = new.params(3)
        a.fill_(0.0)  # returned tensors are copies: the cached block is untouched
        assert torch.equal(new.params(3), old.params(3))


def test_decoded_blocks_are_bounded_by_cache_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    _record(path, 40)
    with Trajectory(path, cache_bytes=1) as t:  # smaller than one block: row-by-row fallback, nothing kept
        assert t._rows["params"].max_blocks == 0
        t.params(5)
        assert not t._rows["params"]._blocks
    with Trajectory(path) as t:
        for i in range(40):
            t.params(i)
        r = t._rows["params"]
        assert 0 < len(r._blocks) <= r.max_blocks


def test_frequent_flushes_leave_no_dead_space(tmp_path: Path) -> None:
    """flush_interval=0 rewrites the open chunk at every record: SWMR leaks each copy until close compacts."""
    path = tmp_path / "f.h5"
    states = _record(path, 60, flush_interval=0.0, width=3000)
    size, stored = os.path.getsize(path), storage_bytes(path)
    assert size <= 1.05 * stored + (64 << 10), (size, stored)
    with Trajectory(path) as t:
        assert t.closed_cleanly and len(t) == 60 and t.checksums and t.uuid
        for i in (0, 17, 59):
            assert torch.equal(t.params(i), states[i])
    assert not list(tmp_path.glob(".*.tmp"))


def test_uuid_is_random_per_archive_and_kept_when_appending(tmp_path: Path) -> None:
    _record(tmp_path / "a.h5", 3)
    _record(tmp_path / "b.h5", 3)  # same seed, same second
    with Trajectory(tmp_path / "a.h5") as a, Trajectory(tmp_path / "b.h5") as b:
        ua, ub = a.uuid, b.uuid
    assert ua and ub and ua != ub
    model = torch.nn.Sequential(torch.nn.Linear(300, 20), torch.nn.BatchNorm1d(20), torch.nn.Linear(20, 3))
    with Trajectory(tmp_path / "a.h5") as a:
        a.load_into(model, len(a) - 1)
    with Recorder(tmp_path / "a.h5", model, mode="a") as rec:
        rec.record()
    with Trajectory(tmp_path / "a.h5") as a:
        assert a.uuid == ua and len(a) == 4


def test_corrupt_chunk_names_dataset_and_records(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    _record(path, 20)
    with h5py.File(path, "r") as f:
        info = f["params"].id.get_chunk_info(1)  # records 8-15
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0x08
    path.write_bytes(bytes(raw))
    with Trajectory(path) as t:
        assert torch.isfinite(t.params(3)).all()  # other chunks still read
        with pytest.raises(ArchiveFormatError, match=r"dataset 'params' records 8-15 \(steps 8-15\).*corrupt") as err:
            t.params(9)
        assert "\n" not in str(err.value)
    from trajectory.archive.verify import verify_archive

    report = verify_archive(path)
    assert not report["ok"] and [(p["dataset"], p["first"], p["last"]) for p in report["problems"]] == [("params", 8, 15)]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f["steps"].__setitem__(4, 2), "not strictly increasing"),
        (lambda f: f["params"].attrs.__delitem__("transform"), "lacks its 'transform' attribute"),
        (lambda f: f["batches/end"].__setitem__(1, 0), "batches/end is not non-decreasing"),
        (lambda f: f["steps"].resize((1 << 40,)), "declares 1099511627776 entries"),
        (lambda f: f.attrs.__setitem__("format_version", "1"), "invalid format_version"),
    ],
)
def test_validation_on_open_is_one_line(tmp_path: Path, mutate, message: str) -> None:
    path = tmp_path / "v.h5"
    _record(path, 12)
    with h5py.File(path, "r+") as f:
        mutate(f)
    with pytest.raises(ArchiveFormatError, match=message) as err:
        Trajectory(path)
    assert "\n" not in str(err.value)


def test_negative_batch_index_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "n.h5"
    _record(path, 12)
    with h5py.File(path, "r+") as f:
        f["batches/indices"][2] = -4
    with Trajectory(path) as t:
        assert list(t.batch_indices(0)) == [0]
        with pytest.raises(ArchiveFormatError, match="sample index -4"):
            t.batch_indices(2)
        t.data_size = 5
        with pytest.raises(ArchiveFormatError, match="sample index 5, outside the data set of 5 training samples"):
            t.batch_indices(5)


def test_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "f.h5"
    os.mkfifo(fifo)
    with pytest.raises(Exception, match="not a regular file"):
        Trajectory(fifo)
