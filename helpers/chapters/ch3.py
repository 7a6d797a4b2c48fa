r"""Chapter 3's experiment: one seed of one federated run in the book's setting (seed = partition +
initialisation + sampling), a task for :func:`helpers.parallel.run_parallel`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..aggregation import FedAvg
from ..codecs import Codec
from ..data import TensorDataset
from ..experiment import book_partition
from ..federated import FederatedRun, FedConfig, run_federated
from ..models import MLP, SmallCNN
from ..reproducibility import seed_everything

__all__ = ["SeedRun", "run_seed"]


@dataclass
class SeedRun:
    """What :func:`run_seed` returns: the seed, the run (model, history, server: its strategy holds a
    pruner's masks and log) and, if asked for, one captured upload payload."""
    seed: int
    run: FederatedRun
    payload: bytes | None = None


def run_seed(*, seed: int, model: str, train: TensorDataset, test: TensorDataset, config: FedConfig,
             partition: str = "dirichlet", uplink: Codec | None = None, downlink: Codec | None = None,
             error_feedback: bool = False, strategy: FedAvg | None = None,
             capture: tuple[int, int] | None = None, label: str = "") -> SeedRun:
    """One seed of a federated run in the book's setting, as a task for :func:`helpers.parallel.run_parallel`.

    ``seed`` fixes everything random: the client partition (``book_partition(train.y, partition,
    seed=seed)``: ``train`` must be the full training set), the initial weights (``seed_everything(seed)``
    before building ``model``: ``"cnn"`` is :class:`~helpers.models.SmallCNN`, ``"mlp"`` is
    ``MLP(hidden=(200,))``) and client sampling and shuffling (``config.seed`` is replaced by ``seed``).
    Two methods run with the same ``seed`` are therefore a *paired* comparison. ``capture=(round, cid)``
    keeps the upload payload of client ``cid`` in that round (after its codec and error feedback).
    The other arguments are :func:`~helpers.federated.run_federated`'s.
    """
    if model not in ("cnn", "mlp"):
        raise ValueError(f"model must be 'cnn' or 'mlp', got {model!r}")
    if not isinstance(config, FedConfig):
        raise TypeError(f"config must be a FedConfig, got {type(config).__name__}")
    parts = book_partition(train.y, partition, seed=seed)
    seed_everything(seed)
    net = SmallCNN() if model == "cnn" else MLP(hidden=(200,))
    captured: list[bytes] = []

    def keep(round_idx: int, cid: int, payload: bytes) -> bytes:
        if (round_idx, cid) == capture:
            captured.append(payload)
        return payload

    run = run_federated(net, train, parts, test, dataclasses.replace(config, seed=seed), uplink=uplink,
                        downlink=downlink, error_feedback=error_feedback, strategy=strategy,
                        transmit=keep if capture is not None else None, label=label)
    if capture is not None and not captured:
        raise ValueError(f"capture={capture!r} names no upload of this run (rounds 1..{config.rounds}, "
                         f"clients 0..{len(parts) - 1}, sampled that round)")
    return SeedRun(seed=seed, run=run, payload=captured[0] if captured else None)
