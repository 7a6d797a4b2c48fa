r"""Knowledge distillation (Hinton et al. 2015) and federated distillation by logit exchange.

The distillation loss mixes the hard labels with a teacher's softened predictions:

.. math::

    \mathcal{L}_{KD} = \alpha\, \mathrm{CE}\big(y, \sigma(z^s)\big)
        + (1-\alpha)\, T^2\, \mathrm{KL}\big(\sigma(z^t/T) \,\|\, \sigma(z^s/T)\big),

where :math:`z^s, z^t` are student and teacher logits and :math:`\sigma` is the softmax. The
:math:`T^2` keeps the soft term's gradient on the same scale for every temperature; at
:math:`T = 1` it is the plain :math:`\alpha\,\mathrm{CE} + (1-\alpha)\,\mathrm{KL}`.

Two federated uses (Chapter 4):

* **teacher -> student**: clients run FedAvg on a small student whose local loss is
  :class:`KDLoss`, looking up a teacher's precomputed logits by dataset index;
* **server-side ensemble distillation** (FedDF, Lin et al. 2020): :class:`FedDF` -- clients send weights
  as in FedAvg; after averaging, the server fine-tunes the averaged model on an unlabeled public set
  toward the average of the client models' logits;
* **logit exchange on a public set** (FedMD, Li & Wang 2019; DS-FL, Itahara et al. 2023):
  :func:`run_logit_exchange` -- clients send their logits on a shared *unlabeled* public set through
  a codec, the server averages them into a consensus, and every client distills from it. Models never
  leave the clients, so they may all differ. (FD, Jeong et al. 2018, is the public-set-free variant:
  each client shares its *per-label average* logits on its own data; it is not implemented here.)

Chapter 4's runs (one seed = partition + initialisation + sampling) live in :mod:`helpers.chapters.ch4`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import DEFAULT_NORM_BOUND, Aggregator, FedAvg, bound_norms, check_updates, fedavg
from .codecs import Codec, Float16Codec, PayloadError
from .data import TensorDataset, split_indices
from .federated import FedConfig, samples_seen
from .history import History, RoundRecord
from .training import client_generator, evaluate, float_state, local_train

if TYPE_CHECKING:
    from .federated import Server

__all__ = [
    "soft_targets",
    "kd_loss",
    "KDLoss",
    "predict_logits",
    "train_student",
    "public_split",
    "distill_on_public",
    "FedDF",
    "LogitExchangeRun",
    "run_logit_exchange",
]


def _check_alpha_t(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")


def soft_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""The softened distribution :math:`\sigma(z/T)`; larger ``T`` spreads probability to other classes."""
    _check_alpha_t(0.0, temperature)
    return F.softmax(logits / temperature, dim=-1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None,
            alpha: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    r"""Mean over the batch of :math:`\alpha\,\mathrm{CE}(y, \sigma(z^s)) + (1-\alpha)\,T^2\,
    \mathrm{KL}(\sigma(z^t/T)\,\|\,\sigma(z^s/T))`.

    ``alpha = 1`` is plain cross-entropy; ``alpha = 0`` uses no labels at all (``targets`` may then
    be ``None``), which is how clients distill on an unlabeled public set.
    """
    _check_alpha_t(alpha, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    loss = student_logits.new_zeros(())
    if alpha > 0:
        if targets is None:
            raise ValueError("alpha > 0 needs hard labels (targets)")
        loss = loss + alpha * F.cross_entropy(student_logits, targets)
    if alpha < 1:
        t = temperature
        log_p_s = F.log_softmax(student_logits / t, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        loss = loss + (1 - alpha) * t * t * kl
    return loss


class KDLoss:
    """A ``loss_fn(outputs, targets, indices)`` for :func:`helpers.federated.run_federated`: looks up the
    teacher's precomputed logits for the batch's dataset indices (no teacher forward pass per batch)."""

    def __init__(self, teacher_logits: torch.Tensor, alpha: float = 0.5, temperature: float = 1.0) -> None:
        _check_alpha_t(alpha, temperature)
        if teacher_logits.dim() != 2:
            raise ValueError(f"teacher_logits must be (N, classes), got shape {tuple(teacher_logits.shape)}")
        self.teacher_logits = teacher_logits.detach()
        self.alpha = alpha
        self.temperature = temperature

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return kd_loss(outputs, self.teacher_logits[indices], targets, self.alpha, self.temperature)

    def __repr__(self) -> str:
        return f"KDLoss(alpha={self.alpha}, temperature={self.temperature})"


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 2500) -> torch.Tensor:
    """``model``'s logits on the images ``x`` (eval mode, no gradients), shape (N, classes)."""
    model.eval()
    return torch.cat([model(x[s:s + batch_size]) for s in range(0, len(x), batch_size)])


def train_student(student: nn.Module, data: TensorDataset, indices: torch.Tensor, teacher_logits: torch.Tensor, *,
                  alpha: float = 0.5, temperature: float = 1.0, epochs: int = 1, batch_size: int = 32,
                  lr: float = 0.02, momentum: float = 0.9, generator: torch.Generator) -> float:
    """SGD on ``data[indices]`` with :class:`KDLoss` (``teacher_logits`` is indexed like ``data``);
    trains ``student`` in place -- exactly a client's local step -- and returns the mean loss."""
    return local_train(student, data, torch.as_tensor(indices, dtype=torch.long), epochs=epochs,
                       batch_size=batch_size, lr=lr, momentum=momentum, generator=generator,
                       loss_fn=KDLoss(teacher_logits, alpha, temperature))


def public_split(indices: torch.Tensor | int, size: int, seed: int | np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(private, public): ``size`` random members of ``indices`` (or of ``range(indices)`` for an int)
    become the shared public set. Carve it *before* the clients are partitioned, so it is disjoint from
    all of them; in the book ``indices`` is ``book.pool``, so it is also disjoint from the validation split."""
    n = int(indices) if isinstance(indices, (int, np.integer)) else len(indices)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 < size < n:
        raise ValueError(f"public size must be an int in (0, {n}), got {size!r}")
    return split_indices(indices, size / n, seed)


def distill_on_public(model: nn.Module, public_x: torch.Tensor, target_logits: torch.Tensor, *, epochs: int,
                      batch_size: int, lr: float, momentum: float = 0.0, temperature: float = 1.0,
                      generator: torch.Generator) -> float:
    """Train ``model`` to match ``target_logits`` on unlabeled ``public_x`` (``alpha = 0``: no labels exist).

    The placeholder labels are -1, so any code path that tried to use them would fail loudly."""
    if len(public_x) != len(target_logits):
        raise ValueError(f"{len(public_x)} public images but {len(target_logits)} target rows")
    unlabeled = TensorDataset(public_x, torch.full((len(public_x),), -1, dtype=torch.long), ())
    return local_train(model, unlabeled, torch.arange(len(public_x)), epochs=epochs, batch_size=batch_size,
                       lr=lr, momentum=momentum, generator=generator,
                       loss_fn=KDLoss(target_logits, alpha=0.0, temperature=temperature))


class FedDF(FedAvg):
    r"""FedDF's round policy (Lin et al. 2020): FedAvg, then **server-side ensemble distillation**.

    After the norm bound and the aggregator have combined the accepted updates :math:`\Delta_k` into
    :math:`\bar\Delta`, the server rebuilds every client model :math:`w + \Delta_k` from the global state
    :math:`w`, computes its logits on the unlabeled public images, averages them weighted by the clients'
    sample counts, :math:`\bar Z = \sum_k \frac{n_k}{n} Z_k(w + \Delta_k)`, and trains the averaged model
    :math:`w + \bar\Delta` toward :math:`\bar Z` (:func:`distill_on_public`, :math:`\alpha = 0`) for ``epochs``
    passes over ``public_x``. The round's update is then the distilled model minus :math:`w`.

    Nothing extra crosses the network: the cost is server compute. ``public_x`` must be images no client
    holds and neither the validation nor the test set (carve it with :func:`public_split`). The server's
    shuffling is seeded by ``seed`` and the round (``client_generator(seed, round, 0, stream=2)``).
    """

    def __init__(self, public_x: torch.Tensor, *, epochs: int = 1, lr: float, batch_size: int = 32,
                 momentum: float = 0.0, temperature: float = 1.0, seed: int = 0,
                 aggregator: Aggregator | None = None, norm_bound: float | None = DEFAULT_NORM_BOUND,
                 norm_action: str = "drop") -> None:
        super().__init__(aggregator, norm_bound, norm_action)
        if not isinstance(public_x, torch.Tensor) or public_x.dim() < 2 or len(public_x) == 0:
            raise ValueError("public_x must be a non-empty tensor of images (N, ...)")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise ValueError(f"lr must be a finite positive number, got {lr!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        _check_alpha_t(0.0, temperature)
        self.public_x = public_x
        self.epochs, self.lr, self.batch_size = epochs, float(lr), batch_size
        self.momentum, self.temperature, self.seed = float(momentum), float(temperature), seed
        self._server: "Server | None" = None
        self._round = 0

    def before_round(self, round_idx: int, server: "Server") -> None:
        """Remember the server (its global model is the starting point of the distillation) and the round."""
        self._server, self._round = server, round_idx

    def ensemble_logits(self, model: nn.Module, state: Mapping[str, torch.Tensor],
                        updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> torch.Tensor:
        r""":math:`\sum_k \frac{w_k}{\sum_j w_j} Z_k`, the weighted mean of the logits of the models
        ``state + updates[k]`` on ``public_x`` (``model`` is a scratch copy; its weights are overwritten)."""
        w = check_updates(updates, weights)
        total = None
        for wk, u in zip(w, updates):
            model.load_state_dict({k: v + u[k].to(v.dtype) for k, v in state.items()}, strict=False)
            z = wk * predict_logits(model, self.public_x)
            total = z if total is None else total + z
        return total

    def aggregate(self, updates: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """FedAvg's aggregate (norm bound, aggregator), then distill the averaged model toward the ensemble
        of the same accepted client models; returns the distilled model minus the global state."""
        if self._server is None:
            raise RuntimeError("FedDF.aggregate needs the server: run it through run_federated (before_round)")
        check_updates(updates, weights)
        ups, ws = list(updates), list(weights)
        self.last_bounded = 0
        if self.norm_bound is not None:
            ups, ws, self.last_bounded = bound_norms(ups, ws, self.norm_bound, self.norm_action)
        if not ups:
            raise ValueError("the norm bound dropped every update")
        avg = self.aggregator(ups, ws)
        state = self._server.state
        scratch = copy.deepcopy(self._server.model)
        target = self.ensemble_logits(scratch, state, ups, ws)
        scratch.load_state_dict({k: v + avg[k].to(v.dtype) for k, v in state.items()}, strict=False)
        distill_on_public(scratch, self.public_x, target, epochs=self.epochs, batch_size=self.batch_size,
                          lr=self.lr, momentum=self.momentum, temperature=self.temperature,
                          generator=client_generator(self.seed, self._round, 0, stream=2))
        distilled = float_state(scratch)
        return {k: distilled[k] - v for k, v in state.items()}

    def __repr__(self) -> str:
        return (f"FedDF(public={len(self.public_x)}, epochs={self.epochs}, lr={self.lr}, momentum={self.momentum}, "
                f"temperature={self.temperature}, aggregator={self.aggregator!r}, norm_bound={self.norm_bound}, "
                f"norm_action={self.norm_action!r})")


@dataclass
class LogitExchangeRun:
    """What :func:`run_logit_exchange` returns: every client's own model, the run's :class:`History`
    (``test_acc`` is the mean over clients) and each client's final test accuracy."""

    models: list[nn.Module]
    history: History
    client_accuracies: list[float]
    consensus: torch.Tensor | None
    rejected: list[tuple[int, int, str]] = field(default_factory=list)   # (round, client id, reason)


def run_logit_exchange(models: Sequence[nn.Module], train: TensorDataset, partition: Sequence[torch.Tensor],
                       public_x: torch.Tensor, test: TensorDataset, config: FedConfig, *,
                       codec: Codec | None = None, share: bool = True, temperature: float = 1.0,
                       distill_epochs: int = 2, distill_lr: float | None = None,
                       label: str = "") -> LogitExchangeRun:
    r"""Federated distillation by logit exchange on a public set (FedMD, Li & Wang 2019; DS-FL, Itahara et al. 2023).

    ``models[k]`` is client k's model (copied; they may all be different architectures). Each round:

    1. every client trains ``config.local_epochs`` on its private data (cross-entropy);
    2. it computes logits on the public images and uploads ``codec.encode({"logits": z_k})``;
    3. the server decodes and checks each upload and averages them, weighted by :math:`n_k`,
       into the consensus :math:`\bar z = \sum_k \frac{n_k}{n} z_k`, then broadcasts it (same codec);
    4. every client distills from :math:`\bar z` on the public set for ``distill_epochs``.

    ``share=False`` skips steps 2-4: each client trains alone on the same schedule (the
    "local only" baseline). The public labels are never passed in: ``public_x`` is images only.
    """
    if len(models) != len(partition):
        raise ValueError(f"{len(models)} models for {len(partition)} clients")
    if len(partition) == 0:
        raise ValueError("partition has no clients")
    codec = codec or Float16Codec()
    clients = [copy.deepcopy(m) for m in models]
    parts = [torch.as_tensor(p, dtype=torch.long) for p in partition]
    if any(len(p) == 0 for p in parts):
        raise ValueError("every client needs at least one sample")
    n = [len(p) for p in parts]
    reference = {"logits": torch.empty(len(public_x), train.num_classes)}   # what the server expects
    history = History(label=label)
    consensus = None
    rejected_log: list[tuple[int, int, str]] = []
    for rnd in range(1, config.rounds + 1):
        t0 = time.perf_counter()
        losses, uploads, weights, up_bytes, down_bytes, rejected = [], [], [], 0, 0, 0
        for cid, (model, idx) in enumerate(zip(clients, parts)):
            losses.append(local_train(model, train, idx, epochs=config.local_epochs, batch_size=config.batch_size,
                                      lr=config.lr_at(rnd), momentum=config.momentum,
                                      weight_decay=config.weight_decay,
                                      generator=client_generator(config.seed, rnd, cid), steps=config.local_steps))
            if share:
                payload = codec.encode({"logits": predict_logits(model, public_x)})
                up_bytes += len(payload)
                try:  # the server's side: untrusted bytes -> checked logits, as Server.receive does
                    uploads.append(codec.decode(payload, reference=reference))
                    weights.append(n[cid])
                except PayloadError as exc:
                    rejected += 1
                    rejected_log.append((rnd, cid, str(exc)))
        if share and uploads:
            down = codec.encode(fedavg(uploads, weights))
            down_bytes = len(down) * len(clients)
            consensus = codec.decode(down)["logits"]   # what every client actually receives
            for cid, model in enumerate(clients):
                distill_on_public(model, public_x, consensus, epochs=distill_epochs, batch_size=config.batch_size,
                                  lr=distill_lr or config.lr_at(rnd), momentum=config.momentum,
                                  temperature=temperature, generator=client_generator(config.seed, rnd, cid, stream=1))
        accs, test_losses = [], []
        for model in clients:
            loss, acc = evaluate(model, test)
            accs.append(acc)
            test_losses.append(loss)
        history.rows.append(RoundRecord(
            round=rnd, test_acc=float(np.mean(accs)), test_loss=float(np.mean(test_losses)),
            train_loss=float(np.mean(losses)), bytes_up=up_bytes, bytes_down=down_bytes, clients=len(clients),
            rejected=rejected, samples=sum(samples_seen(len(p), config) for p in parts), seconds=time.perf_counter() - t0))
    return LogitExchangeRun(clients, history, accs, consensus, rejected_log)


