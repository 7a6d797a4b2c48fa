r"""What the Flower app and the simulator share, so that both run *the same* experiment.

One run configuration (the ``[tool.flwr.app.config]`` table of ``helpers/flower/app/pyproject.toml``,
plus overrides) is turned into :class:`AppSettings` by one function, used by the ServerApp, the
ClientApp and the notebook's simulator run alike: the same :class:`~helpers.federated.FedConfig`
(rounds, learning rate, batch size, seed), the same codecs, the same node partitions, the same
initial model and the same test set. Payloads cross Flower as a raw ``uint8`` :class:`flwr.app.Array`,
so the codec's bytes travel unchanged and ``len(payload)`` stays the measured cost.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from ..codecs import Codec, Float16Codec, Float32Codec, QuantizedCodec
from ..data import TensorDataset, load_dataset
from ..experiment import BOOK_SEED, book_config, book_partition, validation_split
from ..federated import FedConfig
from ..models import SmallCNN

__all__ = ["APP_DIR", "PAYLOAD_KEY", "AppSettings", "default_run_config", "make_run_config", "make_codec",
           "node_partition", "node_test_rows", "write_node_data", "read_node_data", "read_node_test",
           "initial_model", "test_subset", "payload_record", "record_payload", "STRATEGIES"]

APP_DIR = Path(__file__).resolve().parent / "app"
PAYLOAD_KEY = "payload"
_STYPE = "flbook.payload"   # the Array's bytes are one book payload (helpers.codecs), not a NumPy array
STRATEGIES = ("book", "flower-fedavg")


def default_run_config() -> dict[str, object]:
    """The app's run configuration as declared in ``app/pyproject.toml`` (``[tool.flwr.app.config]``)."""
    with open(APP_DIR / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def make_run_config(**overrides: object) -> dict[str, object]:
    """The default run configuration with ``overrides`` (Python names: ``num_server_rounds=3`` sets
    ``num-server-rounds``); an unknown key is a ``ValueError``, as it is for ``flwr run --run-config``."""
    config = default_run_config()
    for name, value in overrides.items():
        key = name.replace("_", "-")
        if key not in config:
            raise ValueError(f"unknown run-config key {key!r}; the app declares {sorted(config)}")
        config[key] = value
    return config


def make_codec(spec: str) -> Codec:
    """A codec from its name in the run config: ``"float32"``, ``"float16"`` or ``"q<bits>"`` (``"q8"``:
    :class:`~helpers.codecs.QuantizedCodec` with 8 bits, per-channel scales, deterministic rounding)."""
    if spec == "float32":
        return Float32Codec()
    if spec == "float16":
        return Float16Codec()
    m = re.fullmatch(r"q(\d+)", spec) if isinstance(spec, str) else None
    if m:
        return QuantizedCodec(int(m.group(1)))
    raise ValueError(f"unknown codec {spec!r}; use 'float32', 'float16' or 'q<bits>' such as 'q8'")


def _positive_int(config: Mapping[str, object], key: str, minimum: int = 1) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"run config {key!r} must be an int ≥ {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class AppSettings:
    """The run configuration, parsed and checked once (:meth:`from_run_config`)."""

    fed: FedConfig            # rounds, fraction, local epochs, batch size, learning rate, momentum, seed
    num_nodes: int            # = number of partitions; node i holds partition i
    samples_per_node: int     # pool images per node (exact for "iid", the mean otherwise); 0: the whole pool
    partition: str            # "iid", "dirichlet" or "shards" (helpers.experiment.book_partition)
    fraction_evaluate: float  # share of the nodes that evaluate the global model on their own test split
    evaluate_every: int       # federated evaluation after every this many rounds, and after the last
    strategy: str             # "book" (BookFedAvg, the book's codecs) or "flower-fedavg" (Flower's FedAvg, float32)
    uplink: str               # codec names for make_codec
    downlink: str
    test_samples: int         # the server evaluates on the first test_samples test images (0: all)
    threads: int              # torch threads in every app process
    round_timeout: float      # seconds the ServerApp waits for a round's replies
    node_timeout: float       # seconds the ServerApp waits for num_nodes SuperNodes to connect
    result_dir: str           # where the ServerApp writes result.json and the final model ("" = nowhere)

    @classmethod
    def from_run_config(cls, config: Mapping[str, object]) -> "AppSettings":
        missing = sorted(set(default_run_config()) - set(config))
        if missing:
            raise ValueError(f"run config lacks {missing}")
        fed = book_config(rounds=_positive_int(config, "num-server-rounds"), fraction=float(config["fraction"]),
                          local_epochs=_positive_int(config, "local-epochs"),
                          batch_size=_positive_int(config, "batch-size"), lr=float(config["lr"]),
                          momentum=float(config["momentum"]), seed=_positive_int(config, "seed", 0))
        settings = cls(fed=fed, num_nodes=_positive_int(config, "num-nodes"),
                       samples_per_node=_positive_int(config, "samples-per-node", 0),
                       partition=str(config["partition"]),
                       fraction_evaluate=float(config["fraction-evaluate"]),
                       evaluate_every=_positive_int(config, "evaluate-every"), strategy=str(config["strategy"]),
                       uplink=str(config["uplink"]),
                       downlink=str(config["downlink"]), test_samples=_positive_int(config, "test-samples", 0),
                       threads=_positive_int(config, "threads"), round_timeout=float(config["round-timeout"]),
                       node_timeout=float(config["node-timeout"]), result_dir=str(config["result-dir"]))
        make_codec(settings.uplink), make_codec(settings.downlink)   # fail early on a bad name
        if settings.partition not in ("iid", "dirichlet", "shards"):
            raise ValueError(f"run config 'partition' must be 'iid', 'dirichlet' or 'shards', got {settings.partition!r}")
        if not 0.0 <= settings.fraction_evaluate <= 1.0:
            raise ValueError(f"run config 'fraction-evaluate' must be in [0, 1], got {settings.fraction_evaluate!r}")
        if settings.strategy not in STRATEGIES:
            raise ValueError(f"run config 'strategy' must be one of {STRATEGIES}, got {settings.strategy!r}")
        if not (settings.round_timeout > 0 and settings.node_timeout > 0):
            raise ValueError("run config 'round-timeout' and 'node-timeout' must be positive")
        return settings


def node_partition(labels: torch.Tensor, settings: AppSettings) -> list[torch.Tensor]:
    """The training indices of every node (node ``i`` holds entry ``i``), from the book's client pool
    (never the validation images): ``settings.num_nodes * settings.samples_per_node`` pool images drawn
    with the run's seed (all of the pool if ``samples_per_node`` is 0), split by ``settings.partition``
    (so every node has exactly ``samples_per_node`` images under ``"iid"``, that many on average otherwise)."""
    pool = validation_split(len(labels))[0]
    if settings.samples_per_node:
        need = settings.num_nodes * settings.samples_per_node
        if need > len(pool):
            raise ValueError(f"{settings.num_nodes} nodes x {settings.samples_per_node} samples = {need} "
                             f"exceeds the {len(pool)} images of the client pool")
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(settings.fed.seed))[:need]
        pool = pool[pick.sort().values]
    return book_partition(labels, settings.partition, settings.num_nodes, settings.fed.seed, pool=pool)


def node_test_rows(num_test: int, settings: AppSettings, pid: int) -> torch.Tensor:
    """The rows of the test set that node ``pid`` holds as its own test split, for federated evaluation:
    ``pid, pid + N, pid + 2N, ...`` with ``N = settings.num_nodes`` (an IID share; the nodes' splits are
    disjoint and together cover the whole test set, so their sample-weighted mean accuracy is the central
    accuracy on all ``num_test`` images)."""
    if not 0 <= pid < settings.num_nodes:
        raise ValueError(f"pid must be in [0, {settings.num_nodes}), got {pid!r}")
    return torch.arange(pid, num_test, settings.num_nodes)


_PARTITIONS = ("iid", "dirichlet", "shards")
_NODE_FILE_VERSION = 1


def _node_meta(settings: AppSettings, pid: int) -> np.ndarray:
    """What a node file was cut for: (format version, partition id, nodes, seed, samples per node, partition)."""
    return np.array([_NODE_FILE_VERSION, pid, settings.num_nodes, settings.fed.seed, settings.samples_per_node,
                     _PARTITIONS.index(settings.partition)], dtype=np.int64)


def write_node_data(directory: str | Path, settings: AppSettings, train: TensorDataset | None = None,
                    test: TensorDataset | None = None) -> list[Path]:
    """Give every node its own data: write node ``i``'s rows of ``train`` (:func:`node_partition`) and its
    test split (rows :func:`node_test_rows` of ``test``) to ``directory/node-<i>.npz`` and return the paths,
    node ``i``'s at position ``i``.

    The file holds the node's images and labels (in partition order, so the node's local SGD sees the same
    minibatches as the simulator's client) and the settings it was cut for, which :func:`read_node_data`
    checks. It is a plain ``.npz`` of numeric arrays, read with ``allow_pickle=False``: no code in a data file.
    ``train`` and ``test`` default to the full Fashion-MNIST training and test sets."""
    train = load_dataset("fashion_mnist", train=True) if train is None else train
    test = load_dataset("fashion_mnist", train=False) if test is None else test
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for pid, idx in enumerate(node_partition(train.y, settings)):
        path = directory / f"node-{pid}.npz"
        rows = node_test_rows(len(test), settings, pid)
        np.savez(path, x=train.x[idx].numpy(), y=train.y[idx].numpy(), meta=_node_meta(settings, pid),
                 classes=np.array(train.classes), x_test=test.x[rows].numpy(), y_test=test.y[rows].numpy())
        paths.append(path)
    return paths


def read_node_data(path: str | Path, pid: int, settings: AppSettings, split: str = "train") -> TensorDataset:
    """Node ``pid``'s own data from a file written by :func:`write_node_data` (``split="test"``: its test
    split); a ``ValueError`` if the file was cut for another node or another run (partition, seed, number of
    nodes or samples differ)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xk, yk = ("x", "y") if split == "train" else ("x_test", "y_test")
    with np.load(Path(path), allow_pickle=False) as f:
        missing = {xk, yk, "meta", "classes"} - set(f.files)
        if missing:
            raise ValueError(f"{path} is not a node data file (it lacks {sorted(missing)})")
        x, y, meta, classes = f[xk], f[yk], f["meta"], f["classes"]
    expected = _node_meta(settings, pid)
    if meta.shape != expected.shape or not np.array_equal(meta, expected):
        raise ValueError(f"{path} was written for (version, partition-id, num-nodes, seed, samples-per-node, partition) "
                         f"= {meta.tolist()}, this node and run need {expected.tolist()}")
    if x.dtype != np.float32 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (len(x),) or len(x) == 0:
        raise ValueError(f"{path}: expected float32 images (N, C, H, W) and N int64 labels, got "
                         f"{x.dtype} {x.shape} and {y.dtype} {y.shape}")
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y), tuple(str(c) for c in classes))


def read_node_test(path: str | Path, pid: int, settings: AppSettings) -> TensorDataset:
    """Node ``pid``'s own test split (``read_node_data(path, pid, settings, split="test")``)."""
    return read_node_data(path, pid, settings, split="test")


def initial_model(seed: int = BOOK_SEED) -> SmallCNN:
    """The run's initial global model: ``SmallCNN`` initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return SmallCNN()


def test_subset(test: TensorDataset, settings: AppSettings) -> TensorDataset:
    """The images the server evaluates on: the first ``settings.test_samples`` (all if 0)."""
    if settings.test_samples == 0 or settings.test_samples >= len(test):
        return test
    return test.subset(torch.arange(settings.test_samples))


def payload_record(payload: bytes) -> ArrayRecord:
    """Wrap one codec payload for a Flower message: a single raw ``uint8`` array, bytes unchanged."""
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    return ArrayRecord({PAYLOAD_KEY: Array(dtype="uint8", shape=(len(payload),), stype=_STYPE, data=payload)})


def record_payload(record: ArrayRecord) -> bytes:
    """The payload bytes inside an :func:`payload_record` (a ``ValueError`` if the record is not one)."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [PAYLOAD_KEY]:
        raise ValueError(f"expected an ArrayRecord holding only {PAYLOAD_KEY!r}")
    array = record[PAYLOAD_KEY]
    if array.stype != _STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
        raise ValueError(f"the {PAYLOAD_KEY!r} array is not a raw uint8 payload "
                         f"(stype {array.stype!r}, dtype {array.dtype!r}, shape {array.shape})")
    return bytes(array.data)
