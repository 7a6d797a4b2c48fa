r"""Federated averaging (FedAvg, McMahan et al. 2017) as a simulation on one machine.

One round::

    strategy.before_round --> server state --downlink codec--> bytes --> each sampled client
    client: E local epochs of SGD on its own indices --> update = local - global
    update --uplink codec--> bytes  (len(bytes) is the cost)
    server: decode + validate (a bad payload is skipped) --> strategy.aggregate (weighted FedAvg):

.. math::  w_{t+1} = w_t + \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j}\, \Delta_k .

Clients are plain objects holding index tensors into one in-memory dataset; a single model
object is reused for every client's local training, so the simulator runs at about the speed
of centralized training of the same model. Plain training lives in :mod:`helpers.training`,
the aggregation rules and the round policy in :mod:`helpers.aggregation`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .aggregation import FedAvg
from .codecs import Codec, Float32Codec, PayloadError
from .data import TensorDataset
from .error_feedback import ErrorFeedback
from .history import History, RoundRecord, print_progress
from .training import LossFn, client_generator, evaluate, float_state, local_train

__all__ = [
    "FedConfig",
    "check_state_like",
    "Client",
    "Server",
    "FederatedRun",
    "RoundTally",
    "samples_seen",
    "make_clients",
    "run_federated",
]


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


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
        for name in ("rounds", "local_epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.local_steps is not None and (not _is_int(self.local_steps) or self.local_steps < 1):
            raise ValueError(f"local_steps must be an int ≥ 1 (or None for whole epochs), got {self.local_steps!r}")
        if not _is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if not _is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if not _is_number(self.lr_decay) or not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")

    def lr_at(self, round_idx: int) -> float:
        """The learning rate of round ``round_idx`` (1-based): ``lr * lr_decay**(round_idx - 1)``."""
        return self.lr * self.lr_decay ** (round_idx - 1)


def samples_seen(n: int, config: FedConfig) -> int:
    """How many training samples a client with ``n`` samples processes in one round."""
    if config.local_steps is None:
        return n * config.local_epochs
    full, rest = divmod(n, config.batch_size)
    per_pass = [config.batch_size] * full + ([rest] if rest else [])
    passes, extra = divmod(config.local_steps, len(per_pass))
    return passes * n + sum(per_pass[:extra])



def check_state_like(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``tensors`` has exactly ``reference``'s tensor names, each
    a tensor of the same shape (an update against the server's state, a start state against the model)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{name} must be a dict of tensors, got {type(tensors).__name__}")
    missing, extra = sorted(set(reference) - set(tensors)), sorted(set(tensors) - set(reference))
    if missing or extra:
        raise ValueError(f"{name} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, ref in reference.items():
        t = tensors[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}[{key!r}] has shape {tuple(t.shape)}, the model's is {tuple(ref.shape)}")

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
        """Train from ``start_state`` and return (update = local - start, mean training loss).
        ``start_state`` must match ``model``'s floating-point tensors (names and shapes)."""
        check_state_like(start_state, {k: v for k, v in model.state_dict().items() if v.is_floating_point()},
                         "start_state")
        model.load_state_dict(start_state, strict=False)
        loss = local_train(model, data, self.indices, epochs=config.local_epochs, batch_size=config.batch_size,
                           lr=config.lr_at(round_idx), momentum=config.momentum, weight_decay=config.weight_decay,
                           generator=client_generator(config.seed, round_idx, self.cid), loss_fn=loss_fn,
                           after_step=after_step, steps=config.local_steps)
        local = model.state_dict()
        return {k: local[k].detach() - v for k, v in start_state.items()}, loss


class Server:
    """Holds the global model; broadcasts it, decodes and checks uploads, and applies the strategy's
    aggregate of the accepted ones."""

    def __init__(self, model: nn.Module, uplink: Codec | None = None, downlink: Codec | None = None,
                 strategy: FedAvg | None = None) -> None:
        self.model = model
        self.uplink = uplink or Float32Codec()
        self.downlink = downlink or Float32Codec()
        self.strategy = strategy or FedAvg()
        self.rejected: list[tuple[int, int, str]] = []  # (round, client id, reason)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return float_state(self.model)

    def broadcast(self) -> bytes:
        """The downlink payload every sampled client receives this round."""
        return self.downlink.encode(self.state)

    def receive(self, payload: bytes, round_idx: int, cid: int) -> dict[str, torch.Tensor] | None:
        """Decode and validate one upload against the global state; a bad payload is logged and
        skipped (returns None), so one client can never stop the round."""
        try:
            return self.uplink.decode(payload, reference=self.state)
        except PayloadError as exc:
            self.rejected.append((round_idx, cid, str(exc)))
            return None

    def apply(self, updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> None:
        """``w <- w + strategy.aggregate(updates, weights)``; does nothing when no update survived."""
        if not updates:
            return
        state = self.state
        for i, u in enumerate(updates):
            check_state_like(u, state, f"updates[{i}]")
        avg = self.strategy.aggregate(updates, weights)
        new_state = {k: v + avg[k].to(v.dtype) for k, v in state.items()}
        self.model.load_state_dict(new_state, strict=False)


@dataclass
class FederatedRun:
    """What :func:`run_federated` returns: the trained global model, its history and its server."""

    model: nn.Module
    history: History
    server: Server


@dataclass
class RoundTally:
    """What the server collects in one round, in the simulator and on Flower's engine alike: every upload is
    counted (bytes, samples), decoded and validated by :meth:`Server.receive`, and kept only if accepted."""

    updates: list[dict[str, torch.Tensor]] = field(default_factory=list)
    weights: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    up_bytes: int = 0
    samples: int = 0
    rejected: int = 0

    def receive(self, server: "Server", payload: bytes, round_idx: int, cid: int, num_samples: int, loss: float,
                config: FedConfig) -> None:
        self.up_bytes += len(payload)
        self.samples += samples_seen(num_samples, config)
        received = server.receive(payload, round_idx, cid)
        if received is None:
            self.rejected += 1
            return
        self.updates.append(received)
        self.weights.append(num_samples)
        self.losses.append(loss)

    def close(self, server: "Server", test: TensorDataset, round_idx: int, config: FedConfig, *, bytes_down: int,
              clients: int, t0: float) -> RoundRecord:
        """Apply the round's aggregate, evaluate the global model when due, and return the round's record."""
        server.apply(self.updates, self.weights)
        if round_idx % config.eval_every == 0 or round_idx == config.rounds:
            test_loss, test_acc = evaluate(server.model, test)
        else:
            test_loss, test_acc = float("nan"), float("nan")
        return RoundRecord(
            round=round_idx, test_acc=test_acc, test_loss=test_loss,
            train_loss=float(np.mean(self.losses)) if self.losses else float("nan"),
            bytes_up=self.up_bytes, bytes_down=bytes_down, clients=clients, rejected=self.rejected,
            samples=self.samples, seconds=time.perf_counter() - t0,
            bounded=server.strategy.last_bounded if self.updates else 0)


def make_clients(partition: Sequence, num_train: int) -> list[Client]:
    """One :class:`Client` per index set of ``partition`` (client id = position), each checked: a non-empty 1-D
    index set inside ``[0, num_train)`` of the training set, else a ``ValueError`` naming the client."""
    clients = [Client(cid, torch.as_tensor(idx, dtype=torch.long)) for cid, idx in enumerate(partition)]
    for c in clients:
        if c.indices.dim() != 1 or c.num_samples == 0:
            raise ValueError(f"partition[{c.cid}] must be a non-empty 1-D index set")
        if int(c.indices.min()) < 0 or int(c.indices.max()) >= num_train:
            raise ValueError(f"partition[{c.cid}] has indices outside [0, {num_train}) of the training set")
    return clients


def run_federated(model: nn.Module, train: TensorDataset, partition: Sequence[torch.Tensor], test: TensorDataset,
                  config: FedConfig, *, uplink: Codec | None = None, downlink: Codec | None = None,
                  error_feedback: bool = False, loss_fn: LossFn | None = None, strategy: FedAvg | None = None,
                  transmit: Callable[[int, int, bytes], bytes] | None = None,
                  label: str = "", log_every: int = 0) -> FederatedRun:
    """Simulate ``config.rounds`` rounds of federated training and return the global model and its :class:`History`.

    ``model`` is copied, so the same initial model can start several runs (same seed, same init).
    ``uplink``/``downlink`` codecs default to float32; ``error_feedback`` keeps per-client residuals
    of a lossy uplink; ``loss_fn`` replaces cross-entropy in local training (a training objective,
    e.g. distillation); ``strategy`` is the round policy (:class:`helpers.aggregation.FedAvg` by default:
    sampling, per-round hooks, aggregation); ``transmit(round_idx, cid, payload)`` is the network,
    identity by default (tests and chapters use it to corrupt a payload); ``log_every`` > 0 prints progress.
    """
    if not isinstance(config, FedConfig):
        raise TypeError(f"config must be a FedConfig, got {type(config).__name__}")
    if len(partition) == 0:
        raise ValueError("partition has no clients")
    clients = make_clients(partition, len(train))
    if len(test) == 0:
        raise ValueError("test set is empty")
    strategy = strategy or FedAvg()
    global_model = copy.deepcopy(model)
    worker = copy.deepcopy(model)        # the one model every client trains in turn
    server = Server(global_model, uplink, downlink, strategy)
    ef = ErrorFeedback() if error_feedback else None
    after_step = strategy.after_local_step if strategy.needs_after_step else None
    rng = np.random.default_rng(config.seed)
    history = History(label=label)
    for round_idx in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        strategy.before_round(round_idx, server)
        chosen = strategy.sample_clients(len(clients), config.fraction, rng)
        down = server.broadcast()
        start_state = server.downlink.decode(down)
        tally = RoundTally()
        for cid in chosen:
            client = clients[cid]
            update, loss = client.local_update(worker, start_state, train, config, round_idx, loss_fn, after_step)
            if ef is not None:
                update = ef.compensate(cid, update)
            payload = server.uplink.encode(update)
            if ef is not None:
                ef.remember(cid, update, server.uplink.decode(payload))
            if transmit is not None:
                payload = transmit(round_idx, cid, payload)
            tally.receive(server, payload, round_idx, cid, client.num_samples, loss, config)
        history.rows.append(tally.close(server, test, round_idx, config, bytes_down=len(down) * len(chosen),
                                        clients=len(chosen), t0=t0))
        print_progress(history, log_every, config.rounds)
    return FederatedRun(global_model, history, server)
