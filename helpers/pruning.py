r"""Magnitude pruning: masks, a threshold chosen on validation data, and pruning during FedAvg.

Magnitude pruning keeps a weight only if it is large,

.. math::  w \leftarrow w \cdot \mathbb{1}[\,|w| > \tau\,],

and the *sparsity* is the fraction of weights set to zero. A mask (``True`` = kept) is a plain
dict ``{state-dict name: BoolTensor}``. Which weights to prune at a target sparsity ``s`` is
decided by PyTorch's own rule, :class:`torch.nn.utils.prune.L1Unstructured` (the
``round(s * n)`` smallest magnitudes), but the masks are applied *in place* instead of through
``torch.nn.utils.prune``'s re-parametrization, which would rename ``weight`` to
``weight_orig`` + ``weight_mask`` in the ``state_dict`` and make FedAvg average (and send) the
masks as if they were weights.

Only the weights of ``nn.Linear`` and ``nn.Conv*`` layers are pruned; biases are few and stay dense.

Chapter 3's experiments (one seed of one federated run in the book's setting) live in
:mod:`helpers.chapters.ch3`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import prune

from .aggregation import FedAvg
from .data import TensorDataset
from .federated import Server
from .models import SmallCNN
from .training import evaluate

__all__ = [
    "Masks",
    "prunable_weights",
    "check_sparsity",
    "magnitude_masks",
    "threshold_for_sparsity",
    "masks_from_threshold",
    "apply_masks",
    "sparsity",
    "sparsity_report",
    "ThresholdChoice",
    "choose_threshold",
    "cubic_sparsity",
    "FederatedPruner",
    "shrink_small_cnn",
]

Masks = dict[str, torch.Tensor]
_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict name: weight}`` of every Linear/Conv layer (the tensors pruning acts on)."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _PRUNABLE):
            out[f"{mod_name}.weight" if mod_name else "weight"] = mod.weight
    if not out:
        raise ValueError("the model has no Linear or Conv layers to prune")
    return out


def check_sparsity(s: float) -> float:
    """Return ``s`` as a float, or raise ``ValueError`` unless ``0 <= s < 1``."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {s!r}")
    return float(s)


def _tensors(model_or_tensors: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_tensors, nn.Module):
        return prunable_weights(model_or_tensors)
    return dict(model_or_tensors)


@torch.no_grad()
def magnitude_masks(model_or_tensors: nn.Module | Mapping[str, torch.Tensor], sparsity: float,
                    scope: str = "global") -> Masks:
    """Masks that zero exactly ``round(sparsity * n)`` smallest-magnitude weights.

    ``scope="global"``: one ranking over all prunable weights together (layers end up with
    different sparsities); ``scope="layer"``: each tensor pruned to ``sparsity`` on its own.
    The selection is :meth:`torch.nn.utils.prune.L1Unstructured.compute_mask`.
    """
    s = check_sparsity(sparsity)
    tensors = _tensors(model_or_tensors)
    if scope == "layer":
        return {k: prune.L1Unstructured(s).compute_mask(t.detach(), torch.ones_like(t)).bool()
                for k, t in tensors.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([t.detach().reshape(-1) for t in tensors.values()])
    mask = prune.L1Unstructured(s).compute_mask(flat, torch.ones_like(flat)).bool()
    out, start = {}, 0
    for k, t in tensors.items():
        out[k] = mask[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


@torch.no_grad()
def threshold_for_sparsity(model_or_tensors: nn.Module | Mapping[str, torch.Tensor], sparsity: float) -> float:
    r"""The global :math:`\tau` with ``round(sparsity * n)`` magnitudes :math:`\le \tau`: the
    largest pruned magnitude (0.0 at sparsity 0). ``|w| > τ`` then keeps the rest (barring ties)."""
    s = check_sparsity(sparsity)
    flat = torch.cat([t.detach().abs().reshape(-1) for t in _tensors(model_or_tensors).values()])
    k = int(round(s * flat.numel()))
    return 0.0 if k == 0 else float(torch.kthvalue(flat, k).values)


@torch.no_grad()
def masks_from_threshold(model_or_tensors: nn.Module | Mapping[str, torch.Tensor], tau: float) -> Masks:
    r"""Masks :math:`\mathbb{1}[|w| > \tau]` for a threshold :math:`\tau \ge 0`."""
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"threshold tau must be finite and ≥ 0, got {tau!r}")
    return {k: t.detach().abs() > tau for k, t in _tensors(model_or_tensors).items()}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place (``w *= mask``); the state_dict keys do not change."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for {name!r} but the model has no such parameter")
        if mask.shape != params[name].shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(params[name].shape)}")
        params[name].mul_(mask.to(params[name].dtype))
    return model


def sparsity(model_or_masks: nn.Module | Mapping[str, torch.Tensor]) -> float:
    """Fraction of zeros among the prunable weights of a model (or of ``False`` in masks)."""
    tensors = _tensors(model_or_masks)
    n = sum(t.numel() for t in tensors.values())
    zeros = sum(int((t == 0).sum()) for t in tensors.values())
    return zeros / n


def sparsity_report(model: nn.Module) -> list[dict]:
    """One row per prunable tensor: name, parameters, zeros, sparsity (and a ``total`` row)."""
    rows = []
    for k, t in prunable_weights(model).items():
        z = int((t == 0).sum())
        rows.append({"tensor": k, "params": t.numel(), "zeros": z, "sparsity": z / t.numel()})
    n, z = sum(r["params"] for r in rows), sum(r["zeros"] for r in rows)
    rows.append({"tensor": "total", "params": n, "zeros": z, "sparsity": z / n})
    return rows


@dataclass
class ThresholdChoice:
    """The outcome of :func:`choose_threshold`: the chosen τ and the whole sweep behind it."""

    tau: float
    sparsity: float
    val_acc: float
    dense_val_acc: float
    tolerance: float
    sweep: list[dict] = field(default_factory=list)   # rows: sparsity, tau, val_acc


@torch.no_grad()
def choose_threshold(model: nn.Module, val: TensorDataset, sparsities: Iterable[float],
                     tolerance: float = 0.01) -> ThresholdChoice:
    r"""Sweep one-shot global magnitude pruning on a *validation* split and pick :math:`\tau`.

    For every candidate sparsity s, :math:`\tau_s` is the global threshold that prunes a fraction
    s of the weights and the pruned copy is scored on ``val``. The choice is the largest s whose
    validation accuracy is at least ``dense - tolerance``; its :math:`\tau_s` is returned.
    ``model`` is not modified. Never pass the test set here: the choice would be fitted to it.
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    grid = sorted({check_sparsity(s) for s in sparsities})
    if not grid:
        raise ValueError("give at least one candidate sparsity")
    import copy

    dense_acc = evaluate(model, val)[1]
    work = copy.deepcopy(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    sweep, best = [], (0.0, 0.0, dense_acc)
    for s in grid:
        tau = threshold_for_sparsity(model, s)
        work.load_state_dict(dense_state)
        apply_masks(work, masks_from_threshold(work, tau) if s > 0 else {})
        acc = evaluate(work, val)[1]
        sweep.append({"sparsity": s, "tau": tau, "val_acc": acc, "achieved": sparsity(work)})
        if acc >= dense_acc - tolerance and s >= best[0]:
            best = (s, tau, acc)
    return ThresholdChoice(tau=best[1], sparsity=best[0], val_acc=best[2], dense_val_acc=dense_acc,
                           tolerance=tolerance, sweep=sweep)


def cubic_sparsity(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    r"""Zhu & Gupta's gradual schedule: 0 before ``begin``, then

    .. math::  s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_{end} - t_0}\right)^3
               \quad (t_0 \le t \le t_{end}),

    and :math:`s_f` after ``end``: prune fast while the network is redundant, slowly near the end.
    """
    check_sparsity(final)
    check_sparsity(initial)
    if end < begin:
        raise ValueError(f"end ({end}) must be ≥ begin ({begin})")
    if step < begin:
        return 0.0
    if step >= end:
        return float(final)
    frac = (step - begin) / (end - begin)
    return float(final + (initial - final) * (1 - frac) ** 3)


class FederatedPruner(FedAvg):
    """FedAvg with server-side gradual magnitude pruning: a strategy for
    :func:`helpers.federated.run_federated` (``strategy=FederatedPruner(...)``).

    * :meth:`before_round`: prune ``server.model`` (global magnitude ranking) to the schedule's
      sparsity and keep the masks. Pruned weights are 0, so they rank lowest and stay pruned as the
      sparsity grows: the masks only tighten.
    * :meth:`after_local_step`: a client re-applies the masks after every SGD step, so its masked
      weights stay 0 and its update for them is exactly 0; FedAvg of zeros is zero, so the global
      model keeps the mask through aggregation too. The clients learn the mask from the broadcast
      model itself (its zeros), so no extra bytes are needed for it.

    Sampling and aggregation are FedAvg's (keyword arguments ``aggregator``/``norm_bound`` pass through).
    """

    def __init__(self, final_sparsity: float, begin: int, end: int, initial: float = 0.0,
                 scope: str = "global", **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        check_sparsity(final_sparsity)
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        self.final_sparsity, self.begin, self.end, self.initial, self.scope = final_sparsity, begin, end, initial, scope
        self.masks: Masks = {}
        self.log: list[dict] = []   # round, target sparsity, achieved sparsity

    def target(self, round_idx: int) -> float:
        return cubic_sparsity(round_idx, self.final_sparsity, self.begin, self.end, self.initial)

    def before_round(self, round_idx: int, server: Server) -> None:
        """Prune the global model to this round's target sparsity."""
        s = self.target(round_idx)
        if s > 0:
            self.masks = magnitude_masks(server.model, s, self.scope)
            apply_masks(server.model, self.masks)
        self.log.append({"round": round_idx, "target": s, "sparsity": sparsity(server.model)})

    def after_local_step(self, model: nn.Module) -> None:
        """Re-apply the current masks after a client SGD step."""
        if self.masks:
            apply_masks(model, self.masks)


def _layers_in_order(model: nn.Module) -> tuple[list[nn.Conv2d], list[nn.Linear]]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs, linears


@torch.no_grad()
def shrink_small_cnn(model: nn.Module, keep: float) -> nn.Module:
    """Structured (channel) pruning of a :class:`helpers.models.SmallCNN`: keep the ``keep``
    fraction of conv channels and hidden units with the largest L1 norms, and return a *smaller
    dense* SmallCNN holding those slices (no fine-tuning). The layers are found by type, in order
    (two convolutions, then two linear layers), not by their position in the model."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    convs, linears = _layers_in_order(model)
    if len(convs) != 2 or len(linears) != 2:
        raise ValueError(f"shrink_small_cnn expects a SmallCNN (2 conv + 2 linear layers), got "
                         f"{len(convs)} conv and {len(linears)} linear layers")
    (conv1, conv2), (fc1, fc2) = convs, linears

    def top(weight: torch.Tensor) -> torch.Tensor:
        n = max(1, int(round(keep * weight.shape[0])))
        return torch.sort(weight.abs().reshape(weight.shape[0], -1).sum(1).topk(n).indices).values

    k1, k2, kh = top(conv1.weight), top(conv2.weight), top(fc1.weight)
    spatial = fc1.in_features // conv2.out_channels   # 7 x 7 positions per channel after pooling
    small = SmallCNN(num_classes=fc2.out_features, channels=(len(k1), len(k2)), hidden=len(kh),
                     input_shape=(conv1.in_channels, 28, 28))
    (c1, c2), (f1, f2) = _layers_in_order(small)
    c1.weight.copy_(conv1.weight[k1]); c1.bias.copy_(conv1.bias[k1])
    c2.weight.copy_(conv2.weight[k2][:, k1]); c2.bias.copy_(conv2.bias[k2])
    cols = (k2[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
    f1.weight.copy_(fc1.weight[kh][:, cols]); f1.bias.copy_(fc1.bias[kh])
    f2.weight.copy_(fc2.weight[:, kh]); f2.bias.copy_(fc2.bias)
    return small


# ---- structured (channel) pruning during FedAvg (Chapter 5) -----------------------------------------------

@torch.no_grad()
def channel_masks_small_cnn(model: nn.Module, keep: float) -> Masks:
    r"""Structured masks for a :class:`~helpers.models.SmallCNN`: in each of its first conv, second conv
    and hidden linear layer keep the :math:`n = \max(1, \mathrm{round}(\text{keep}\cdot C))` output units
    (channels, hidden units) with the largest L1 norm :math:`\lVert W_{c,:}\rVert_1`, and mask the others'
    whole weight rows **and** bias entries. A masked unit then outputs :math:`\mathrm{ReLU}(0) = 0`, so
    removing it (:func:`shrink_small_cnn`, which keeps the same :math:`n` largest rows) does not change
    the model's function. The output layer is never pruned. Masks are keyed by state-dict name."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    convs, linears = _layers_in_order(model)
    if len(convs) != 2 or len(linears) != 2:
        raise ValueError(f"channel_masks_small_cnn expects a SmallCNN (2 conv + 2 linear layers), got "
                         f"{len(convs)} conv and {len(linears)} linear layers")
    names = {id(m): n for n, m in model.named_modules()}
    masks: Masks = {}
    for layer in (convs[0], convs[1], linears[0]):
        c = layer.weight.shape[0]
        kept = layer.weight.abs().reshape(c, -1).sum(1).topk(max(1, int(round(keep * c)))).indices
        rows = torch.zeros(c, dtype=torch.bool)
        rows[kept] = True
        name = names[id(layer)]
        masks[f"{name}.weight"] = rows.reshape(-1, *[1] * (layer.weight.dim() - 1)).expand_as(layer.weight).clone()
        if layer.bias is not None:
            masks[f"{name}.bias"] = rows
    return masks


class FederatedChannelPruner(FedAvg):
    r"""FedAvg with server-side gradual **structured** pruning of a SmallCNN (a strategy for
    :func:`helpers.federated.run_federated`). The fraction of units kept follows Zhu & Gupta's cubic
    schedule applied to the pruned fraction, :math:`\text{keep}_t = 1 - s_t` with
    :math:`s_t` = :func:`cubic_sparsity` (:math:`t`, :math:`1 - \text{final\_keep}`, ``begin``, ``end``).

    * :meth:`before_round`: mask the global model's weakest channels and hidden units
      (:func:`channel_masks_small_cnn`); masked units have zero weights, so they rank lowest and stay
      masked as the schedule tightens;
    * :meth:`after_local_step`: a client re-applies the masks after every SGD step, so the masked rows
      of its update are exactly zero (a sparse uplink codec then does not send them).

    After the last round, :func:`shrink_small_cnn` (``keep = final_keep``) cuts the masked units out and
    returns a smaller dense SmallCNN with the same predictions: fewer multiply-adds, not just zeros.
    """

    def __init__(self, final_keep: float, begin: int, end: int, **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        if isinstance(final_keep, bool) or not isinstance(final_keep, (int, float)) or not 0 < final_keep <= 1:
            raise ValueError(f"final_keep must be in (0, 1], got {final_keep!r}")
        cubic_sparsity(begin, 1.0 - final_keep, begin, end)     # checks begin <= end
        self.final_keep, self.begin, self.end = float(final_keep), begin, end
        self.masks: Masks = {}
        self.log: list[dict] = []   # round, keep fraction

    def target_keep(self, round_idx: int) -> float:
        """The fraction of units kept in round ``round_idx``."""
        return 1.0 - cubic_sparsity(round_idx, 1.0 - self.final_keep, self.begin, self.end)

    def before_round(self, round_idx: int, server: Server) -> None:
        """Mask the global model to this round's keep fraction."""
        keep = self.target_keep(round_idx)
        if keep < 1:
            self.masks = channel_masks_small_cnn(server.model, keep)
            apply_masks(server.model, self.masks)
        self.log.append({"round": round_idx, "keep": keep})

    def after_local_step(self, model: nn.Module) -> None:
        """Re-apply the current masks after a client SGD step."""
        if self.masks:
            apply_masks(model, self.masks)


__all__ += ["channel_masks_small_cnn", "FederatedChannelPruner"]
