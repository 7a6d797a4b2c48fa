"""Plain PyTorch training, with nothing federated about it: minibatch SGD on a set of indices into an
in-memory dataset, evaluation, and the centralized baseline every federated run is compared with.

A federated client's local step (:mod:`helpers.federated`) is exactly :func:`local_train` on its own
indices; the centralized baseline is :func:`local_train` on all of them.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import TensorDataset
from .history import History, RoundRecord, print_progress

__all__ = [
    "LossFn",
    "default_loss",
    "float_state",
    "client_generator",
    "minibatches",
    "local_train",
    "evaluate",
    "TrainingRun",
    "train_centralized",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets, indices) -> scalar``; ``indices`` are the batch's dataset indices,
so a loss can look up per-sample data such as a teacher's precomputed soft labels."""


def default_loss(outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (the ``indices`` are not needed)."""
    return F.cross_entropy(outputs, targets)


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point entries of ``model.state_dict()`` (what FedAvg exchanges), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def client_generator(seed: int, round_idx: int, cid: int, stream: int = 0) -> torch.Generator:
    """The generator that shuffles client ``cid``'s data in round ``round_idx`` of a run seeded ``seed``.

    One formula for every place a client trains (the simulator, logit exchange, the Flower app), so the
    same seed gives the same minibatches everywhere; ``stream`` separates a second use in the same round.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + round_idx * 10_007 + cid + stream * 500_009)


def _check_indices(indices: torch.Tensor, n: int, what: str = "indices") -> torch.Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1 or len(idx) == 0:
        raise ValueError(f"{what} must be a non-empty 1-D index set, got shape {tuple(idx.shape)}")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"{what} must lie in [0, {n}), got values in [{int(idx.min())}, {int(idx.max())}]")
    return idx


def minibatches(indices: torch.Tensor, batch_size: int, generator: torch.Generator, epochs: int = 1,
                steps: int | None = None) -> Iterator[torch.Tensor]:
    """Minibatches of shuffled indices: ``epochs`` full passes, or exactly ``steps`` batches
    (reshuffling at every pass) when ``steps`` is given."""
    done = 0
    while True:
        perm = indices[torch.randperm(len(indices), generator=generator)]
        for start in range(0, len(perm), batch_size):
            if steps is not None and done == steps:
                return
            yield perm[start:start + batch_size]
            done += 1
        epochs -= 1
        if steps is None and epochs == 0:
            return


def local_train(model: nn.Module, data: TensorDataset, indices: torch.Tensor, *, epochs: int = 1, batch_size: int,
                lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                generator: torch.Generator, loss_fn: LossFn | None = None,
                after_step: Callable[[nn.Module], None] | None = None, steps: int | None = None) -> float:
    """Plain minibatch SGD on ``data[indices]`` for ``epochs`` epochs (or exactly ``steps`` minibatches);
    returns the mean training loss.

    ``after_step(model)`` runs after every optimizer step (for example to re-apply a pruning mask).

    A model with convolutions trains in the channels-last memory layout (NHWC): on a CPU its convolution
    kernels are about 20% faster there (``benchmarks/simulator.py``, SmallCNN). Only the layout changes, not
    the values; the model is back in the default layout when this function returns.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    idx = _check_indices(indices, len(data))
    loss_fn = loss_fn or default_loss
    channels_last = any(p.dim() == 4 for p in model.parameters())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        model.train()
        total, count = 0.0, 0
        for batch in minibatches(idx, batch_size, generator, epochs, steps):
            x = data.x[batch]
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), data.y[batch], batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
            total += float(loss.detach()) * len(batch)
            count += len(batch)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 2500) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss / len(data), correct / len(data)


@dataclass
class TrainingRun:
    """What :func:`train_centralized` returns: the trained model and one history row per epoch."""

    model: nn.Module
    history: History


def train_centralized(model: nn.Module, train: TensorDataset, test: TensorDataset, *, epochs: int,
                      batch_size: int = 32, lr: float = 0.05, lr_decay: float = 1.0, momentum: float = 0.0,
                      weight_decay: float = 0.0, seed: int = 0, indices: torch.Tensor | None = None,
                      loss_fn: LossFn | None = None, label: str = "centralized", log_every: int = 0) -> TrainingRun:
    """The baseline: the same model and the same SGD as a client, on all the data (or ``indices``), one
    history row per epoch (epoch e uses learning rate ``lr * lr_decay**(e-1)``, as round e of a federated
    run does). ``model`` is copied, so one initial model can start several runs."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int ≥ 1, got {epochs!r}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay!r}")
    model = copy.deepcopy(model)
    idx = torch.arange(len(train)) if indices is None else _check_indices(indices, len(train))
    gen = torch.Generator().manual_seed(seed)
    history = History(label=label)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss = local_train(model, train, idx, epochs=1, batch_size=batch_size, lr=lr * lr_decay ** (epoch - 1),
                           momentum=momentum, weight_decay=weight_decay, generator=gen, loss_fn=loss_fn)
        test_loss, test_acc = evaluate(model, test)
        history.rows.append(RoundRecord(epoch, test_acc, test_loss, loss, 0, 0, 1, 0, len(idx),
                                        time.perf_counter() - t0))
        print_progress(history, log_every, epochs)
    return TrainingRun(model, history)
