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
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import DEFAULT_NORM_BOUND, Aggregator, FedAvg
from .data import TensorDataset
from .federated import FedConfig
from .training import evaluate, minibatches

__all__ = ["FedProx", "fine_tune_curve"]


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


