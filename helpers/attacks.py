r"""Bad clients (Chapter 6): model-poisoning uploads that are perfectly valid payloads.

An attack is the simulator's network (``run_federated(..., transmit=attack)``): for the attacking
client ids it decodes the honest payload, replaces the update with a crafted one and re-encodes it
with the run's own uplink codec, so the server's format checks accept it. Two classic attacks:

* :class:`SignFlip`: send :math:`-\lambda\,\Delta_k` (the honest update, reversed and scaled);
* :class:`GaussianNoise`: send noise :math:`\xi \sim \mathcal N(0, \sigma^2 I)` with
  :math:`\sigma = \lambda \lVert\Delta_k\rVert / \sqrt d`, as large as :math:`\lambda` honest updates.

Both are module-level classes, so they pickle into :func:`helpers.parallel.run_parallel` workers.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from .aggregation import Aggregator, CoordinateMedian, FedAvg, TrimmedMean, update_norm
from .codecs import Codec

__all__ = ["Attack", "SignFlip", "GaussianNoise", "choose_attackers", "robust_strategy"]


class Attack:
    """``attack(round_idx, cid, payload) -> payload``: honest clients' payloads pass untouched."""

    def __init__(self, attackers: Iterable[int], codec: Codec, scale: float = 10.0, seed: int = 0) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be the run's uplink Codec, got {type(codec).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite positive number, got {scale!r}")
        self.attackers = frozenset(int(a) for a in attackers)
        self.codec = codec
        self.scale = float(scale)
        self.seed = int(seed)

    def craft(self, update: dict[str, torch.Tensor], round_idx: int, cid: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, round_idx: int, cid: int, payload: bytes) -> bytes:
        if cid not in self.attackers:
            return payload
        honest = self.codec.decode(payload)
        return self.codec.encode(self.craft(honest, round_idx, cid))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attackers={sorted(self.attackers)}, scale={self.scale})"


class SignFlip(Attack):
    r"""Send :math:`-\lambda \Delta_k` instead of :math:`\Delta_k` (``scale`` = :math:`\lambda`)."""

    def craft(self, update, round_idx, cid):
        return {k: -self.scale * t for k, t in update.items()}


class GaussianNoise(Attack):
    r"""Send i.i.d. Gaussian noise whose expected norm is ``scale`` times the honest update's norm."""

    def craft(self, update, round_idx, cid):
        d = sum(t.numel() for t in update.values())
        sigma = self.scale * update_norm(update) / math.sqrt(d)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + round_idx * 10_007 + cid)
        return {k: sigma * torch.randn(t.shape, generator=gen) for k, t in update.items()}


def choose_attackers(num_clients: int, fraction: float, seed: int) -> list[int]:
    """``round(fraction * num_clients)`` client ids drawn at random (fixed by ``seed``), sorted."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"fraction must be in [0, 0.5): robust rules assume a minority of attackers; got {fraction!r}")
    m = int(round(fraction * num_clients))
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_clients, generator=gen)[:m].tolist())


def robust_strategy(rule: str, clip: float = 2.0, trim: float = 0.2) -> FedAvg:
    """The chapter's server rules: ``"fedavg"`` (plain weighted mean, no norm bound), ``"clip"``
    (clip updates to ``clip`` times the round's median norm, then the weighted mean), ``"median"``
    (coordinate-wise median) and ``"trimmed"`` (trimmed mean dropping ``trim`` of each tail)."""
    rules: dict[str, tuple[Aggregator | None, float | None]] = {
        "fedavg": (None, None), "clip": (None, clip), "median": (CoordinateMedian(), None),
        "trimmed": (TrimmedMean(trim), None)}
    if rule not in rules:
        raise ValueError(f"rule must be one of {sorted(rules)}, got {rule!r}")
    agg, bound = rules[rule]
    if bound is None:
        return FedAvg(aggregator=agg, norm_bound=None)
    return FedAvg(aggregator=agg, norm_bound=bound, norm_action="clip")


