r"""Bad clients (Chapter 6): model-poisoning uploads that are perfectly valid payloads.

An attack is the simulator's network (``run_federated(..., transmit=attack)``): for the attacking
client ids it decodes the honest payload, replaces the update with a crafted one and re-encodes it
with the run's own uplink codec, so the server's format checks accept it. Two classic attacks:

* :class:`SignFlip`: send :math:`-\lambda\,\Delta_k` (the honest update, reversed and scaled);
* :class:`GaussianNoise`: send noise :math:`\xi \sim \mathcal N(0, \sigma^2 I)` with
  :math:`\sigma = \lambda \lVert\Delta_k\rVert / \sqrt d`, as large as :math:`\lambda` honest updates.

Both are module-level classes, so they pickle into :func:`helpers.parallel.run_parallel` workers.

A third attack needs the attackers to collude. **ALIE**, "a little is enough" (Baruch et al. 2019): every
attacker sends the same update, a small step against the honest majority in every coordinate,

.. math::  \tilde\Delta_i = \mu_i - z\,\sigma_i , \qquad
           z = \Phi^{-1}\!\Big(\frac{m - s}{m}\Big), \quad s = \lfloor m/2 + 1\rfloor - a,

with :math:`\mu_i, \sigma_i` the mean and standard deviation of coordinate :math:`i` over the round's honest
updates, :math:`m` clients of which :math:`a` attack (:func:`alie_z`): just inside the spread of the honest
values, so neither a coordinate-wise rule nor a norm bound sees an outlier. The attackers must see the round's
updates before sending; :class:`ALIE` simulates that collusion (with full knowledge, the strongest form) as a
wrapper around the server's strategy that swaps the attackers' updates for the crafted one, encoded and decoded
with the run's uplink codec, before the server's own rule aggregates.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .aggregation import Aggregator, CoordinateMedian, FedAvg, TrimmedMean, Update, check_updates, update_norm
from .codecs import Codec

__all__ = ["Attack", "SignFlip", "GaussianNoise", "choose_attackers", "robust_strategy", "alie_z", "alie_update",
           "ALIE"]


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




def alie_z(num_clients: int, num_attackers: int) -> float:
    r"""ALIE's step :math:`z = \Phi^{-1}((m - s)/m)` with :math:`s = \lfloor m/2 + 1 \rfloor - a` (Baruch et al.
    2019): the largest :math:`z` for which the attackers plus the :math:`s` honest clients nearest to
    :math:`\mu - z\sigma` still form a majority. ``num_clients`` = :math:`m`, ``num_attackers`` = :math:`a`."""
    for name, v in (("num_clients", num_clients), ("num_attackers", num_attackers)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not 0 < num_attackers < num_clients:
        raise ValueError(f"need 0 < num_attackers < num_clients, got {num_attackers} of {num_clients}")
    s = math.floor(num_clients / 2 + 1) - num_attackers
    return NormalDist().inv_cdf((num_clients - s) / num_clients)


def alie_update(updates: Sequence[Update], z: float) -> dict[str, torch.Tensor]:
    r"""The crafted update :math:`\mu - z\sigma`, per coordinate over ``updates`` (population standard deviation)."""
    check_updates(updates)
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z):
        raise ValueError(f"z must be a finite number, got {z!r}")
    out = {}
    for name in updates[0]:
        s = torch.stack([u[name].to(torch.float32) for u in updates])
        out[name] = s.mean(dim=0) - float(z) * s.std(dim=0, unbiased=False)
    return out


class ALIE(FedAvg):
    """Colluding ALIE attackers around the server's ``strategy`` (any :class:`FedAvg`): sampling, hooks and the
    robust rule are the strategy's own; before it aggregates, the updates of the sampled ``attackers`` are
    replaced by :func:`alie_update` of all the round's updates (the attackers know them: full knowledge), sent
    through ``codec`` (the run's uplink codec: what arrives is a valid payload's decoding). ``z=None`` takes
    :func:`alie_z` of the round's sampled and attacking clients."""

    def __init__(self, strategy: FedAvg, attackers: Iterable[int], codec: Codec, z: float | None = None) -> None:
        if not isinstance(strategy, FedAvg):
            raise TypeError(f"strategy must be a FedAvg strategy, got {type(strategy).__name__}")
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be the run's uplink Codec, got {type(codec).__name__}")
        if z is not None and (isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z)):
            raise ValueError(f"z must be a finite number or None, got {z!r}")
        super().__init__(aggregator=strategy.aggregator, norm_bound=strategy.norm_bound,
                         norm_action=strategy.norm_action)
        self.inner = strategy
        self.attackers = frozenset(int(a) for a in attackers)
        self.codec = codec
        self.z = None if z is None else float(z)
        self.z_used: list[float] = []
        self._chosen: list[int] = []

    def sample_clients(self, num_clients, fraction, rng):
        self._chosen = list(self.inner.sample_clients(num_clients, fraction, rng))
        return self._chosen

    def before_round(self, round_idx, server) -> None:
        self.inner.before_round(round_idx, server)

    def after_local_step(self, model: nn.Module) -> None:
        self.inner.after_local_step(model)

    @property
    def needs_after_step(self) -> bool:
        return self.inner.needs_after_step

    def aggregate(self, updates, weights):
        if len(updates) != len(self._chosen):
            raise RuntimeError(f"{len(updates)} updates for {len(self._chosen)} sampled clients: ALIE needs every "
                               "sampled client's payload accepted to know which update is whose")
        bad = [i for i, cid in enumerate(self._chosen) if cid in self.attackers]
        ups = list(updates)
        if bad:
            z = self.z if self.z is not None else alie_z(len(ups), len(bad))
            self.z_used.append(z)
            crafted = self.codec.decode(self.codec.encode(alie_update(ups, z)))
            for i in bad:
                ups[i] = crafted
        out = self.inner.aggregate(ups, weights)
        self.last_bounded = self.inner.last_bounded
        return out

    def __repr__(self) -> str:
        return f"ALIE(attackers={sorted(self.attackers)}, z={self.z}, strategy={self.inner!r})"
