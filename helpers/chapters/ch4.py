r"""Chapter 4's runs: FedAvg of a student (with or without a teacher's logits) and logit exchange on a
public set, one seed each, as tasks for :func:`helpers.parallel.run_parallel`
(one seed = partition + initialisation + sampling)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from ..codecs import Codec
from ..data import TensorDataset
from ..distillation import FedDF, KDLoss, run_logit_exchange
from ..experiment import book_partition
from ..federated import FedConfig, run_federated
from ..models import build_model
from ..reproducibility import seed_everything
from ..training import evaluate

__all__ = ["KD_TEMPERATURE", "KD_ALPHA", "federated_task", "logit_exchange_task", "chapter_task"]

#: The distillation setting Chapter 4 trains its student with: chosen on the validation images in the section
#: ``04_distillation_temperature`` (``choose_setting`` over T in {1, 2, 4} at alpha = 0.5 and T = 8 at alpha = 0.1,
#: 6 seeds), which asserts that this is its choice (or, on a CPU where the choice moves, not worse than it).
KD_TEMPERATURE = 2.0
KD_ALPHA = 0.5


def federated_task(*, seed: int, arch: str, train: TensorDataset, pool: torch.Tensor, test: TensorDataset,
                   val_idx: torch.Tensor, config: FedConfig, partition: str = "dirichlet",
                   teacher_logits: torch.Tensor | None = None, alpha: float = 0.5, temperature: float = 1.0,
                   label_smoothing: float = 0.0, uplink: Codec | None = None, public: torch.Tensor | None = None,
                   feddf: dict | None = None, label: str = "") -> dict:
    r"""One seed of FedAvg on a fresh ``arch`` (:func:`helpers.models.build_model`), for
    :func:`helpers.parallel.run_parallel`.

    The seed fixes the partition of ``pool`` (``book_partition(..., seed=seed)``), the initialisation
    (``seed_everything(seed)`` before the model is built) and the sampling/shuffling (``config.seed``).
    With ``teacher_logits`` (indexed like ``train``) the clients' local loss is :class:`KDLoss`
    (``alpha``, ``temperature``); without, cross-entropy, with ``label_smoothing`` :math:`\varepsilon` if given
    (the target :math:`(1-\varepsilon)\,\text{one-hot} + \varepsilon/K`: KD's control with a uniform "teacher").
    ``uplink`` is the clients' upload codec (float32 by default). With ``feddf`` (keyword arguments of
    :class:`helpers.distillation.FedDF`: ``epochs``, ``lr``, ...) the server distills each round's average toward
    the clients' ensemble on the images ``train.x[public]`` (``public``: training indices outside ``pool`` and
    outside ``val_idx``; their labels are never read). Returns the final global ``model``, its
    ``history`` (test accuracy per round), and its accuracy on the validation images ``train[val_idx]``
    (for choosing hyper-parameters; indices, so a task pickles in a few bytes) and on ``test`` (for reporting).
    """
    parts = book_partition(train.y, partition, seed=seed, pool=pool)
    seed_everything(seed)
    model = build_model(arch, num_classes=train.num_classes)
    strategy = None
    if feddf is not None:
        if public is None:
            raise ValueError("feddf needs the public set's indices (public)")
        public = torch.as_tensor(public, dtype=torch.long)
        if bool(torch.isin(public, torch.as_tensor(pool, dtype=torch.long)).any()) or bool(
                torch.isin(public, torch.as_tensor(val_idx, dtype=torch.long)).any()):
            raise ValueError("public overlaps the client pool or the validation split")
        strategy = FedDF(train.x[public], seed=seed, **feddf)
    if teacher_logits is not None and label_smoothing:
        raise ValueError("give teacher_logits (KD) or label_smoothing (its control), not both")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if teacher_logits is not None:
        loss_fn = KDLoss(teacher_logits, alpha, temperature)
    elif label_smoothing:
        def loss_fn(outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(outputs, targets, label_smoothing=label_smoothing)
    else:
        loss_fn = None
    run = run_federated(model, train, parts, test, dataclasses.replace(config, seed=seed), loss_fn=loss_fn,
                        uplink=uplink, strategy=strategy, label=label)
    return {"model": run.model, "history": run.history, "val_acc": evaluate(run.model, train.subset(val_idx))[1],
            "test_acc": run.history.final_accuracy}


def logit_exchange_task(*, seed: int, archs: Sequence[str], train: TensorDataset, pool: torch.Tensor,
                        public: torch.Tensor, test: TensorDataset, config: FedConfig, partition: str = "dirichlet",
                        share: bool = True, codec: Codec | None = None, temperature: float = 1.0,
                        distill_epochs: int = 2, label: str = "") -> dict:
    """One seed of :func:`run_logit_exchange` for :func:`helpers.parallel.run_parallel`: client k gets a
    fresh ``archs[k]``, the seed fixes partition, initialisation and shuffling as in :func:`federated_task`;
    ``public`` are training-set indices whose *images only* are used. Returns the run's ``history``, the
    clients' final test accuracies, the mean over clients and the uplink bytes per client per round."""
    public = torch.as_tensor(public, dtype=torch.long)
    if bool(torch.isin(public, torch.as_tensor(pool, dtype=torch.long)).any()):
        raise ValueError("public overlaps the client pool: carve it out of the pool first (public_split)")
    parts = book_partition(train.y, partition, seed=seed, pool=pool)
    if len(archs) != len(parts):
        raise ValueError(f"{len(archs)} architectures for {len(parts)} clients")
    seed_everything(seed)
    models = [build_model(a, num_classes=train.num_classes) for a in archs]
    run = run_logit_exchange(models, train, parts, train.x[public], test,
                             dataclasses.replace(config, seed=seed), codec=codec, share=share,
                             temperature=temperature, distill_epochs=distill_epochs, label=label)
    return {"history": run.history, "client_accuracies": run.client_accuracies,
            "mean_acc": run.history.final_accuracy, "bytes_up_per_client": run.history.bytes_up_per_client}


_TASKS = {"fedavg": federated_task, "logit_exchange": logit_exchange_task}


def chapter_task(job: str, **kwargs) -> dict:
    """``federated_task(**kwargs)`` (``job="fedavg"``) or ``logit_exchange_task(**kwargs)``
    (``job="logit_exchange"``): one function, so a single :func:`helpers.parallel.run_parallel` call can
    mix both kinds of run and keep every core busy."""
    if job not in _TASKS:
        raise ValueError(f"job must be one of {sorted(_TASKS)}, got {job!r}")
    return _TASKS[job](**kwargs)
