"""The book's standard federated setting, defined once so every chapter compares like with like.

Chapter 1 introduces it; later chapters import it, so "same seed, same partition, same rounds"
is a function call rather than a promise.
"""

from __future__ import annotations

import dataclasses

import torch

from .data import TensorDataset, load_dataset, partition_dirichlet, partition_iid, partition_shards
from .federated import FedConfig

__all__ = ["BOOK_SEED", "NUM_CLIENTS", "DIRICHLET_ALPHA", "SHARDS_PER_CLIENT", "book_data", "book_partition",
           "book_config"]

BOOK_SEED = 0
NUM_CLIENTS = 10
DIRICHLET_ALPHA = 0.5
SHARDS_PER_CLIENT = 2


def book_data() -> tuple[TensorDataset, TensorDataset]:
    """(train, test) Fashion-MNIST as in-memory tensors."""
    return load_dataset("fashion_mnist", train=True), load_dataset("fashion_mnist", train=False)


def book_partition(labels: torch.Tensor, kind: str = "dirichlet", num_clients: int = NUM_CLIENTS,
                   seed: int = BOOK_SEED) -> list[torch.Tensor]:
    """The book's client split: ``"dirichlet"`` (α = 0.5, the default), ``"iid"`` or ``"shards"`` (2 per client)."""
    if kind == "dirichlet":
        return partition_dirichlet(labels, num_clients, DIRICHLET_ALPHA, rng=seed)
    if kind == "iid":
        return partition_iid(labels, num_clients, rng=seed)
    if kind == "shards":
        return partition_shards(labels, num_clients, SHARDS_PER_CLIENT, rng=seed)
    raise ValueError(f"unknown partition kind {kind!r}; choose 'dirichlet', 'iid' or 'shards'")


def book_config(**overrides) -> FedConfig:
    """FedAvg as the book runs it: 3 rounds, every client each round, 1 local epoch of SGD
    (batch 32, lr 0.04, momentum 0.9). Keyword arguments override single fields.

    lr 0.04 is tuned for ``SmallCNN`` (Chapter 1). The MLP chapters use ``book_config(lr=0.02)``:
    at 0.04 the MLP's float32 FedAvg is unstable on the Dirichlet split (Chapter 2 measures it).
    """
    base = FedConfig(rounds=3, fraction=1.0, local_epochs=1, batch_size=32, lr=0.04, momentum=0.9,
                     seed=BOOK_SEED)
    return dataclasses.replace(base, **overrides)
