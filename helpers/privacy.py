r"""What a client's update reveals about its data, and how to hide it.

Two halves, one job (privacy of the uploads):

* **Gradient inversion** (Zhu et al. 2019, "Deep Leakage from Gradients"; Geiping et al. 2020, "Inverting
  Gradients"). A client's update after one local SGD step is :math:`\Delta = -\eta\, \nabla_\theta
  \ell(f_\theta(x), y)`. The attacker, who knows the global model :math:`\theta`, searches for a dummy input
  :math:`x'` whose gradient points the same way:

  .. math::  x^\star = \arg\min_{x'}\; 1 - \cos\big(\nabla_\theta \ell(f_\theta(x'), y),\, -\Delta\big)
             + \lambda_{TV}\, \mathrm{TV}(x'),

  by Adam on :math:`x'` (:func:`invert_gradients`). Cosine matching ignores the step size, so the same attack
  reads a decoded (quantized, sparsified) update as it is. For one image the label is read off the last layer
  (the iDLG trick, Zhao et al. 2020: the true class is the only one whose output gradient is negative).
  Reconstructions are scored with the library metrics PSNR and SSIM (:func:`psnr`, :func:`ssim`,
  ``torchmetrics``).
* **Client-level differential privacy** (DP-FedAvg, McMahan et al. 2018). Every client is sampled with
  probability :math:`q`; the server clips each update to norm :math:`C` (:func:`clip_update`), sums them, adds
  Gaussian noise of standard deviation :math:`\sigma C` per coordinate and divides by the expected number of
  clients :math:`qK`:

  .. math::  \tilde\Delta_t = \frac{1}{qK}\Big(\sum_{k \in S_t} \Delta_k \min\big(1, C / \lVert\Delta_k\rVert\big)
             + \mathcal N(0, \sigma^2 C^2 I)\Big)

  (:class:`DPFedAvg`). Adding or removing one client moves the sum by at most :math:`C`, so each round is a
  subsampled Gaussian mechanism; :func:`dp_epsilon` composes the rounds with Opacus's RDP accountant
  (Mironov 2017) and reports :math:`(\varepsilon, \delta)`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .aggregation import FedAvg, check_updates

__all__ = ["update_norm", "clip_update", "gaussian_noise_like", "dp_epsilon", "DPFedAvg", "infer_label",
           "gradient_match_loss", "total_variation", "invert_gradients", "psnr", "ssim", "match_reconstructions"]

Update = Mapping[str, torch.Tensor]


def _positive(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < math.inf:
        raise ValueError(f"{name} must be a finite positive number, got {x!r}")
    return float(x)


# --------------------------------------------------------------------------- differential privacy


def update_norm(update: Update) -> float:
    r"""The L2 norm of an update over all its tensors, :math:`\lVert\Delta\rVert = \sqrt{\sum_i \Delta_i^2}`."""
    if not isinstance(update, Mapping) or not update:
        raise TypeError("update must be a non-empty dict of tensors")
    return float(torch.sqrt(sum((t.to(torch.float64) ** 2).sum() for t in update.values())))


def clip_update(update: Update, clip: float) -> dict[str, torch.Tensor]:
    r"""``update`` scaled by :math:`\min(1, C/\lVert\Delta\rVert)`: the same direction, norm at most ``clip``."""
    c = _positive(clip, "clip")
    norm = update_norm(update)
    scale = min(1.0, c / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}


def gaussian_noise_like(tensors: Update, std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Independent :math:`\\mathcal N(0, \\mathrm{std}^2)` noise of the shapes and dtypes of ``tensors``."""
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.dtype) * std
            for k, v in tensors.items()}


def dp_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float = 1e-5) -> float:
    r""":math:`\varepsilon` of ``rounds`` compositions of the subsampled Gaussian mechanism (noise
    :math:`\sigma` = ``noise_multiplier`` times the sensitivity, each client sampled with probability
    ``sample_rate``) at :math:`\delta` = ``delta``, from Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    sigma = _positive(noise_multiplier, "noise_multiplier")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if isinstance(delta, bool) or not isinstance(delta, float) or not 0 < delta < 1:
        raise ValueError(f"delta must be a float in (0, 1), got {delta!r}")
    accountant = RDPAccountant()
    accountant.history = [(sigma, float(sample_rate), int(rounds))]
    return float(accountant.get_epsilon(delta))


class DPFedAvg(FedAvg):
    r"""Client-level DP-FedAvg (McMahan et al. 2018) as a :class:`~helpers.aggregation.FedAvg` strategy.

    Sampling is Poisson: each client takes part with probability ``fraction`` (the run's ``config.fraction``,
    the accountant's sample rate). The aggregate is the module docstring's :math:`\tilde\Delta_t`: clip every
    decoded update to ``clip``, sum (sample counts are ignored: a client's weight must not depend on its data),
    add :math:`\mathcal N(0, (\sigma C)^2)` per coordinate and divide by the expected number of clients.
    ``last_bounded`` counts the updates the clip shrank. ``seed`` seeds the noise."""

    def __init__(self, clip: float, noise_multiplier: float, seed: int = 0) -> None:
        super().__init__(norm_bound=None)
        self.clip = _positive(clip, "clip")
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) \
                or not 0 <= noise_multiplier < math.inf:
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.expected_clients: float | None = None

    def sample_clients(self, num_clients: int, fraction: float, rng: np.random.Generator) -> list[int]:
        """Each client independently with probability ``fraction`` (may be none)."""
        self.expected_clients = fraction * num_clients
        return np.flatnonzero(rng.random(num_clients) < fraction).tolist()

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        check_updates(updates, weights)
        if self.expected_clients is None:
            raise RuntimeError("DPFedAvg.aggregate needs sample_clients to run first (the expected count)")
        self.last_bounded = sum(update_norm(u) > self.clip for u in updates)
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in updates[0].items()}
        for u in updates:
            for k, v in clip_update(u, self.clip).items():
                total[k] += v.to(torch.float32)
        noise = gaussian_noise_like(total, self.noise_multiplier * self.clip, self.generator)
        return {k: (total[k] + noise[k]) / self.expected_clients for k in total}

    def __repr__(self) -> str:
        return f"DPFedAvg(clip={self.clip:g}, noise_multiplier={self.noise_multiplier:g})"


# --------------------------------------------------------------------------- gradient inversion


def infer_label(model: nn.Module, update: Update) -> int:
    r"""The iDLG label of a one-image update: the class whose row of the last linear layer grew most.

    With cross-entropy, :math:`\partial\ell/\partial b_c = p_c - y_c` is negative only for the true class, and
    the last weight row is that times the (non-negative, after ReLU) hidden activations; the update points
    along minus the gradient, so the true class has the largest sum of its row and bias."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    names = {id(p): n for n, p in model.named_parameters()}
    w = update[names[id(last.weight)]].to(torch.float32).sum(dim=1)
    if last.bias is not None:
        w = w + update[names[id(last.bias)]].to(torch.float32)
    return int(w.argmax())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of a batch of images (N, C, H, W): mean absolute neighbour difference."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def gradient_match_loss(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor],
                        masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    r""":math:`1 - \cos(g, t)` over all tensors concatenated, on the coordinates in ``masks`` when given."""
    dot = grads[0].new_zeros(())
    gg = grads[0].new_zeros(())
    tt = grads[0].new_zeros(())
    for i, (g, t) in enumerate(zip(grads, target)):
        if masks is not None:
            g, t = g[masks[i]], t[masks[i]]
        dot = dot + (g * t).sum()
        gg = gg + (g * g).sum()
        tt = tt + (t * t).sum()
    return 1 - dot / (gg.sqrt() * tt.sqrt() + 1e-12)


def invert_gradients(model: nn.Module, update: Update, *, num_images: int = 1, labels: torch.Tensor | None = None,
                     input_shape: tuple[int, ...] = (1, 28, 28), steps: int = 300, lr: float = 0.1,
                     tv: float = 1e-2, bounds: tuple[float, float] | None = None, support_only: bool = False,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Reconstruct the ``num_images`` inputs behind ``update`` (= local - global) by cosine gradient matching
    (module docstring) at ``model``'s current weights. Returns (images ``(num_images, *input_shape)``, labels).

    ``labels``: known labels (Geiping et al.'s setting); ``None`` with one image infers it (:func:`infer_label`).
    ``tv``: weight of the total-variation prior. ``bounds``: the valid input range (clamped after each step).
    ``support_only``: match only the coordinates the update carries (nonzero), the right attack on a sparse
    upload whose positions the server reads from the payload. Adam with learning rate ``lr`` for ``steps``
    steps from a seeded Gaussian start, with the step size halved at 3/8, 5/8 and 7/8 of the way."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an int >= 1, got {num_images!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    _positive(lr, "lr")
    if isinstance(tv, bool) or not isinstance(tv, (int, float)) or not 0 <= tv < math.inf:
        raise ValueError(f"tv must be a finite number >= 0, got {tv!r}")
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in update]
    if missing:
        raise ValueError(f"update lacks the model's parameters {missing[:5]}")
    if labels is None:
        if num_images != 1:
            raise ValueError("labels=None infers the label of one image only; pass labels for num_images > 1")
        labels = torch.tensor([infer_label(model, update)])
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (num_images,):
        raise ValueError(f"labels must have shape ({num_images},), got {tuple(labels.shape)}")
    target = [-update[n].detach().to(torch.float32) for n in names]
    masks = [t != 0 for t in target] if support_only else None
    if all(not bool(t.any()) for t in target):
        raise ValueError("update is all zeros: nothing to invert")
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn((num_images, *input_shape), generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3 * steps // 8, 5 * steps // 8, 7 * steps // 8],
                                                 gamma=0.5)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            loss = F.cross_entropy(model(x), labels)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            objective = gradient_match_loss(grads, target, masks)
            if tv > 0:
                objective = objective + tv * total_variation(x)
            opt.zero_grad(set_to_none=True)
            (gx,) = torch.autograd.grad(objective, [x])
            x.grad = gx
            opt.step()
            sched.step()
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(*bounds)
    finally:
        model.train(was_training)
    return x.detach(), labels


def _check_images(pred: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred and target must be tensors")
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must be (N, C, H, W) of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    r"""Peak signal-to-noise ratio of each image, :math:`10 \log_{10}(R^2 / \mathrm{MSE})` dB
    (``torchmetrics.functional.image.peak_signal_noise_ratio``), for images in ``[0, data_range]``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_images(pred, target)
    return torch.stack([peak_signal_noise_ratio(p[None], t[None], data_range=data_range)
                        for p, t in zip(pred, target)])


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity of each image (``torchmetrics.functional.image.structural_similarity_index_measure``,
    Gaussian window 11, σ 1.5): 1 for identical images, about 0 for unrelated ones."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_images(pred, target)
    return structural_similarity_index_measure(pred, target, data_range=data_range, reduction="none")


def match_reconstructions(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``pred`` reordered so that image i is the reconstruction closest (mean squared error, Hungarian
    assignment) to ``target[i]``: a batch is recovered in no particular order."""
    _check_images(pred, target)
    cost = ((pred[None] - target[:, None]) ** 2).flatten(2).mean(2)
    rows, cols = linear_sum_assignment(cost.numpy())
    return pred[torch.as_tensor(cols[np.argsort(rows)])]
