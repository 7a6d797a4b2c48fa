import numpy as np
import pytest
import torch

from helpers.data import (FASHION_MNIST_CLASSES, label_histogram, load_dataset, partition_dirichlet,
                          partition_iid, partition_shards, split_indices)


def _assert_disjoint_cover(parts, n):
    allidx = torch.cat(parts)
    assert len(allidx) == n, "partition must cover every index exactly once"
    assert torch.equal(torch.sort(allidx).values, torch.arange(n))


def test_fashion_mnist_loads_as_normalized_tensors(fmnist_train, fmnist_test):
    assert fmnist_train.x.shape == (60000, 1, 28, 28) and fmnist_test.x.shape == (10000, 1, 28, 28)
    assert fmnist_train.x.dtype == torch.float32 and fmnist_train.y.dtype == torch.int64
    assert fmnist_train.classes == FASHION_MNIST_CLASSES
    # normalized with the dataset's own mean and std
    assert abs(float(fmnist_train.x.mean())) < 0.01
    assert abs(float(fmnist_train.x.std()) - 1.0) < 0.01
    assert torch.equal(torch.bincount(fmnist_train.y), torch.full((10,), 6000))


def test_load_is_cached(fmnist_train):
    assert load_dataset() is fmnist_train


def test_unknown_dataset_and_missing_data_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10")
    # MNIST has no system copy here and there is no network: one clear error names all three ways
    import helpers.data as d
    monkeypatch.setitem(d._DATASETS, "mnist", ("MNIST", tmp_path / "nowhere", 0.1307, 0.3081, d.MNIST_CLASSES))
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda self: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", root=tmp_path)
    msg = str(err.value)
    assert "FLBOOK_DATA" in msg and "apt-get install" in msg and "download" in msg


@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_iid_partition_is_disjoint_cover_and_balanced(fmnist_train, num_clients):
    parts = partition_iid(fmnist_train.y, num_clients, seed=0)
    _assert_disjoint_cover(parts, 60000)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_partition_is_disjoint_cover(fmnist_train, alpha):
    parts = partition_dirichlet(fmnist_train.y, 20, alpha, seed=1)
    _assert_disjoint_cover(parts, 60000)
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_alpha_controls_skew(fmnist_train):
    """Small alpha concentrates each client on few classes; large alpha is near IID."""
    def mean_max_share(alpha):
        h = label_histogram(fmnist_train.y, partition_dirichlet(fmnist_train.y, 20, alpha, seed=2), 10)
        return float((h.max(1) / h.sum(1)).mean())
    skewed, near_iid = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.5 and near_iid < 0.2


def test_dirichlet_is_reproducible(fmnist_train):
    a = partition_dirichlet(fmnist_train.y, 10, 0.5, seed=3)
    b = partition_dirichlet(fmnist_train.y, 10, 0.5, seed=np.random.default_rng(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_shards_give_each_client_few_labels(fmnist_train):
    parts = partition_shards(fmnist_train.y, 10, 2, seed=0)
    _assert_disjoint_cover(parts, 60000)
    h = label_histogram(fmnist_train.y, parts, 10)
    assert ((h > 0).sum(1) <= 2).all()


@pytest.mark.parametrize("call, match", [
    (lambda y: partition_dirichlet(y, 10, 0.0, seed=0), "alpha"),
    (lambda y: partition_dirichlet(y, 10, -1.0, seed=0), "alpha"),
    (lambda y: partition_iid(y, 0, seed=0), "num_clients"),
    (lambda y: partition_iid(y[:5], 6, seed=0), "more clients than samples"),
    (lambda y: partition_shards(y[:10], 3, 4, seed=0), "shards"),
    (lambda y: partition_iid(y, 2, seed=None), "seed"),
])
def test_bad_partition_arguments_raise_clear_errors(fmnist_train, call, match):
    with pytest.raises(ValueError, match=match):
        call(fmnist_train.y)


def test_label_histogram_counts(fmnist_train):
    parts = partition_iid(fmnist_train.y[:1000], 4, seed=0)
    h = label_histogram(fmnist_train.y[:1000], parts, 10)
    assert h.shape == (4, 10) and h.sum() == 1000
    assert (h[0] == np.bincount(fmnist_train.y[:1000][parts[0]].numpy(), minlength=10)).all()


def test_split_indices_is_disjoint(fmnist_train):
    rest, held = split_indices(60000, 0.1, seed=0)
    assert len(held) == 6000 and len(rest) == 54000
    assert len(set(rest.tolist()) & set(held.tolist())) == 0
    with pytest.raises(ValueError):
        split_indices(100, 1.5, seed=0)


def test_the_idx_reader_matches_torchvision_and_rejects_other_files(fmnist_train, fmnist_test, tmp_path):
    """The loader reads the idx files itself (torchvision is needed only to download them): same tensors."""
    from torchvision import datasets

    from helpers.data import default_data_root, read_idx

    for train, ds in ((True, fmnist_train), (False, fmnist_test)):
        tv = datasets.FashionMNIST(default_data_root(), train=train, download=False)
        assert torch.equal(tv.targets, ds.y)
        assert torch.equal(tv.data.unsqueeze(1).float().div(255.0).sub(0.2860).div(0.3530), ds.x)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 16)      # float32 idx: not ours
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")
    (tmp_path / "ok").write_bytes(b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6)))
    assert read_idx(tmp_path / "ok").tolist() == [[0, 1, 2], [3, 4, 5]]
