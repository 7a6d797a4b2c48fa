r"""How the server turns the round's client updates into the next global model.

Two layers, each one small class:

* an **aggregator** combines decoded, validated updates into one update. :class:`WeightedMean` is
  FedAvg's rule (McMahan et al. 2017),

  .. math::  \bar\Delta = \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j}\, \Delta_k ;

  :class:`CoordinateMedian` and :class:`TrimmedMean` are robust rules (Yin et al. 2018) that ignore
  the weights, so no single client can pull the result arbitrarily far;
* a **strategy** is the server's policy for a round: which clients to sample, what to do to the global
  model before the round (:meth:`FedAvg.before_round`, e.g. pruning it), what a client does after each
  local SGD step (:meth:`FedAvg.after_local_step`, e.g. re-apply a mask), and how to aggregate, including
  a **norm bound** that drops (or clips) any update whose L2 norm exceeds ``norm_bound`` times the median
  norm of the round's updates (on by default, at a multiple that never touches the book's honest updates).

A new policy (pruning, deadlines, robust rules) is a new subclass or a new aggregator, not a new
parameter of the round loop. The simulator (:func:`helpers.federated.run_federated`) and the Flower app
use the same objects.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # only for type hints: federated imports this module, not the other way round
    from .federated import Server

__all__ = [
    "Update",
    "check_updates",
    "fedavg",
    "update_norm",
    "bound_norms",
    "Aggregator",
    "WeightedMean",
    "CoordinateMedian",
    "TrimmedMean",
    "FedAvg",
    "DEFAULT_NORM_BOUND",
]

Update = Mapping[str, torch.Tensor]
DEFAULT_NORM_BOUND = 10.0


def check_updates(updates: Sequence[Update], weights: Sequence[float] | None = None) -> list[float] | None:
    """Raise a ``ValueError`` naming what is wrong unless the updates can be combined: at least one,
    the same tensor names and shapes in each, floating point, and (if given) one non-negative weight
    per update with a positive sum. Returns the weights normalised to sum to 1."""
    if len(updates) == 0:
        raise ValueError("updates is empty: need at least one update to aggregate")
    names = list(updates[0])
    for i, u in enumerate(updates):
        if set(u) != set(names):
            raise ValueError(f"updates[{i}] has tensors {sorted(u)}, updates[0] has {sorted(names)}")
        for name in names:
            if tuple(u[name].shape) != tuple(updates[0][name].shape):
                raise ValueError(f"updates[{i}][{name!r}] has shape {tuple(u[name].shape)}, "
                                 f"updates[0] has {tuple(updates[0][name].shape)}")
            if not u[name].is_floating_point():
                raise ValueError(f"updates[{i}][{name!r}] has dtype {u[name].dtype}; updates must be floating point")
    if weights is None:
        return None
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite and non-negative with a positive sum, got {w}")
    total = sum(w)
    return [x / total for x in w]


def fedavg(updates: Sequence[Update], weights: Sequence[float],
           like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    r"""Weighted average :math:`\sum_k \frac{w_k}{\sum_j w_j} u_k` of update dicts (FedAvg uses :math:`w_k = n_k`).

    Computed in float32 and returned in the dtype of ``like`` (the global state), or float32: an
    update's own dtype never decides the result's."""
    w = check_updates(updates, weights)
    out = {}
    for name in updates[0]:
        acc = sum(wk * u[name].to(torch.float32) for wk, u in zip(w, updates))
        out[name] = acc.to(like[name].dtype if like is not None else torch.float32)
    return out


def update_norm(update: Update) -> float:
    """The L2 norm of an update, all its tensors taken together."""
    return math.sqrt(sum(float(t.to(torch.float64).pow(2).sum()) for t in update.values()))


def bound_norms(updates: Sequence[Update], weights: Sequence[float], multiple: float,
                action: str = "drop") -> tuple[list[dict[str, torch.Tensor]], list[float], int]:
    r"""The norm bound: with :math:`\beta = \text{multiple} \times \mathrm{median}_k \|\Delta_k\|`, an update
    whose L2 norm exceeds :math:`\beta` is dropped (``action="drop"``) or scaled down to norm :math:`\beta`
    (``action="clip"``). The median is taken over the finite norms, and an update whose norm is not finite
    (a client whose SGD diverged to inf or NaN) is always dropped: no scale makes it usable. Needs ≥ 3 updates
    for a meaningful median; fewer are returned as they are.
    Returns (updates, weights, how many were dropped or clipped)."""
    if isinstance(multiple, bool) or not isinstance(multiple, (int, float)) or not 0 < multiple < float("inf"):
        raise ValueError(f"multiple must be a finite positive number, got {multiple!r}")
    if action not in ("drop", "clip"):
        raise ValueError(f"action must be 'drop' or 'clip', got {action!r}")
    ups, ws = [dict(u) for u in updates], list(weights)
    if len(ups) < 3:
        return ups, ws, 0
    norms = [update_norm(u) for u in ups]
    finite = [n for n in norms if math.isfinite(n)]
    bound = multiple * float(np.median(finite)) if finite else 0.0
    out_u, out_w, hit = [], [], 0
    for u, w, n in zip(ups, ws, norms):
        if not math.isfinite(n):
            hit += 1
            continue
        if n > bound:
            hit += 1
            if action == "drop":
                continue
            u = {k: t * (bound / n) for k, t in u.items()}
        out_u.append(u)
        out_w.append(w)
    return out_u, out_w, hit


class Aggregator:
    """Combines updates (and their sample counts) into one update."""

    name = "aggregator"

    def __call__(self, updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WeightedMean(Aggregator):
    """FedAvg's rule: the mean weighted by sample counts (:func:`fedavg`)."""

    name = "weighted mean"

    def __call__(self, updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        return fedavg(updates, weights)


class CoordinateMedian(Aggregator):
    """The coordinate-wise median of the updates (unweighted; the mean of the two middle values when
    their number is even). Robust to fewer than half the clients being arbitrary."""

    name = "median"

    def __call__(self, updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        check_updates(updates, weights)
        out = {}
        for name in updates[0]:
            s = torch.stack([u[name].to(torch.float32) for u in updates]).sort(dim=0).values
            m = len(updates)
            out[name] = s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2
        return out


class TrimmedMean(Aggregator):
    r"""Per coordinate, drop the :math:`\lfloor \beta m \rfloor` largest and smallest of the :math:`m`
    values and average the rest (unweighted). ``trim`` is :math:`\beta \in [0, 0.5)`."""

    name = "trimmed mean"

    def __init__(self, trim: float = 0.2) -> None:
        if not (isinstance(trim, (int, float)) and 0 <= trim < 0.5):
            raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
        self.trim = float(trim)

    def __call__(self, updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        check_updates(updates, weights)
        m = len(updates)
        k = int(math.floor(self.trim * m))
        out = {}
        for name in updates[0]:
            s = torch.stack([u[name].to(torch.float32) for u in updates]).sort(dim=0).values
            out[name] = s[k:m - k].mean(dim=0)
        return out

    def __repr__(self) -> str:
        return f"TrimmedMean(trim={self.trim})"


class FedAvg:
    """The round policy of FedAvg: sample a fraction of the clients uniformly without replacement,
    bound the updates' norms, aggregate with ``aggregator`` (the weighted mean by default).

    The norm bound (:func:`bound_norms`) drops (``norm_action="drop"``, the default) or clips
    (``"clip"``) any update whose norm exceeds ``norm_bound`` times the round's median norm;
    ``norm_bound=None`` switches it off. Subclasses override :meth:`before_round` (change the global model
    before it is broadcast) and :meth:`after_local_step` (run on a client's model after every SGD step);
    :class:`helpers.pruning.FederatedPruner` uses both.
    """

    def __init__(self, aggregator: Aggregator | None = None, norm_bound: float | None = DEFAULT_NORM_BOUND,
                 norm_action: str = "drop") -> None:
        if norm_bound is not None and (isinstance(norm_bound, bool) or not isinstance(norm_bound, (int, float))
                                       or not 0 < norm_bound < float("inf")):
            raise ValueError(f"norm_bound must be a finite positive multiple of the median norm, or None; "
                             f"got {norm_bound!r}")
        if norm_action not in ("drop", "clip"):
            raise ValueError(f"norm_action must be 'drop' or 'clip', got {norm_action!r}")
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise TypeError(f"aggregator must be an Aggregator, got {type(aggregator).__name__}")
        self.aggregator = aggregator or WeightedMean()
        self.norm_bound = norm_bound
        self.norm_action = norm_action
        self.last_bounded = 0

    def sample_clients(self, num_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
        """``max(1, round(fraction * num_clients))`` client ids, uniformly without replacement, sorted."""
        m = max(1, round(fraction * num_clients))
        return sorted(rng.choice(num_clients, size=m, replace=False).tolist())

    def before_round(self, round_idx: int, server: "Server") -> None:
        """Called before round ``round_idx`` is broadcast; FedAvg does nothing."""

    def after_local_step(self, model: nn.Module) -> None:
        """Called on a client's model after each local SGD step; FedAvg does nothing."""

    @property
    def needs_after_step(self) -> bool:
        return type(self).after_local_step is not FedAvg.after_local_step

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """Bound the updates' norms (if on), then combine the rest with the aggregator."""
        check_updates(updates, weights)
        ups, ws = list(updates), list(weights)
        self.last_bounded = 0
        if self.norm_bound is not None:
            ups, ws, self.last_bounded = bound_norms(ups, ws, self.norm_bound, self.norm_action)
        return self.aggregator(ups, ws)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(aggregator={self.aggregator!r}, norm_bound={self.norm_bound}, "
                f"norm_action={self.norm_action!r})")
