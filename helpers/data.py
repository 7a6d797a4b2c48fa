"""Datasets as in-memory tensors, and the ways to split them across federated clients.

Every partition function returns a list of ``torch.LongTensor`` index sets, one per client,
into a single in-memory dataset: clients never copy the images.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .reproducibility import make_rng

__all__ = [
    "TensorDataset",
    "load_dataset",
    "default_data_root",
    "read_idx",
    "partition_iid",
    "partition_dirichlet",
    "partition_shards",
    "split_indices",
    "label_histogram",
    "FASHION_MNIST_CLASSES",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))

# name -> (torchvision class name, Debian system copy, mean, std, class names)
_DATASETS = {
    "fashion_mnist": ("FashionMNIST", Path("/usr/share/datasets/fashion-mnist"), 0.2860, 0.3530, FASHION_MNIST_CLASSES),
    "mnist": ("MNIST", Path("/usr/share/datasets/mnist"), 0.1307, 0.3081, MNIST_CLASSES),
}
_RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class TensorDataset:
    """Images ``x`` (N, 1, 28, 28), normalized float32, and labels ``y`` (N,) int64, in memory."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    origin: tuple | None = None
    """``(name, train, root)``, set by :func:`load_dataset` (``subset()`` drops it). While ``x`` and ``y``
    are still the loader's own tensors, the dataset pickles as "load it again" -- a few bytes instead of
    188 MB -- so :func:`helpers.parallel.run_parallel` hands it to every worker for free."""

    def __reduce__(self):
        if self.origin is not None:
            cached = _load(*self.origin)
            if cached.x is self.x and cached.y is self.y:
                return _load, tuple(self.origin)
        return TensorDataset, (self.x, self.y, self.classes)

    def __copy__(self) -> "TensorDataset":
        return TensorDataset(self.x, self.y, self.classes, self.origin)

    def __deepcopy__(self, memo: dict) -> "TensorDataset":
        return TensorDataset(self.x.clone(), self.y.clone(), self.classes)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | np.ndarray) -> "TensorDataset":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorDataset(self.x[idx], self.y[idx], self.classes)


def default_data_root() -> Path:
    """``$FLBOOK_DATA`` if set, else ``data/`` at the top of the book's repository."""
    env = os.environ.get("FLBOOK_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "data"


def _raw_dir(root: Path, tv_name: str) -> Path:
    return root / tv_name / "raw"


def _has_raw(root: Path, tv_name: str) -> bool:
    raw = _raw_dir(root, tv_name)
    return all((raw / f).exists() for f in _RAW_FILES)


def _copy_system_files(system_dir: Path, root: Path, tv_name: str) -> bool:
    """Decompress the Debian package's ``*.gz`` files into ``<root>/<Name>/raw/``."""
    if not all((system_dir / f"{f}.gz").exists() for f in _RAW_FILES):
        return False
    raw = _raw_dir(root, tv_name)
    raw.mkdir(parents=True, exist_ok=True)
    for f in _RAW_FILES:
        target = raw / f
        if not target.exists():
            tmp = target.with_suffix(".part")
            with gzip.open(system_dir / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)
    return True


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (the MNIST format: a big-endian header ``0, 0, dtype=0x08 (uint8), ndim``, then ``ndim``
    big-endian int32 sizes, then the data) into a uint8 tensor of those sizes."""
    blob = Path(path).read_bytes()
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08 or not 1 <= blob[3] <= 3:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {blob[:4]!r})")
    ndim = blob[3]
    shape = tuple(int.from_bytes(blob[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = blob[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path}: the header says {shape} = {math.prod(shape)} bytes, the file has {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _download(tv_name: str, root: Path, train: bool) -> None:
    """torchvision's download into ``<root>/<Name>/raw/`` (the only use of torchvision in the book)."""
    from torchvision import datasets  # imported here: reading the files needs no torchvision

    getattr(datasets, tv_name)(root, train=train, download=True)


@lru_cache(maxsize=8)
def _load(name: str, train: bool, root: str) -> TensorDataset:
    tv_name, system_dir, mean, std, classes = _DATASETS[name]
    root_path = Path(root)
    if not _has_raw(root_path, tv_name) and not _copy_system_files(system_dir, root_path, tv_name):
        try:
            _download(tv_name, root_path, train)
        except Exception as exc:  # no network, no copy, no torchvision: say how to provide the data
            raise FileNotFoundError(
                f"{tv_name} was not found. Provide it in one of three ways:\n"
                f"  1. put the four idx files in {_raw_dir(root_path, tv_name)} "
                f"(or set FLBOOK_DATA to a folder that has {tv_name}/raw/);\n"
                f"  2. install the system copy: apt-get install dataset-{name.replace('_', '-')} "
                f"(files in {system_dir});\n"
                f"  3. let torchvision download it (needs torchvision and internet access).\n"
                f"The download attempt failed with: {exc}"
            ) from exc
    prefix = "train" if train else "t10k"
    images = read_idx(_raw_dir(root_path, tv_name) / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(_raw_dir(root_path, tv_name) / f"{prefix}-labels-idx1-ubyte")
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"{tv_name} files disagree: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
    x = images.unsqueeze(1).to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return TensorDataset(x.contiguous(), labels.to(torch.long), classes, (name, train, root))


def load_dataset(name: str = "fashion_mnist", train: bool = True, root: str | Path | None = None) -> TensorDataset:
    """Load Fashion-MNIST (default) or MNIST as normalized in-memory tensors.

    Looks for the data in ``root`` (default :func:`default_data_root`), then in the Debian
    system copy, then tries torchvision's download; raises one clear error if all fail.
    The result is cached, so later calls are free.
    """
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_DATASETS)}")
    root = Path(root) if root is not None else default_data_root()
    return _load(name, bool(train), str(root.resolve()))


# --------------------------------------------------------------------------- partitions


def _labels_np(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    return arr


def _check_clients(num_clients: int, n: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"cannot split {n} samples across {num_clients} clients: more clients than samples")


def _to_tensors(parts: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def partition_iid(labels: torch.Tensor | np.ndarray, num_clients: int,
                  seed: int | np.random.Generator) -> list[torch.Tensor]:
    """Shuffle all indices and deal them into ``num_clients`` near-equal parts."""
    y = _labels_np(labels)
    _check_clients(num_clients, len(y))
    perm = make_rng(seed).permutation(len(y))
    return _to_tensors(np.array_split(perm, num_clients))


def partition_dirichlet(labels: torch.Tensor | np.ndarray, num_clients: int, alpha: float,
                        seed: int | np.random.Generator, min_size: int = 10,
                        max_tries: int = 1000) -> list[torch.Tensor]:
    r"""Label-skewed split: for each class c draw :math:`p_c \sim \mathrm{Dir}(\alpha \mathbf{1}_K)`
    and give client k the fraction :math:`p_{c,k}` of class c's samples.

    Small ``alpha`` (0.1) gives each client a few classes; large ``alpha`` (100) is close to IID.
    Draws again until every client has at least ``min_size`` samples (as NIID-Bench does).
    """
    y = _labels_np(labels)
    _check_clients(num_clients, len(y))
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if num_clients * min_size > len(y):
        raise ValueError(f"min_size={min_size} per client needs {num_clients * min_size} samples, have {len(y)}")
    gen = make_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = gen.permutation(np.flatnonzero(y == c))
            p = gen.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return _to_tensors(merged)
    raise ValueError(f"could not give every client {min_size} samples in {max_tries} draws; "
                     f"lower min_size or num_clients, or raise alpha")


def partition_shards(labels: torch.Tensor | np.ndarray, num_clients: int, shards_per_client: int,
                     seed: int | np.random.Generator) -> list[torch.Tensor]:
    """The FedAvg paper's pathological split: sort by label, cut into
    ``num_clients * shards_per_client`` equal shards, give each client ``shards_per_client`` at random."""
    y = _labels_np(labels)
    _check_clients(num_clients, len(y))
    if not isinstance(shards_per_client, (int, np.integer)) or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be a positive int, got {shards_per_client!r}")
    num_shards = num_clients * shards_per_client
    if num_shards > len(y):
        raise ValueError(f"{num_shards} shards is more than the {len(y)} samples")
    gen = make_rng(seed)
    order = np.argsort(y, kind="stable")
    shards = np.array_split(order, num_shards)
    assignment = gen.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _to_tensors([np.concatenate([shards[s] for s in row]) for row in assignment])


def split_indices(indices: torch.Tensor | np.ndarray | int, fraction: float,
                  seed: int | np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``indices`` (or ``range(n)`` when given an int) at random into (rest, held-out);
    the held-out part has ``round(fraction * n)`` indices. Used for validation and public sets."""
    idx = np.arange(indices) if isinstance(indices, (int, np.integer)) else _labels_np(indices)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    perm = make_rng(seed).permutation(idx)
    k = int(round(fraction * len(idx)))
    if k == 0 or k == len(idx):
        raise ValueError(f"fraction={fraction} of {len(idx)} indices leaves one side empty")
    return torch.from_numpy(np.sort(perm[k:]).astype(np.int64)), torch.from_numpy(np.sort(perm[:k]).astype(np.int64))


def label_histogram(labels: torch.Tensor | np.ndarray, partition: list[torch.Tensor],
                    num_classes: int | None = None) -> np.ndarray:
    """Counts of each label on each client: an array of shape (num_clients, num_classes).
    ``num_classes`` defaults to ``max(labels) + 1``; give it when ``labels`` is empty."""
    y = _labels_np(labels)
    if num_classes is None and y.size == 0:
        raise ValueError("labels is empty: pass num_classes to count labels of an empty dataset")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(partition, (torch.Tensor, np.ndarray)) or not isinstance(partition, (list, tuple)):
        raise TypeError(f"partition must be a list of index tensors (one per client), got {type(partition).__name__}")
    if len(partition) == 0:
        raise ValueError("partition is empty: need at least one client's indices")
    k = int(num_classes if num_classes is not None else y.max() + 1)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must lie in [0, num_classes={k}), got values {int(y.min())}..{int(y.max())}")
    for i, p in enumerate(partition):
        idx = np.asarray(p)
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= len(y)):
            raise ValueError(f"partition[{i}] must hold integer indices into labels (0..{len(y) - 1})")
    return np.stack([np.bincount(y[np.asarray(p)], minlength=k) for p in partition])
