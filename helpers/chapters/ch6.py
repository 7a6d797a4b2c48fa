r"""Chapter 6's experiments, one run each, as tasks for :func:`helpers.parallel.run_parallel`: the non-IID
sweep (FedAvg and FedProx), generalization to unseen clients, stragglers on the simulated clock and the
attack grid (:func:`attack_task`). The section notebooks add SCAFFOLD and compressed arms on the sweep
(:func:`drift_task`, timed by :func:`wait_clock`), the local-only baseline (:func:`local_only_task`), the
attack grid's noise and 4-bit conditions and the ALIE attack (:func:`alie_task`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from ..aggregation import FedAvg
from ..attacks import ALIE, GaussianNoise, SignFlip, choose_attackers, robust_strategy
from ..codecs import Float32Codec, QuantizedCodec, TopKCodec
from ..data import TensorDataset, split_indices
from ..federated import FedConfig, run_federated, samples_seen
from ..heterogeneity import FedProx, fine_tune_curve, run_scaffold
from ..history import History
from ..models import MLP
from ..reproducibility import seed_everything
from ..systems import DeadlineFedAvg, draw_profiles
from ..training import evaluate

__all__ = ["alpha_task", "generalization_task", "systems_task", "wait_clock", "drift_task", "local_only_task",
           "attack_task", "alie_task"]


def _mlp(seed: int) -> nn.Module:

    seed_everything(seed)
    return MLP()


def alpha_task(*, seed: int, train: TensorDataset, val: TensorDataset, test: TensorDataset,
               partition: Sequence[torch.Tensor], config: FedConfig, mu: float = 0.0) -> dict:
    """One FedAvg (``mu=0``) or FedProx run of the book's MLP for the non-IID sweep: returns the final
    global model's ``val_acc`` (for choosing μ) and ``test_acc`` (for reporting)."""
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


def systems_task(*, seed: int, train, test, partition: Sequence[torch.Tensor], config: FedConfig,
                 policy: str, deadline: float | None, codec: str = "float32", profile_seed: int | None = None,
                 label: str = "") -> dict:
    """One run of the chapter's straggler experiment, as a :func:`helpers.parallel.run_parallel` task:
    the book's MLP, the profiles drawn with ``profile_seed`` (default ``seed``), ``policy``/``deadline``
    as in :class:`DeadlineFedAvg`, and the uplink ``codec``: ``"float32"``, ``"q4"`` (4-bit
    :class:`~helpers.codecs.QuantizedCodec`) or ``"topk"`` (top-10% + error feedback).
    Returns the per-round test ``acc``, the ``timings`` and the ``history``."""
    codecs = {"float32": (Float32Codec, False), "q4": (lambda: QuantizedCodec(4), False),
              "topk": (lambda: TopKCodec(0.1), True)}
    if codec not in codecs:
        raise ValueError(f"codec must be one of {sorted(codecs)}, got {codec!r}")
    make, ef = codecs[codec]
    cfg = dataclasses.replace(config, seed=seed)
    profiles = draw_profiles(len(partition), seed if profile_seed is None else profile_seed)
    strategy = DeadlineFedAvg(profiles, cfg, [len(p) for p in partition], policy=policy, deadline=deadline)
    seed_everything(seed)
    run = run_federated(MLP(), train, partition, test, cfg, uplink=make(), error_feedback=ef, strategy=strategy,
                        label=label)
    return {"acc": run.history.column("test_acc"), "timings": strategy.log, "history": run.history}


def wait_clock(history: History, client_sizes: Sequence[int], config: FedConfig, profile_seed: int) -> list[float]:
    r"""The simulated clock of a wait-for-all run whose every round samples every client: with device profiles
    drawn by :func:`~helpers.systems.draw_profiles` (``profile_seed``) and the bytes each client really received
    and sent (``history``: per-client shares of ``bytes_down`` and ``bytes_up``), round :math:`t` lasts
    :math:`\max_k T_k` and the clock is the running sum (seconds at the end of each round)."""
    if config.fraction != 1.0:
        raise ValueError("wait_clock needs every client in every round (config.fraction = 1)")
    profiles = draw_profiles(len(client_sizes), profile_seed)
    clock, out = 0.0, []
    for row in history.rows:
        if row.clients != len(client_sizes):
            raise ValueError(f"round {row.round} had {row.clients} clients, expected {len(client_sizes)}")
        down, up = row.bytes_down // row.clients, row.bytes_up // row.clients
        clock += max(p.round_s(down, samples_seen(n, config), up) for p, n in zip(profiles, client_sizes))
        out.append(clock)
    return out


def drift_task(*, seed: int, train: TensorDataset, val: TensorDataset, test: TensorDataset,
               partition: Sequence[torch.Tensor], config: FedConfig, method: str = "fedavg", mu: float = 0.0,
               uplink: str = "float32", variates: str = "float32") -> dict:
    """One run of the section's drift experiment (the book's MLP): ``method`` ``"fedavg"``, ``"fedprox"`` (with
    ``mu``) or ``"scaffold"`` (control variates through ``variates``), the update through ``uplink``
    (``"float32"`` or ``"q4"``, 4-bit :class:`~helpers.codecs.QuantizedCodec`). Returns the final ``val_acc`` and
    ``test_acc``, the per-round test accuracies ``acc``, bytes per client per round ``up``/``down`` and the
    wait-for-all simulated ``clock`` (profiles drawn with ``seed``)."""
    codecs = {"float32": Float32Codec, "q4": lambda: QuantizedCodec(4)}
    if uplink not in codecs or variates not in codecs:
        raise ValueError(f"uplink and variates must be one of {sorted(codecs)}, got {uplink!r}, {variates!r}")
    if method not in ("fedavg", "fedprox", "scaffold"):
        raise ValueError(f"method must be 'fedavg', 'fedprox' or 'scaffold', got {method!r}")
    cfg = dataclasses.replace(config, seed=seed)
    if method == "scaffold":
        run = run_scaffold(_mlp(seed), train, partition, test, cfg, uplink=codecs[uplink](),
                           variate_codec=codecs[variates]())
    else:
        strategy = FedProx(mu, cfg) if method == "fedprox" else None
        run = run_federated(_mlp(seed), train, partition, test, cfg, uplink=codecs[uplink](), strategy=strategy)
    rows = run.history.rows
    return {"val_acc": evaluate(run.model, val)[1], "test_acc": run.history.final_accuracy,
            "acc": run.history.column("test_acc"), "up": rows[0].bytes_up // rows[0].clients,
            "down": rows[0].bytes_down // rows[0].clients,
            "clock": wait_clock(run.history, [len(p) for p in partition], cfg, seed)}


def local_only_task(*, seed: int, train: TensorDataset, partition: Sequence[torch.Tensor], participants: int,
                    checkpoints: Sequence[int], lr: float, local_eval: float = 0.3) -> dict:
    """The local-only baseline of :func:`generalization_task`'s held-out clients: the same per-client splits
    (``seed``), each client trains a fresh MLP on its own part only and is evaluated on its evaluation part
    after each of ``checkpoints`` SGD steps. Returns ``curves`` (one per held-out client, in order)."""
    splits = [split_indices(p, local_eval, seed * 7919 + k) for k, p in enumerate(partition)]
    curves = [fine_tune_curve(_mlp(seed * 7919 + k), train, splits[k][0], splits[k][1], checkpoints, lr=lr,
                              seed=seed * 7919 + k) for k in range(participants, len(partition))]
    return {"curves": curves}


def attack_task(*, seed: int, train: TensorDataset, test: TensorDataset, partition: Sequence[torch.Tensor],
                config: FedConfig, rule: str, attack: str = "none", fraction: float = 0.0, scale: float = 10.0,
                codec: str = "float32") -> dict:
    r"""One run of the attack grid: the book's MLP, server ``rule`` (a :func:`~helpers.attacks.robust_strategy`
    rule), ``attack`` (``"none"``, ``"signflip"``: send :math:`-\text{scale}\,\Delta_k`; ``"noise"``: send
    Gaussian noise of ``scale`` times :math:`\lVert\Delta_k\rVert`) by ``fraction`` of the clients, uplink
    ``codec`` (``"float32"`` or ``"q4"``). Returns the final test ``acc``, the ``attackers`` and the number of
    payloads the server ``rejected``."""
    if codec not in ("float32", "q4"):
        raise ValueError(f"codec must be 'float32' or 'q4', got {codec!r}")
    kinds = {"signflip": SignFlip, "noise": GaussianNoise}
    if attack != "none" and attack not in kinds:
        raise ValueError(f"attack must be 'none', 'signflip' or 'noise', got {attack!r}")
    make = Float32Codec if codec == "float32" else (lambda: QuantizedCodec(4))
    attackers = choose_attackers(len(partition), fraction, seed) if attack != "none" else []
    transmit = kinds[attack](attackers, make(), scale, seed) if attackers else None
    run = run_federated(_mlp(seed), train, partition, test, dataclasses.replace(config, seed=seed), uplink=make(),
                        strategy=robust_strategy(rule), transmit=transmit)
    return {"acc": run.history.final_accuracy, "attackers": attackers, "rejected": len(run.server.rejected)}


def alie_task(*, seed: int, train: TensorDataset, test: TensorDataset, partition: Sequence[torch.Tensor],
              config: FedConfig, rule: str, fraction: float = 0.0, z: float | None = None) -> dict:
    """One run of the ALIE grid: the book's MLP, server ``rule`` (``"normbound"``: FedAvg with the default
    norm bound; or a :func:`~helpers.attacks.robust_strategy` rule), ``fraction`` of the clients colluding
    with :class:`~helpers.attacks.ALIE` (step ``z``, the paper's when None). Returns the final test ``acc``,
    the ``attackers``, the norm-bound hits ``bounded`` and the ``z`` used."""
    strategy = FedAvg() if rule == "normbound" else robust_strategy(rule)
    cfg = dataclasses.replace(config, seed=seed)
    attackers = choose_attackers(len(partition), fraction, seed) if fraction > 0 else []
    uplink = Float32Codec()
    if attackers:
        strategy = ALIE(strategy, attackers, uplink, z=z)
    run = run_federated(_mlp(seed), train, partition, test, cfg, uplink=uplink, strategy=strategy)
    return {"acc": run.history.final_accuracy, "attackers": attackers, "bounded": sum(run.history.column("bounded")),
            "z": getattr(strategy, "z_used", []), "rejected": len(run.server.rejected)}
