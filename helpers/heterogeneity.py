r"""Data heterogeneity (Chapter 6): a drift-correcting strategy (FedProx), personalization by local
fine-tuning. The chapter's experiments live in :mod:`helpers.chapters.ch6`.

FedProx (Li et al. 2020) adds a proximal term to each client's objective,

.. math::  \min_w\; F_k(w) + \frac{\mu}{2}\,\lVert w - w_t\rVert^2 ,

which keeps the local model near the global one :math:`w_t` it started from. :class:`FedProx` applies
it as a proximal step after every local SGD step (proximal SGD): with :math:`v` the weights after the
step and :math:`\eta` the learning rate,

.. math::  w \leftarrow \operatorname{prox}_{\eta\mu}(v) = \arg\min_w \frac{1}{2\eta}\lVert w - v\rVert^2
           + \frac{\mu}{2}\lVert w - w_t\rVert^2 = \frac{v + \eta\mu\, w_t}{1 + \eta\mu}.

It costs no extra bytes: the proximal term only needs the global model the client received anyway.
With momentum (the book's SGD has :math:`\beta = 0.9`) the proximal step follows the momentum step and
never enters the momentum buffer, so the local iteration is proximal SGD with momentum on :math:`F_k`,
not momentum SGD on the FedProx objective; with :math:`\beta = 0` it is exact proximal SGD.

SCAFFOLD (Karimireddy et al. 2020) corrects the drift with **control variates** instead: the server
keeps :math:`c`, client :math:`k` keeps :math:`c_k`, and every local step uses the corrected gradient
:math:`g_k(y) - c_k + c`. After :math:`K` local steps from :math:`x` to :math:`y_k`,

.. math::  c_k^+ = c_k - c + \frac{x - y_k}{K_\beta\,\eta}, \qquad
           K_\beta = \sum_{j=1}^{K} \frac{1 - \beta^j}{1 - \beta}\quad (K_0 = K),

the client uploads :math:`\Delta y_k = y_k - x` and :math:`\Delta c_k = c_k^+ - c_k` (two payloads of
the model's size, each through a codec), and the server sets :math:`x \leftarrow x + \mathrm{agg}(\Delta y)`,
:math:`c \leftarrow c + \sum_{k \in S_t} \frac{n_k}{n} \Delta c_k`. :math:`K_\beta` is the number of
steps a constant gradient is effectively taken with momentum :math:`\beta` from a fresh buffer, so
:math:`(x - y_k)/(K_\beta \eta)` is the client's mean corrected gradient; for plain SGD it is the
paper's rule. :func:`run_scaffold` runs it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import DEFAULT_NORM_BOUND, Aggregator, FedAvg
from .codecs import Codec, Float32Codec, PayloadError
from .data import TensorDataset
from .federated import FedConfig, RoundTally, Server, make_clients
from .history import History, print_progress
from .training import evaluate, minibatches

__all__ = ["FedProx", "fine_tune_curve", "effective_steps", "scaffold_variate_update", "local_steps_run",
           "ScaffoldRun", "run_scaffold"]


class FedProx(FedAvg):
    r"""FedAvg whose clients take a proximal step towards the round's global model after every SGD
    step: :math:`w \leftarrow (v + \eta\mu w_t)/(1 + \eta\mu)`, with :math:`\eta` the round's learning
    rate from ``config`` and :math:`\mu` = ``mu`` (``mu=0`` is FedAvg)."""

    def __init__(self, mu: float, config: FedConfig, aggregator: Aggregator | None = None,
                 norm_bound: float | None = DEFAULT_NORM_BOUND) -> None:
        super().__init__(aggregator=aggregator, norm_bound=norm_bound)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not np.isfinite(mu) or mu < 0:
            raise ValueError(f"mu must be a finite non-negative number, got {mu!r}")
        if not isinstance(config, FedConfig):
            raise TypeError(f"config must be a FedConfig, got {type(config).__name__}")
        self.mu = float(mu)
        self.config = config
        self._anchor: dict[str, torch.Tensor] = {}
        self._c = 0.0

    def before_round(self, round_idx: int, server) -> None:
        """Remember the global weights :math:`w_t` and :math:`c = \\eta\\mu` for this round."""
        self._anchor = server.state
        self._c = self.config.lr_at(round_idx) * self.mu

    def after_local_step(self, model: nn.Module) -> None:
        if self._c == 0.0:
            return
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(self._anchor[name], alpha=self._c).div_(1.0 + self._c)

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu}, aggregator={self.aggregator!r})"


def fine_tune_curve(model: nn.Module, data: TensorDataset, tune_idx: torch.Tensor, eval_idx: torch.Tensor,
                    checkpoints: Sequence[int], *, lr: float, batch_size: int = 32, momentum: float = 0.9,
                    seed: int = 0) -> list[float]:
    """Personalization: fine-tune a copy of ``model`` with SGD on ``data[tune_idx]`` and return its
    accuracy on ``data[eval_idx]`` after each number of steps in ``checkpoints`` (ascending; 0 is the
    model as received). One optimizer runs throughout, so the checkpoints lie on one trajectory."""
    steps = list(checkpoints)
    if not steps or any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] < 0:
        raise ValueError(f"checkpoints must be ascending non-negative step counts, got {checkpoints!r}")
    local = copy.deepcopy(model)
    evalset = data.subset(eval_idx)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(local.parameters(), lr=lr, momentum=momentum)
    batches = minibatches(torch.as_tensor(tune_idx, dtype=torch.long), batch_size, gen, steps=steps[-1])
    out, done = [], 0
    for target in steps:
        local.train()
        while done < target:
            b = next(batches)
            loss = F.cross_entropy(local(data.x[b]), data.y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
        out.append(evaluate(local, evalset)[1])
    return out




# ---- SCAFFOLD -----------------------------------------------------------------------------------

def effective_steps(steps: int, momentum: float = 0.0) -> float:
    r""":math:`K_\beta = \sum_{j=1}^{K} (1 - \beta^j)/(1 - \beta)`: the multiple of :math:`\eta g` that
    :math:`K` steps of SGD with momentum :math:`\beta` (fresh buffer) move under a constant gradient
    :math:`g`; :math:`K` when :math:`\beta = 0`."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if momentum == 0:
        return float(steps)
    b = float(momentum)
    return (steps - b * (1 - b ** steps) / (1 - b)) / (1 - b)


def scaffold_variate_update(c_k: dict[str, torch.Tensor], c: dict[str, torch.Tensor], x: dict[str, torch.Tensor],
                            y: dict[str, torch.Tensor], steps: int, lr: float,
                            momentum: float = 0.0) -> dict[str, torch.Tensor]:
    r"""SCAFFOLD's new client control variate (option II), per tensor:
    :math:`c_k^+ = c_k - c + (x - y)/(K_\beta\,\eta)` with :math:`K_\beta` = :func:`effective_steps`."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {lr!r}")
    denom = effective_steps(steps, momentum) * float(lr)
    for name, d in (("c", c), ("x", x), ("y", y)):
        if set(d) != set(c_k):
            raise ValueError(f"{name} has tensors {sorted(d)[:5]}, c_k has {sorted(c_k)[:5]}")
    return {k: c_k[k] - c[k] + (x[k] - y[k]) / denom for k in c_k}


def local_steps_run(num_samples: int, config: FedConfig) -> int:
    """How many SGD steps a client with ``num_samples`` samples takes in one round of ``config``."""
    if config.local_steps is not None:
        return config.local_steps
    return math.ceil(num_samples / config.batch_size) * config.local_epochs


@dataclass
class ScaffoldRun:
    """What :func:`run_scaffold` returns: the global model, its history (bytes include both payloads),
    the server, the server's control variate ``c`` and each client's ``c_k``."""

    model: nn.Module
    history: History
    server: Server
    c: dict[str, torch.Tensor]
    client_variates: list[dict[str, torch.Tensor]]


def run_scaffold(model: nn.Module, train: TensorDataset, partition: Sequence[torch.Tensor], test: TensorDataset,
                 config: FedConfig, *, uplink: Codec | None = None, variate_codec: Codec | None = None,
                 downlink: Codec | None = None, strategy: FedAvg | None = None, label: str = "",
                 log_every: int = 0) -> ScaffoldRun:
    r"""SCAFFOLD (Karimireddy et al. 2020) on the book's round loop: as :func:`helpers.federated.run_federated`
    (same sampling, client shuffling, codecs, validation, aggregation by ``strategy``), plus control variates.

    Each sampled client receives the global model and :math:`c` (two ``downlink`` payloads), trains with the
    corrected gradient :math:`g - c_k + c` (a gradient hook on every parameter, so the correction goes through
    momentum like the gradient), and uploads :math:`\Delta y_k` with ``uplink`` and :math:`\Delta c_k` with
    ``variate_codec`` (float32 by default). The client then keeps :math:`c_k + \mathrm{decode}(\Delta c_k)`,
    what the server received, so :math:`c = \sum_k \frac{n_k}{n} c_k` holds exactly with a lossy codec too.
    With zero variates (the first round) a round is exactly FedAvg's."""
    if not isinstance(config, FedConfig):
        raise TypeError(f"config must be a FedConfig, got {type(config).__name__}")
    if len(partition) == 0:
        raise ValueError("partition has no clients")
    for name, codec in (("uplink", uplink), ("variate_codec", variate_codec), ("downlink", downlink)):
        if codec is not None and not isinstance(codec, Codec):
            raise TypeError(f"{name} must be a Codec, got {type(codec).__name__}")
    clients = make_clients(partition, len(train))
    if len(test) == 0:
        raise ValueError("test set is empty")
    strategy = strategy or FedAvg()
    variate_codec = variate_codec or Float32Codec()
    global_model, worker = copy.deepcopy(model), copy.deepcopy(model)
    server = Server(global_model, uplink, downlink, strategy)
    zeros = {k: torch.zeros_like(v) for k, v in server.state.items()}
    c = {k: v.clone() for k, v in zeros.items()}
    c_clients = [{k: v.clone() for k, v in zeros.items()} for _ in clients]
    n_total = sum(cl.num_samples for cl in clients)
    correction: dict[str, torch.Tensor] = {}
    hooks = [p.register_hook(lambda g, n=name: g + correction[n]) for name, p in worker.named_parameters()]
    after_step = strategy.after_local_step if strategy.needs_after_step else None
    rng = np.random.default_rng(config.seed)
    history = History(label=label)
    try:
        for round_idx in range(1, config.rounds + 1):
            t0 = time.perf_counter()
            strategy.before_round(round_idx, server)
            chosen = strategy.sample_clients(len(clients), config.fraction, rng)
            down, down_c = server.broadcast(), server.downlink.encode(c)
            x = server.downlink.decode(down)
            c_recv = server.downlink.decode(down_c, reference=x)
            tally, c_step = RoundTally(), {k: torch.zeros_like(v) for k, v in zeros.items()}
            for cid in chosen:
                cl, c_k = clients[cid], c_clients[cid]
                correction.clear()
                correction.update({k: (c_recv[k] - c_k[k]) for k in c_k})
                update, loss = cl.local_update(worker, x, train, config, round_idx, None, after_step)
                y = {k: x[k] + update[k] for k in x}
                c_plus = scaffold_variate_update(c_k, c_recv, x, y, local_steps_run(cl.num_samples, config),
                                                 config.lr_at(round_idx), config.momentum)
                payload = server.uplink.encode(update)
                payload_c = variate_codec.encode({k: c_plus[k] - c_k[k] for k in c_k})
                try:
                    dc = variate_codec.decode(payload_c, reference=x)
                except PayloadError as exc:
                    server.rejected.append((round_idx, cid, f"control variate: {exc}"))
                    tally.up_bytes += len(payload) + len(payload_c)
                    tally.rejected += 1
                    continue
                tally.up_bytes += len(payload_c)
                before = len(tally.updates)
                tally.receive(server, payload, round_idx, cid, cl.num_samples, loss, config)
                if len(tally.updates) > before:          # accepted: the client and the server agree on c_k
                    for k in c_k:
                        c_k[k] = c_k[k] + dc[k]
                        c_step[k] += (cl.num_samples / n_total) * dc[k]
            c = {k: c[k] + c_step[k] for k in c}
            history.rows.append(tally.close(server, test, round_idx, config,
                                            bytes_down=(len(down) + len(down_c)) * len(chosen),
                                            clients=len(chosen), t0=t0))
            print_progress(history, log_every, config.rounds)
    finally:
        for h in hooks:
            h.remove()
    return ScaffoldRun(global_model, history, server, c, c_clients)
