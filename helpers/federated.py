r"""Federated averaging (FedAvg, McMahan et al. 2017) as a simulation on one machine.

One round, as in DESIGN.md::

    server state --downlink codec--> bytes --> each sampled client
    client: E local epochs of SGD on its own indices --> update = local - global
    update --uplink codec--> bytes  (len(bytes) is the cost)
    server: decode + validate (a bad payload is skipped) --> weighted FedAvg:

.. math::  w_{t+1} = w_t + \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j}\, \Delta_k .

Clients are plain objects holding index tensors into one in-memory dataset; a single model
object is reused for every client's local training, so the simulator runs at about the speed
of centralized training of the same model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codecs import Codec, Float32Codec, PayloadError, validate_update
from .data import TensorDataset
from .error_feedback import ErrorFeedback

__all__ = [
    "FedConfig",
    "Client",
    "Server",
    "RoundRecord",
    "History",
    "FederatedRun",
    "fedavg",
    "local_train",
    "evaluate",
    "train_centralized",
    "run_federated",
    "float_state",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(outputs, targets, indices) -> scalar``; ``indices`` are the batch's dataset indices,
so a loss can look up per-sample data such as a teacher's precomputed soft labels."""


def default_loss(outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets)


@dataclass
class FedConfig:
    """Hyper-parameters of a federated run (all comparisons in the book share one)."""

    rounds: int = 10
    fraction: float = 1.0          # C: fraction of clients sampled each round
    local_epochs: int = 1          # E
    local_steps: int | None = None  # if set, each client runs exactly this many SGD steps instead of E epochs
    batch_size: int = 32           # B
    lr: float = 0.05
    lr_decay: float = 1.0          # the learning rate of round t is lr * lr_decay**(t-1)
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 1            # evaluate the global model every this many rounds (and the last)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be ≥ 1, got {self.rounds}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be ≥ 1")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be ≥ 1 (or None for whole epochs), got {self.local_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be ≥ 1, got {self.eval_every}")


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point entries of ``model.state_dict()`` (what FedAvg exchanges), cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    perm = indices[torch.randperm(len(indices), generator=generator)]
    for start in range(0, len(perm), batch_size):
        yield perm[start:start + batch_size]


def _steps(indices: torch.Tensor, batch_size: int, generator: torch.Generator, epochs: int,
           steps: int | None) -> Iterator[torch.Tensor]:
    """Minibatches of shuffled indices: ``epochs`` full passes, or exactly ``steps`` batches
    (reshuffling at every pass) when ``steps`` is given."""
    done = 0
    while True:
        for idx in _batches(indices, batch_size, generator):
            if steps is not None and done == steps:
                return
            yield idx
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
    """
    loss_fn = loss_fn or default_loss
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    total, count = 0.0, 0
    for idx in _steps(indices, batch_size, generator, epochs, steps):
        out = model(data.x[idx])
        loss = loss_fn(out, data.y[idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(model)
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def samples_seen(n: int, config: FedConfig) -> int:
    """How many training samples a client with ``n`` samples processes in one round."""
    if config.local_steps is None:
        return n * config.local_epochs
    full, rest = divmod(n, config.batch_size)
    per_pass = [config.batch_size] * full + ([rest] if rest else [])
    passes, extra = divmod(config.local_steps, len(per_pass))
    return passes * n + sum(per_pass[:extra])


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 2500) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on ``data``."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss / len(data), correct / len(data)


def fedavg(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    r"""Weighted average :math:`\sum_k \frac{w_k}{\sum_j w_j} u_k` of update dicts (FedAvg uses :math:`w_k = n_k`)."""
    if len(updates) == 0:
        raise ValueError("fedavg needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    w = (w / w.sum()).tolist()
    return {name: sum(wk * u[name].to(torch.float32) for wk, u in zip(w, updates)).to(updates[0][name].dtype)
            for name in updates[0]}


@dataclass
class Client:
    """A federated client: an id and the indices of its samples in the shared dataset.

    Deliberately *not* an ``nn.Module``: a client owns data, not parameters; it borrows the one
    simulation model for its local training.
    """

    cid: int
    indices: torch.Tensor

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def local_update(self, model: nn.Module, start_state: Mapping[str, torch.Tensor], data: TensorDataset,
                     config: FedConfig, round_idx: int, loss_fn: LossFn | None = None,
                     after_step: Callable[[nn.Module], None] | None = None) -> tuple[dict[str, torch.Tensor], float]:
        """Train from ``start_state`` and return (update = local - start, mean training loss)."""
        model.load_state_dict(start_state, strict=False)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + round_idx * 10_007 + self.cid)
        loss = local_train(model, data, self.indices, epochs=config.local_epochs, batch_size=config.batch_size,
                           lr=config.lr * config.lr_decay ** (round_idx - 1), momentum=config.momentum, weight_decay=config.weight_decay,
                           generator=gen, loss_fn=loss_fn, after_step=after_step, steps=config.local_steps)
        local = model.state_dict()
        return {k: local[k].detach() - v for k, v in start_state.items()}, loss


class Server:
    """Holds the global model; broadcasts it, decodes and checks uploads, and aggregates them."""

    def __init__(self, model: nn.Module, uplink: Codec | None = None, downlink: Codec | None = None) -> None:
        self.model = model
        self.uplink = uplink or Float32Codec()
        self.downlink = downlink or Float32Codec()
        self.rejected: list[tuple[int, int, str]] = []  # (round, client id, reason)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return float_state(self.model)

    def broadcast(self) -> bytes:
        """The downlink payload every sampled client receives this round."""
        return self.downlink.encode(self.state)

    def receive(self, payload: bytes, round_idx: int, client_id: int) -> dict[str, torch.Tensor] | None:
        """Decode and validate one upload; a bad payload is logged and skipped (returns None)."""
        try:
            update = self.uplink.decode(payload)
            validate_update(update, self.state)
        except PayloadError as exc:
            self.rejected.append((round_idx, client_id, str(exc)))
            return None
        return update

    def apply(self, updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> None:
        """``w <- w + fedavg(updates, weights)``; does nothing when no update survived."""
        if not updates:
            return
        avg = fedavg(updates, weights)
        new_state = {k: v + avg[k] for k, v in self.state.items()}
        self.model.load_state_dict(new_state, strict=False)


@dataclass
class RoundRecord:
    """One row of a :class:`History`. ``bytes_up`` sums the accepted and rejected uploads."""

    round: int
    test_acc: float
    test_loss: float
    train_loss: float
    bytes_up: int
    bytes_down: int
    clients: int
    rejected: int
    samples: int      # training samples processed this round (the compute spent)
    seconds: float


@dataclass
class History:
    """Per-round records of a run, with a few conveniences for tables and figures."""

    label: str = ""
    rows: list[RoundRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list:
        return [getattr(r, name) for r in self.rows]

    def evaluated(self) -> list[RoundRecord]:
        return [r for r in self.rows if not math.isnan(r.test_acc)]

    @property
    def final_accuracy(self) -> float:
        return self.evaluated()[-1].test_acc

    @property
    def bytes_up_per_client(self) -> float:
        """Mean uplink bytes one client sends in one round."""
        return sum(r.bytes_up for r in self.rows) / max(1, sum(r.clients for r in self.rows))

    @property
    def total_bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.rows)

    @property
    def total_samples(self) -> int:
        return sum(r.samples for r in self.rows)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def summary(self) -> str:
        return (f"{self.label or 'run'}: {len(self.rows)} rounds, test accuracy {self.final_accuracy:.4f}, "
                f"{self.bytes_up_per_client / 1e3:.1f} kB up per client per round")


@dataclass
class FederatedRun:
    """What :func:`run_federated` returns: the trained global model, its history and its server."""

    model: nn.Module
    history: History
    server: Server


def _log(history: History, every: int, total: int) -> None:
    r = history.rows[-1]
    if every and (r.round % every == 0 or r.round == total):
        acc = "  -   " if math.isnan(r.test_acc) else f"{r.test_acc:.4f}"
        print(f"[{history.label or 'fedavg'}] round {r.round:3d}/{total}  test acc {acc}  "
              f"up {r.bytes_up / 1e3:9.1f} kB  rejected {r.rejected}", flush=True)


def run_federated(model: nn.Module, train: TensorDataset, partition: Sequence[torch.Tensor], test: TensorDataset,
                  config: FedConfig, *, uplink: Codec | None = None, downlink: Codec | None = None,
                  error_feedback: bool = False, loss_fn: LossFn | None = None,
                  after_local_step: Callable[[nn.Module], None] | None = None,
                  before_round: Callable[[int, Server], None] | None = None,
                  transmit: Callable[[int, int, bytes], bytes] | None = None,
                  label: str = "", log_every: int = 0) -> FederatedRun:
    """Simulate ``config.rounds`` rounds of FedAvg and return the global model and its :class:`History`.

    ``model`` is copied, so the same initial model can start several runs (same seed, same init).
    ``uplink``/``downlink`` codecs default to float32; ``error_feedback`` keeps per-client residuals
    of a lossy uplink; ``loss_fn`` replaces cross-entropy in local training; ``after_local_step``
    runs after each local SGD step; ``before_round(round, server)`` lets the server change the global
    model (a pruning schedule); ``transmit(round, client_id, payload)`` is the network, identity by
    default (tests and chapters use it to corrupt a payload); ``log_every`` > 0 prints progress.
    """
    if len(partition) == 0:
        raise ValueError("partition has no clients")
    clients = [Client(k, torch.as_tensor(idx, dtype=torch.long)) for k, idx in enumerate(partition)]
    if any(c.num_samples == 0 for c in clients):
        raise ValueError("every client needs at least one sample")
    global_model = copy.deepcopy(model)
    worker = copy.deepcopy(model)        # the one model every client trains in turn
    server = Server(global_model, uplink, downlink)
    ef = ErrorFeedback() if error_feedback else None
    rng = np.random.default_rng(config.seed)
    m = max(1, round(config.fraction * len(clients)))
    history = History(label=label)
    for rnd in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        if before_round is not None:
            before_round(rnd, server)
        chosen = sorted(rng.choice(len(clients), size=m, replace=False).tolist())
        down = server.broadcast()
        start_state = server.downlink.decode(down)
        updates, weights, losses, up_bytes, rejected, samples = [], [], [], 0, 0, 0
        for k in chosen:
            client = clients[k]
            update, loss = client.local_update(worker, start_state, train, config, rnd, loss_fn, after_local_step)
            if ef is not None:
                update = ef.compensate(k, update)
            payload = server.uplink.encode(update)
            if ef is not None:
                ef.remember(k, update, server.uplink.decode(payload))
            if transmit is not None:
                payload = transmit(rnd, k, payload)
            up_bytes += len(payload)
            samples += samples_seen(client.num_samples, config)
            received = server.receive(payload, rnd, k)
            if received is None:
                rejected += 1
                continue
            updates.append(received)
            weights.append(client.num_samples)
            losses.append(loss)
        server.apply(updates, weights)
        if rnd % config.eval_every == 0 or rnd == config.rounds:
            test_loss, test_acc = evaluate(global_model, test)
        else:
            test_loss, test_acc = float("nan"), float("nan")
        history.rows.append(RoundRecord(
            round=rnd, test_acc=test_acc, test_loss=test_loss,
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            bytes_up=up_bytes, bytes_down=len(down) * len(chosen), clients=len(chosen), rejected=rejected,
            samples=samples, seconds=time.perf_counter() - t0))
        _log(history, log_every, config.rounds)
    return FederatedRun(global_model, history, server)


def train_centralized(model: nn.Module, train: TensorDataset, test: TensorDataset, *, epochs: int,
                      batch_size: int = 32, lr: float = 0.05, lr_decay: float = 1.0, momentum: float = 0.0,
                      weight_decay: float = 0.0,
                      seed: int = 0, indices: torch.Tensor | None = None, loss_fn: LossFn | None = None,
                      label: str = "centralized", log_every: int = 0) -> FederatedRun:
    """The baseline: the same model and the same SGD as a client, on all the data, one row per epoch
    (epoch e uses learning rate ``lr * lr_decay**(e-1)``, as round e of :func:`run_federated` does)."""
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    model = copy.deepcopy(model)
    idx = torch.arange(len(train)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    history = History(label=label)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss = local_train(model, train, idx, epochs=1, batch_size=batch_size, lr=lr * lr_decay ** (epoch - 1),
                           momentum=momentum,
                           weight_decay=weight_decay, generator=gen, loss_fn=loss_fn)
        test_loss, test_acc = evaluate(model, test)
        history.rows.append(RoundRecord(epoch, test_acc, test_loss, loss, 0, 0, 1, 0, len(idx),
                                        time.perf_counter() - t0))
        _log(history, log_every, epochs)
    return FederatedRun(model, history, Server(model))
