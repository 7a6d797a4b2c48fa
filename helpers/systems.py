r"""System heterogeneity on a simulated clock: slow phones, slow links and deadlines (Chapter 6).

Every client gets a :class:`DeviceProfile`: how many training samples it processes per second and
its downlink and uplink bandwidth. One round of client :math:`k` then takes

.. math::  T_k = \underbrace{\frac{8\,|\text{down}|}{b^{\downarrow}_k}}_{\text{download}}
           + \underbrace{\frac{s_k}{v_k}}_{\text{local compute}}
           + \underbrace{\frac{8\,|\text{up}|}{b^{\uparrow}_k}}_{\text{upload}}

simulated seconds (payload sizes :math:`|\cdot|` in bytes, bandwidths :math:`b` in bit/s, :math:`s_k`
samples processed at :math:`v_k` samples/s). A synchronous round lasts as long as its slowest
participant, :math:`\max_{k \in S_t} T_k`; with a deadline :math:`D` the server stops waiting at
:math:`D`. A smaller upload (a compressing codec) shortens :math:`T_k` and so the round.

:class:`DeadlineFedAvg` is a :class:`~helpers.aggregation.FedAvg` strategy that knows every client's
profile and runs the policies of the chapter inside the ordinary :func:`~helpers.federated.run_federated`
loop: ``"wait"`` for every sampled client, ``"drop"`` whoever misses the deadline, or ``"partial"``:
give each client as many local steps as fit before the deadline (FedProx's tolerance of partial work).
Its :attr:`~DeadlineFedAvg.log` is the simulated clock.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .aggregation import DEFAULT_NORM_BOUND, Aggregator, FedAvg
from .federated import FedConfig, samples_seen

__all__ = [
    "DeviceProfile",
    "PHONE_COMPUTE_MEDIAN",
    "PHONE_UPLINK_MEDIAN",
    "PHONE_DOWNLINK_RATIO",
    "draw_profiles",
    "RoundTiming",
    "DeadlineFedAvg",
    "time_to_accuracy",
]

PHONE_COMPUTE_MEDIAN = 500.0
"""Median training throughput of a simulated phone, in samples per second (for the book's MLP)."""
PHONE_UPLINK_MEDIAN = 5e6
"""Median uplink bandwidth of a simulated phone, in bits per second."""
PHONE_DOWNLINK_RATIO = 4.0
"""A phone's downlink is this many times faster than its uplink (mobile links are asymmetric)."""


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DeviceProfile:
    """One device: training throughput (samples/s) and link bandwidths (bit/s)."""

    samples_per_s: float
    up_bps: float
    down_bps: float

    def __post_init__(self) -> None:
        for name in ("samples_per_s", "up_bps", "down_bps"):
            _positive(name, getattr(self, name))

    def download_s(self, nbytes: int) -> float:
        """Seconds to receive ``nbytes``."""
        return 8 * nbytes / self.down_bps

    def compute_s(self, samples: int) -> float:
        """Seconds to train on ``samples`` samples."""
        return samples / self.samples_per_s

    def upload_s(self, nbytes: int) -> float:
        """Seconds to send ``nbytes``."""
        return 8 * nbytes / self.up_bps

    def round_s(self, down_bytes: int, samples: int, up_bytes: int) -> float:
        """Download + local compute + upload, in simulated seconds."""
        return self.download_s(down_bytes) + self.compute_s(samples) + self.upload_s(up_bytes)


def draw_profiles(num_clients: int, seed: int, *, compute_median: float = PHONE_COMPUTE_MEDIAN,
                  compute_sigma: float = 0.5, uplink_median: float = PHONE_UPLINK_MEDIAN, uplink_sigma: float = 1.0,
                  downlink_ratio: float = PHONE_DOWNLINK_RATIO) -> list[DeviceProfile]:
    r"""``num_clients`` device profiles drawn independently from log-normal distributions,

    .. math::  v_k = v_{\text{med}}\, e^{\sigma_v z_k}, \qquad b^{\uparrow}_k = b_{\text{med}}\, e^{\sigma_b z'_k},
               \qquad b^{\downarrow}_k = r\, b^{\uparrow}_k, \qquad z_k, z'_k \sim \mathcal N(0, 1),

    heavy-tailed like measured phone populations: with :math:`\sigma = 1` the 10% slowest links are
    more than 3.6x slower than the median one, the 10% fastest 3.6x faster."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    for name, value in (("compute_median", compute_median), ("uplink_median", uplink_median),
                        ("downlink_ratio", downlink_ratio)):
        _positive(name, value)
    for name, value in (("compute_sigma", compute_sigma), ("uplink_sigma", uplink_sigma)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, num_clients))
    speed = compute_median * np.exp(compute_sigma * z[0])
    up = uplink_median * np.exp(uplink_sigma * z[1])
    return [DeviceProfile(float(v), float(b), float(downlink_ratio * b)) for v, b in zip(speed, up)]


@dataclass
class RoundTiming:
    """One round on the simulated clock: who was sampled, who reported (with how many local steps),
    who was dropped, how long the round took and the clock at its end (seconds)."""

    round: int
    sampled: list[int]
    reported: list[int]
    steps: list[int | None]   # local steps of each reporting client (None: whole epochs)
    dropped: list[int]
    seconds: float
    clock: float
    down_bytes: int
    up_bytes: int


_POLICIES = ("wait", "drop", "partial")


class DeadlineFedAvg(FedAvg):
    r"""FedAvg on a simulated clock, with a straggler policy.

    Each round the clients are sampled exactly as :class:`~helpers.aggregation.FedAvg` samples them (so
    every policy sees the same clients for the same seed); then, from each sampled client's profile and
    the round's payload sizes (the downlink payload and the uplink codec's payload, measured with
    ``len()`` of real encodings), the strategy decides:

    * ``"wait"``: every sampled client reports; the round lasts :math:`\max_k T_k`;
    * ``"drop"``: only clients with :math:`T_k \le D` report; the rest are never trained or averaged;
    * ``"partial"``: client :math:`k` runs :math:`\tau_k = \min\!\big(\tau, \lfloor (D - T^{\downarrow}_k -
      T^{\uparrow}_k)\, v_k / B \rfloor\big)` of the :math:`\tau` local steps (``config.local_steps``);
      a client that cannot fit one step is dropped.

    A round in which every sampled client reports ends with the last report; otherwise the server
    waits until the deadline :math:`D`. Only the reporting clients are returned by :meth:`sample_clients`,
    so a dropped client's update is never computed, let alone averaged. Partial work is exact: the
    local step counter freezes a client's model after its :math:`\tau_k`-th step (its remaining steps
    are undone), which needs ``config.local_steps`` (a fixed number of steps per client).
    """

    def __init__(self, profiles: Sequence[DeviceProfile], config: FedConfig, client_sizes: Sequence[int], *,
                 policy: str = "wait", deadline: float | None = None, aggregator: Aggregator | None = None,
                 norm_bound: float | None = DEFAULT_NORM_BOUND) -> None:
        super().__init__(aggregator=aggregator, norm_bound=norm_bound)
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {_POLICIES}, got {policy!r}")
        if not isinstance(config, FedConfig):
            raise TypeError(f"config must be a FedConfig, got {type(config).__name__}")
        if len(profiles) != len(client_sizes):
            raise ValueError(f"{len(profiles)} profiles but {len(client_sizes)} client_sizes: need one of each per client")
        if not all(isinstance(p, DeviceProfile) for p in profiles):
            raise TypeError("profiles must be DeviceProfile objects (see draw_profiles)")
        if policy == "wait":
            if deadline is not None:
                raise ValueError("policy 'wait' waits for everyone: pass deadline=None")
        else:
            deadline = _positive("deadline", deadline)
        if policy == "partial" and config.local_steps is None:
            raise ValueError("policy 'partial' needs config.local_steps (a fixed number of local steps per client)")
        self.profiles = list(profiles)
        self.config = config
        self.client_sizes = [int(n) for n in client_sizes]
        self.policy = policy
        self.deadline = deadline
        self.log: list[RoundTiming] = []
        self._round = 0
        self._bytes = (0, 0)
        self._plan: list[int] = []      # local steps of each reporting client, in training order
        self._step = 0                  # local steps run so far this round (all clients)
        self._frozen: dict[str, torch.Tensor] | None = None

    # ---- the clock ------------------------------------------------------------------------
    @property
    def clock(self) -> float:
        """Simulated seconds since the start of the run."""
        return self.log[-1].clock if self.log else 0.0

    def _samples(self, cid: int, steps: int | None) -> int:
        cfg = self.config if steps is None else dataclasses.replace(self.config, local_steps=steps)
        return samples_seen(self.client_sizes[cid], cfg)

    def before_round(self, round_idx: int, server) -> None:
        """Measure this round's payload sizes: the broadcast, and the uplink codec on an update-shaped dict."""
        state = server.state
        self._round = round_idx
        self._bytes = (len(server.downlink.encode(state)), len(server.uplink.encode(state)))

    def sample_clients(self, num_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
        if num_clients != len(self.profiles):
            raise ValueError(f"the run has {num_clients} clients but the strategy has {len(self.profiles)} profiles")
        sampled = super().sample_clients(num_clients, fraction, rng)
        down, up = self._bytes
        full = self.config.local_steps
        reported, steps, times = [], [], []
        for cid in sampled:
            p = self.profiles[cid]
            t_full = p.round_s(down, self._samples(cid, None), up)
            if self.policy == "wait" or t_full <= self.deadline:
                reported.append(cid)
                steps.append(full)
                times.append(t_full)
            elif self.policy == "partial":
                spare = self.deadline - p.download_s(down) - p.upload_s(up)
                fit = int(math.floor(spare * p.samples_per_s / self.config.batch_size + 1e-9)) if spare > 0 else 0
                k = min(full, fit)
                while k >= 1 and p.round_s(down, self._samples(cid, k), up) > self.deadline:
                    k -= 1   # a client smaller than one batch per step processes fewer samples; stay exact
                if k >= 1:
                    reported.append(cid)
                    steps.append(k)
                    times.append(p.round_s(down, self._samples(cid, k), up))
        dropped = [c for c in sampled if c not in reported]
        seconds = self.deadline if dropped else (max(times) if times else 0.0)
        self.log.append(RoundTiming(self._round, sampled, reported, steps, dropped, seconds, self.clock + seconds,
                                    down, up))
        self._plan, self._step, self._frozen = steps, 0, None
        return reported

    # ---- partial work ---------------------------------------------------------------------
    def after_local_step(self, model: nn.Module) -> None:
        """Count local steps; past a client's budget, restore its model to the state after its last allowed step."""
        if self.policy != "partial":
            return
        full = self.config.local_steps
        j, i = divmod(self._step, full)          # client j of the round, its step i (0-based)
        self._step += 1
        if j >= len(self._plan):
            raise RuntimeError("more local steps than planned: does run_federated train each client "
                               "for exactly config.local_steps steps, in the sampled order?")
        budget = self._plan[j]
        if budget >= full:
            return
        if i + 1 == budget:
            self._frozen = {k: v.detach().clone() for k, v in model.state_dict().items()}
        elif i + 1 > budget:
            model.load_state_dict(self._frozen)

    @property
    def needs_after_step(self) -> bool:
        return self.policy == "partial"

    def aggregate(self, updates, weights):
        if self.policy == "partial" and self._step != len(self._plan) * self.config.local_steps:
            raise RuntimeError(f"ran {self._step} local steps, planned {len(self._plan) * self.config.local_steps}")
        return super().aggregate(updates, weights)

    def __repr__(self) -> str:
        return f"DeadlineFedAvg(policy={self.policy!r}, deadline={self.deadline}, aggregator={self.aggregator!r})"


def time_to_accuracy(timings: Sequence[RoundTiming], accuracies: Sequence[float], target: float) -> float:
    """Simulated seconds at the end of the first round whose accuracy reaches ``target`` (``inf`` if none)."""
    if len(timings) != len(accuracies):
        raise ValueError(f"{len(timings)} timings but {len(accuracies)} accuracies")
    for t, a in zip(timings, accuracies):
        if a >= target:
            return t.clock
    return math.inf


