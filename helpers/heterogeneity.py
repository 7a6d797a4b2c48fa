r"""Data heterogeneity (Chapter 6): a drift-correcting strategy (FedProx), personalization by local
fine-tuning, and the chapter's experiment tasks for :func:`helpers.parallel.run_parallel`.

FedProx (Li et al. 2020) adds a proximal term to each client's objective,

.. math::  \min_w\; F_k(w) + \frac{\mu}{2}\,\lVert w - w_t\rVert^2 ,

which keeps the local model near the global one :math:`w_t` it started from. :class:`FedProx` applies
it as a proximal step after every local SGD step (proximal SGD): with :math:`v` the weights after the
step and :math:`\eta` the learning rate,

.. math::  w \leftarrow \operatorname{prox}_{\eta\mu}(v) = \arg\min_w \frac{1}{2\eta}\lVert w - v\rVert^2
           + \frac{\mu}{2}\lVert w - w_t\rVert^2 = \frac{v + \eta\mu\, w_t}{1 + \eta\mu}.

It costs no extra bytes: the proximal term only needs the global model the client received anyway.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import DEFAULT_NORM_BOUND, Aggregator, FedAvg
from .data import TensorDataset, split_indices
from .federated import FedConfig
from .training import evaluate, minibatches

__all__ = ["FedProx", "fine_tune_curve", "alpha_task", "generalization_task"]


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


def _mlp(seed: int) -> nn.Module:
    from .models import MLP
    from .reproducibility import seed_everything

    seed_everything(seed)
    return MLP()


def alpha_task(*, seed: int, train: TensorDataset, val: TensorDataset, test: TensorDataset,
               partition: Sequence[torch.Tensor], config: FedConfig, mu: float = 0.0) -> dict:
    """One FedAvg (``mu=0``) or FedProx run of the book's MLP for the non-IID sweep: returns the final
    global model's ``val_acc`` (for choosing μ) and ``test_acc`` (for reporting)."""
    from .federated import run_federated

    cfg = dataclasses.replace(config, seed=seed, eval_every=config.rounds)
    strategy = FedProx(mu, cfg) if mu > 0 else None
    run = run_federated(_mlp(seed), train, partition, val, cfg, strategy=strategy)
    return {"val_acc": run.history.final_accuracy, "test_acc": evaluate(run.model, test)[1],
            "bytes_up": run.history.bytes_up_per_client}


def generalization_task(*, seed: int, train: TensorDataset, test: TensorDataset, partition: Sequence[torch.Tensor],
                        config: FedConfig, participants: int, tune_clients: int, checkpoints: Sequence[int],
                        lr: float, local_eval: float = 0.3) -> dict:
    r"""Train on the first ``participants`` clients only, then measure the global model client by client.

    Every client's indices are split once (``seed``) into a part it trains or fine-tunes on and a
    ``local_eval`` fraction it is evaluated on. Clients ``participants ..`` never take part; the first
    ``tune_clients`` of them choose the number of fine-tuning steps (validation), the rest are reported.
    Returns per-client accuracies: ``seen`` (participants, global model), ``unseen_curves`` (every held-out
    client's accuracy after each of ``checkpoints`` fine-tuning steps; step 0 is the global model)
    and the global model's ``test_acc``."""
    from .federated import run_federated

    if not 0 < participants < len(partition) - tune_clients:
        raise ValueError(f"need 0 < participants < {len(partition) - tune_clients} (clients minus tune_clients)")
    splits = [split_indices(p, local_eval, seed * 7919 + k) for k, p in enumerate(partition)]
    fit_parts = [s[0] for s in splits]
    cfg = dataclasses.replace(config, seed=seed)
    run = run_federated(_mlp(seed), train, fit_parts[:participants], test, cfg)
    model = run.model
    seen = [evaluate(model, train.subset(splits[k][1]))[1] for k in range(participants)]
    curves = [fine_tune_curve(model, train, splits[k][0], splits[k][1], checkpoints, lr=lr, seed=seed * 7919 + k)
              for k in range(participants, len(partition))]
    return {"seen": seen, "unseen_curves": curves, "tune_clients": tune_clients,
            "test_acc": run.history.final_accuracy}
