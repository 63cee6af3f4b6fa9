"""Tests for the built-in data and model factories (CPU, small inputs)."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from trajectory.errors import DataNotFoundError
from trajectory.specs import resolve_model_spec
from trajectory.zoo import data, models
from trajectory.zoo.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DatasetInfo,
    cifar10,
    dataset_info,
    mnist1d,
    synthetic,
    write_cifar10_standin,
)

N_TRAIN, N_TEST = 40, 12


def assert_one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ---------------------------------------------------------------------------------------- MNIST-1D
def test_mnist1d_default_shapes_and_dtypes():
    train, test = mnist1d("train"), mnist1d("test")
    assert isinstance(train, TensorDataset)
    x, y = train.tensors
    assert x.shape == (4000, 40) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.int64
    assert test.tensors[0].shape == (1000, 40) and test.tensors[1].shape == (1000,)
    assert set(y.tolist()) == set(range(10))
    assert torch.isfinite(x).all()
    xi, yi = train[3]
    assert xi.shape == (40,) and int(yi) == int(y[3])


def test_mnist1d_is_deterministic_and_seeded():
    a, b = mnist1d(num_samples=200, seed=1), mnist1d(num_samples=200, seed=1)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    c = mnist1d(num_samples=200, seed=2)
    assert not torch.equal(a.tensors[0], c.tensors[0])


def test_mnist1d_leaves_global_random_state_alone():
    data._mnist1d_arrays.cache_clear()  # force a real generation, not a cache hit
    np.random.seed(1234)
    random.seed(99)
    np_before, py_before = np.random.get_state(), random.getstate()
    mnist1d(num_samples=100, seed=5)
    np_after = np.random.get_state()
    assert np_after[0] == np_before[0] and np.array_equal(np_after[1], np_before[1]) and np_after[2:] == np_before[2:]
    assert random.getstate() == py_before


def test_mnist1d_split_sizes_and_fresh_tensors():
    kwargs = {"num_samples": 105, "train_split": 0.7}
    train, test = mnist1d("train", **kwargs), mnist1d("test", **kwargs)
    assert len(train) == 70 and len(test) == 30  # 105 rounds down to 10 per class
    train.tensors[0].zero_()  # callers may mutate their copy ...
    assert mnist1d("train", **kwargs).tensors[0].abs().sum() > 0  # ... not the cache
    assert torch.equal(mnist1d("train", augment=True, **kwargs).tensors[1], train.tensors[1])  # augment is ignored


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "val"},
        {"num_samples": 5},
        {"train_split": 1.0},
        {"train_split": 0.0},
        {"seed": -1},
        {"num_samples": 10, "train_split": 0.05},  # empty training split
    ],
)
def test_mnist1d_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        mnist1d(**kwargs)


# --------------------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_determinism_and_splits():
    a = synthetic(num_samples=30, num_test=7, input_shape=(2, 5), num_classes=4, seed=3)
    b = synthetic(num_samples=30, num_test=7, input_shape=[2, 5], num_classes=4, seed=3)
    t = synthetic("test", num_samples=30, num_test=7, input_shape=(2, 5), num_classes=4, seed=3)
    assert a.tensors[0].shape == (30, 2, 5) and a.tensors[0].dtype == torch.float32
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert len(t) == 7 and not torch.equal(a.tensors[0][:7], t.tensors[0])
    assert a.tensors[1].min() >= 0 and a.tensors[1].max() < 4
    assert dataset_info(a) == DatasetInfo((2, 5), 4, 30)


def test_synthetic_classes_are_separable():
    ds = synthetic(num_samples=400, input_shape=(64,), num_classes=4, separation=1.0)
    x, y = ds.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(4)])
    nearest = torch.cdist(x, means).argmin(1)
    assert (nearest == y).float().mean() > 0.9


# ----------------------------------------------------------------------------------------- CIFAR-10
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_standin(root, n_train=N_TRAIN, n_test=N_TEST, seed=1)
    return root


def _written(root: Path, names: list[str]) -> tuple[np.ndarray, list[int]]:
    """What the stand-in writer put on disk (trusted: this test wrote it)."""
    rows, labels = [], []
    for name in names:
        with open(root / "cifar-10-batches-py" / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        rows.append(entry["data"])
        labels += entry["labels"]
    return np.concatenate(rows), labels


def test_standin_has_the_official_layout(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    expected = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    assert {p.name for p in folder.iterdir()} == expected
    with open(folder / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert entry["data"].dtype == np.uint8 and entry["data"].shape == (N_TRAIN // 5, 3072)
    assert isinstance(entry["labels"], list) and len(entry["labels"]) == N_TRAIN // 5
    with open(folder / "batches.meta", "rb") as f:
        assert len(pickle.load(f, encoding="latin1")["label_names"]) == 10


def test_cifar10_reads_what_was_written(cifar_root):
    train, test = cifar10("train", root=str(cifar_root)), cifar10("test", root=str(cifar_root))
    assert len(train) == N_TRAIN and len(test) == N_TEST
    rows, labels = _written(cifar_root, [f"data_batch_{i}" for i in range(1, 6)])
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    for i in (0, 7, N_TRAIN - 1):
        x, y = train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert isinstance(y, int) and y == labels[i]
        pixels = torch.from_numpy(rows[i].reshape(3, 32, 32)).float()
        assert torch.allclose((x * std + mean) * 255, pixels, atol=1e-3)
    _, test_labels = _written(cifar_root, ["test_batch"])
    assert [test[i][1] for i in range(N_TEST)] == test_labels
    assert train.classes[0] == "airplane"


def test_cifar10_augmentation_changes_pixels_not_labels(cifar_root):
    plain = cifar10(root=str(cifar_root))
    aug = cifar10(augment=True, root=str(cifar_root))
    assert torch.equal(plain[5][0], plain[5][0])  # no augmentation: deterministic
    torch.manual_seed(0)
    changed = 0
    for i in range(10):
        xa, ya = aug[i]
        xp, yp = plain[i]
        assert ya == yp and xa.shape == xp.shape
        changed += not torch.equal(xa, xp)
    assert changed >= 5


def test_cifar10_matches_torchvision_pipeline(cifar_root, monkeypatch):
    """Same pixels, same layout and same random draws as torchvision's PIL-based CIFAR10 + ToTensor."""
    import torchvision.datasets.cifar as tv_cifar
    from torchvision import transforms as T

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the stand-in has other md5s
    ref = tv_cifar.CIFAR10(
        str(cifar_root),
        train=True,
        transform=T.Compose([
            T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]),
    )
    ours = cifar10(augment=True, root=str(cifar_root))
    for i in range(6):
        torch.manual_seed(i)
        x_ref, y_ref = ref[i]
        torch.manual_seed(i)
        x, y = ours[i]
        assert y == y_ref and torch.allclose(x, x_ref, atol=1e-6)


def test_cifar10_root_forms_env_and_limit(cifar_root, monkeypatch):
    monkeypatch.setenv("SGDWALK_CIFAR10_DIR", str(cifar_root))
    via_env = cifar10()
    via_folder = cifar10(root=str(cifar_root / "cifar-10-batches-py"))
    assert len(via_env) == len(via_folder) == N_TRAIN
    assert torch.equal(via_env[3][0], via_folder[3][0])
    small = cifar10(root=str(cifar_root), limit=7)
    assert len(small) == 7 and torch.equal(small[6][0], via_env[6][0]) and small[6][1] == via_env[6][1]
    with pytest.raises(ValueError):
        cifar10(root=str(cifar_root), limit=0)


def test_cifar10_missing_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SGDWALK_CIFAR10_DIR", raising=False)
    missing = tmp_path / "no-cifar-here"
    with pytest.raises(DataNotFoundError) as info:
        cifar10(root=str(missing))
    msg = assert_one_line(info.value)
    assert str(missing) in msg and "SGDWALK_CIFAR10_DIR" in msg
    with pytest.raises(DataNotFoundError) as info:
        cifar10()
    assert "SGDWALK_CIFAR10_DIR" in assert_one_line(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # A partial directory (a batch file missing) is not accepted either.
    root = tmp_path / "partial"
    folder = write_cifar10_standin(root, n_train=5, n_test=1)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError):
        cifar10(root=str(root))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = write_cifar10_standin(tmp_path, n_train=5, n_test=1)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": Payload(), "labels": [0]}, f)
    with pytest.raises(DataNotFoundError) as info:
        cifar10(root=str(tmp_path))
    assert "data_batch_2" in assert_one_line(info.value)
    assert not marker.exists()


def test_cifar10_accepts_bytes_keys_and_rejects_bad_batches(tmp_path):
    folder = write_cifar10_standin(tmp_path, n_train=5, n_test=3)
    rows = np.full((3, 3072), 7, dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:  # as Python 3 sees the files with encoding="bytes"
        pickle.dump({b"data": rows, b"labels": [1, 2, 3]}, f, protocol=4)
    test = cifar10("test", root=str(tmp_path))
    assert [test[i][1] for i in range(3)] == [1, 2, 3]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rows, "labels": [1, 2, 99]}, f)
    with pytest.raises(DataNotFoundError, match="labels"):
        cifar10("test", root=str(tmp_path))


# ---------------------------------------------------------------------------------- dataset_info
class _PlainDataset(Dataset):
    def __init__(self):
        self.items = [(torch.zeros(2, 3), 4), (torch.ones(2, 3), 1)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_dataset_info_for_zoo_and_generic_datasets(cifar_root):
    assert dataset_info(mnist1d("test")) == DatasetInfo((40,), 10, 1000)
    assert dataset_info(cifar10("test", root=str(cifar_root))) == DatasetInfo((3, 32, 32), 10, N_TEST)
    assert dataset_info(_PlainDataset()) == DatasetInfo((2, 3), 5, 2)
    tensors = TensorDataset(torch.zeros(6, 7), torch.tensor([0, 2, 1, 0, 2, 2]))
    assert dataset_info(tensors) == DatasetInfo((7,), 3, 6)
    assert dataset_info(Subset(mnist1d("test"), range(5))) == DatasetInfo((40,), 10, 5)
    with pytest.raises(ValueError):
        dataset_info(TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_dataset_info_does_not_consume_random_numbers(cifar_root):
    aug = Subset(cifar10(augment=True, root=str(cifar_root)), range(4))  # Subset hides input_shape
    torch.manual_seed(0)
    dataset_info(aug)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)


# ------------------------------------------------------------------------------------------ models
MNIST1D_BATCH = (4, 40)
CIFAR_BATCH = (2, 3, 32, 32)
MODEL_CASES = [
    ("mlp", {}, MNIST1D_BATCH, 10),
    ("mlp_bn", {"num_classes": 3}, MNIST1D_BATCH, 3),
    ("mlp", {"in_features": 3072, "hidden": []}, CIFAR_BATCH, 10),
    ("cnn", {}, MNIST1D_BATCH, 10),
    ("cnn", {}, (4, 1, 40), 10),
    ("cnn_bn", {}, MNIST1D_BATCH, 10),
    ("cnn", {"in_channels": 3, "input_dim": 2, "width": 8}, CIFAR_BATCH, 10),
    ("cnn_bn", {"in_channels": 3, "input_dim": 2, "width": 8, "num_classes": 100}, CIFAR_BATCH, 100),
    ("vgg11_bn", {}, CIFAR_BATCH, 10),
    ("resnet18", {"num_classes": 7}, CIFAR_BATCH, 7),
    ("preact_resnet20", {}, CIFAR_BATCH, 10),
    ("preact_resnet", {"depth": 8, "width": 4, "in_channels": 1}, (2, 1, 28, 28), 10),
]


@pytest.mark.parametrize(("name", "kwargs", "shape", "classes"), MODEL_CASES)
def test_model_forward_shapes(name, kwargs, shape, classes):
    torch.manual_seed(0)
    model = getattr(models, name)(**kwargs)
    assert isinstance(model, nn.Module)
    out = model(torch.randn(*shape))  # train mode: BatchNorm uses batch statistics
    assert out.shape == (shape[0], classes) and torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(*shape)).shape == (shape[0], classes)


@pytest.mark.parametrize("name", ["mlp_bn", "cnn", "vgg11_bn", "resnet18", "preact_resnet20"])
def test_models_are_deterministic_given_the_seed(name):
    def build(seed):
        torch.manual_seed(seed)
        return resolve_model_spec(name).build().state_dict()

    a, b, c = build(1), build(1), build(2)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_cnn_reaches_a_million_parameters_at_width_128():
    big = models.cnn(in_channels=3, input_dim=2, width=128)
    assert models.count_parameters(big) >= 1_000_000
    assert models.count_parameters(models.cnn(in_channels=3, input_dim=2, width=64)) < 1_000_000


def test_cifar_model_architectures():
    vgg = models.vgg11_bn()
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 8
    assert [m.in_features for m in vgg.modules() if isinstance(m, nn.Linear)] == [512, 512, 512]
    res = models.resnet18()
    assert res.conv1.kernel_size == (3, 3) and res.conv1.stride == (1, 1)
    assert isinstance(res.maxpool, nn.Identity)
    r56 = models.preact_resnet56()
    assert sum(isinstance(m, nn.Conv2d) for m in r56.modules()) == 55 + 2  # 55 3x3 convs + 2 projections
    assert 800_000 < models.count_parameters(r56) < 900_000
    paper_mlp = models.mlp(in_features=784, hidden=(500, 350), batchnorm=True)
    assert paper_mlp(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in paper_mlp.modules()) == 2


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (models.cnn, {"input_dim": 3}),
        (models.cnn, {"width": 0}),
        (models.mlp, {"hidden": "100"}),
        (models.mlp, {"in_features": 2.5}),
        (models.preact_resnet, {"depth": 21}),
        (models.vgg11_bn, {"dropout": 1.0}),
    ],
)
def test_models_reject_bad_arguments(factory, kwargs):
    with pytest.raises((ValueError, TypeError)):
        factory(**kwargs)
