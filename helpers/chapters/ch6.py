r"""Chapter 6's experiments, one run each, as tasks for :func:`helpers.parallel.run_parallel`: the non-IID
sweep (FedAvg and FedProx), generalization to unseen clients and stragglers on the simulated clock. (The
attack grid's run is short and defined in the notebook.)"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from ..codecs import Float32Codec, QuantizedCodec, TopKCodec
from ..data import TensorDataset, split_indices
from ..federated import FedConfig, run_federated
from ..heterogeneity import FedProx, fine_tune_curve
from ..models import MLP
from ..reproducibility import seed_everything
from ..systems import DeadlineFedAvg, draw_profiles
from ..training import evaluate

__all__ = ["alpha_task", "generalization_task", "systems_task"]


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
