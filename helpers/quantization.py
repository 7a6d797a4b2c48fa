r"""Uniform symmetric quantization, stochastic rounding, bit packing, and learned step sizes (LSQ).

A :math:`b`-bit symmetric quantizer with step :math:`\Delta > 0` maps a real value to an integer
code and back:

.. math::  q = \mathrm{clip}\big(\mathrm{round}(w/\Delta),\, -Q,\, Q\big), \qquad
           \hat w = Q_\Delta(w) = q\,\Delta, \qquad Q = 2^{b-1} - 1 .

With :math:`\Delta = \max|w| / Q` ("max-abs" scale) nothing is clipped and the deterministic
rounding error is at most :math:`\Delta/2`. Stochastic rounding rounds up with probability equal
to the fractional part, so :math:`\mathbb{E}[\hat w] = w` (unbiased) at the price of variance.
For :math:`b = 1` the codes are :math:`\{-1, +1\}` (a scaled sign).

The learned-step part follows Esser et al. (2020), *Learned Step Size Quantization*: the step
:math:`\Delta` is an ``nn.Parameter``; rounding passes gradients straight through (STE) and the
step's gradient is scaled by :math:`g = 1/\sqrt{N\,Q}`.

Three rules for a fixed step (:data:`STEP_RULES`): max-abs (nothing clipped), MSE-optimal
(:func:`mse_scale`: the :math:`\Delta` minimising :math:`\lVert w - Q_\Delta(w)\rVert^2`, clipping
allowed) and LSQ's initial step (:func:`lsq_init_scale`). Chapter 2's experiments live in
:mod:`helpers.chapters.ch2`.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .aggregation import FedAvg

__all__ = [
    "VALID_BITS",
    "check_bits",
    "qmax",
    "max_abs_scale",
    "mse_scale",
    "lsq_init_scale",
    "STEP_RULES",
    "code_dtype",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_codes",
    "unpack_codes",
    "lsq_codes",
    "round_ste",
    "grad_scale",
    "LSQQuantizer",
    "LSQLinear",
    "LSQConv2d",
    "swap_to_lsq",
    "lsq_layers",
    "IntegerLinear",
    "IntegerConv2d",
    "export_integer",
    "integer_model",
    "ptq_model",
    "lsq_steps",
    "QATFedAvg",
]

VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is one of 1–8 or 16, else raise a ``ValueError`` that says so."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return int(bits)


def qmax(bits: int) -> int:
    r"""Largest code :math:`Q = 2^{b-1}-1` (codes lie in :math:`[-Q, Q]`); 1 for ``bits=1`` (codes ±1)."""
    bits = check_bits(bits)
    return 1 if bits == 1 else 2 ** (bits - 1) - 1


def _channel_view(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``w`` as (channels, rest) for per-output-channel scales, or (1, n) for one scale."""
    if per_channel and w.dim() >= 2:
        return w.reshape(w.shape[0], -1)
    return w.reshape(1, -1)


def max_abs_scale(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    r"""Step :math:`\Delta = \max|w| / Q` per tensor (shape ``(1,)``) or per output channel (``(C,)``).

    Per-channel scales only apply to tensors with ≥ 2 dims (weights); biases get one scale.
    An all-zero tensor or channel gets :math:`\Delta = 0` (all codes 0).
    """
    if not w.is_floating_point():
        raise ValueError(f"can only quantize floating-point tensors, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a tensor with NaN or infinite values")
    v = _channel_view(w.detach().to(torch.float32), per_channel)
    if v.shape[1] == 0:
        return torch.zeros(v.shape[0])
    return v.abs().amax(dim=1) / qmax(bits)


def mse_scale(w: torch.Tensor, bits: int, per_channel: bool = False, num: int = 100) -> torch.Tensor:
    r"""The step minimising the squared error :math:`\lVert w - Q_\Delta(w)\rVert^2` (round to nearest,
    values beyond :math:`Q\Delta` clipped), per tensor (shape ``(1,)``) or per output channel (``(C,)``).

    The error is piecewise quadratic in :math:`\Delta` with many local minima, so this is a grid search
    over :math:`\Delta = \tfrac{i}{\text{num}}\,\max|w|/Q`, :math:`i = 1..\text{num}`, not a golden-section
    search. The grid contains max-abs (:math:`i = \text{num}`), so the result is never worse than max-abs.
    For ``bits=1`` the exact optimum :math:`\mathrm{mean}|w|` (a scaled sign) is returned.
    """
    bits = check_bits(bits)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int ≥ 1 (grid points), got {num!r}")
    top = max_abs_scale(w, bits, per_channel)  # also checks the input
    v = _channel_view(w.detach().to(torch.float32), per_channel)
    if v.shape[1] == 0:
        return top
    if bits == 1:
        return v.abs().mean(dim=1)
    Q = qmax(bits)
    best, best_err = top.clone(), torch.full_like(top, math.inf)
    for i in range(num, 0, -1):   # from max-abs down: ties keep the larger (less clipping) step
        s = top * (i / num)
        safe = torch.where(s > 0, s, torch.ones_like(s))[:, None]
        err = (torch.round((v / safe).clamp(-Q, Q)) * safe - v).pow(2).sum(dim=1)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def lsq_init_scale(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    r"""LSQ's initial step :math:`2\,\mathrm{mean}|w| / \sqrt{Q}` (Esser et al. 2020), per tensor or channel."""
    bits = check_bits(bits)
    max_abs_scale(w, bits, per_channel)  # input checks
    v = _channel_view(w.detach().to(torch.float32), per_channel)
    if v.shape[1] == 0:
        return torch.zeros(v.shape[0])
    return 2 * v.abs().mean(dim=1) / math.sqrt(qmax(bits))


STEP_RULES = {"maxabs": max_abs_scale, "mse": mse_scale, "lsq": lsq_init_scale}
"""Fixed-step rules by name: ``step_rule(w, bits, per_channel) -> Δ``."""


def code_dtype(bits: int) -> torch.dtype:
    """The narrowest integer dtype that holds ``bits``-bit codes: ``int8`` up to 8 bits, ``int16`` for 16."""
    return torch.int8 if check_bits(bits) <= 8 else torch.int16


@dataclass
class QuantizedTensor:
    """Integer codes (int32, same shape as the input), their step(s) and bit width."""

    codes: torch.Tensor
    scale: torch.Tensor     # (1,) per tensor or (C,) per output channel
    bits: int


def _scale_like(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast a (1,) or (C,) scale against a tensor of ``shape``."""
    if scale.numel() == 1 or len(shape) == 0:
        return scale.reshape(()) if scale.numel() == 1 else scale
    return scale.reshape(-1, *([1] * (len(shape) - 1)))


def quantize(w: torch.Tensor, bits: int, *, per_channel: bool = False, stochastic: bool = False,
             generator: torch.Generator | None = None, scale: torch.Tensor | None = None) -> QuantizedTensor:
    r"""Codes :math:`q` with :math:`\hat w = q\Delta`; deterministic (round to nearest) or stochastic.

    Stochastic rounding: :math:`q = \lfloor x \rfloor + \mathrm{Bernoulli}(x - \lfloor x \rfloor)` with
    :math:`x = w/\Delta`, so :math:`\mathbb{E}[q\Delta] = w`. Pass a seeded ``generator`` for
    reproducible draws. ``scale`` overrides the max-abs step (values beyond the range are clipped).
    For ``bits=1`` with deterministic rounding the default step is :math:`\mathrm{mean}|w|` (scaled sign).
    """
    bits = check_bits(bits)
    if stochastic and generator is None:
        raise ValueError("stochastic rounding needs an explicit torch.Generator (the book uses no hidden randomness)")
    if scale is not None:
        s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"scale must be finite and non-negative, got {scale!r}")
    elif bits == 1 and not stochastic:  # scaled sign: mean|w| minimises the squared error of Δ·sign(w)
        max_abs_scale(w, bits, per_channel)  # same input checks
        v = _channel_view(w.detach().float(), per_channel)
        s = v.abs().mean(dim=1) if v.shape[1] else torch.zeros(v.shape[0])   # an empty tensor has step 0
    else:
        s = max_abs_scale(w, bits, per_channel)
    Q = qmax(bits)
    sb = _scale_like(s, w.shape)
    safe = torch.where(sb > 0, sb, torch.ones_like(sb))
    x = w.detach().to(torch.float32) / safe
    if bits == 1:
        # codes ±1: the grid is {-Δ, +Δ}; round to the nearer one, or pick +1 with prob (x+1)/2
        x = x.clamp(-1.0, 1.0)
        if stochastic:
            u = torch.rand(x.shape, generator=generator)
            q = torch.where(u < (x + 1) / 2, 1, -1)
        else:
            q = torch.where(x >= 0, 1, -1)
    else:
        x = x.clamp(-Q, Q)
        if stochastic:
            lo = torch.floor(x)
            u = torch.rand(x.shape, generator=generator)
            q = lo + (u < (x - lo)).to(x.dtype)
        else:
            q = torch.round(x)
        q = q.clamp(-Q, Q)
    q = torch.where(sb > 0, q, torch.zeros_like(q)) if bits != 1 else q
    return QuantizedTensor(q.to(torch.int32), s, bits)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    r""":math:`\hat w = q\,\Delta` as float32 (computed in float64 and kept within float32's range, so the
    largest finite input never comes back as infinity)."""
    w = qt.codes.to(torch.float64) * _scale_like(qt.scale.to(torch.float64), qt.codes.shape)
    big = torch.finfo(torch.float32).max
    return w.clamp_(-big, big).to(torch.float32)


def fake_quantize(w: torch.Tensor, bits: int, **kwargs) -> torch.Tensor:
    """``dequantize(quantize(w, bits, ...))``: the float tensor a receiver reconstructs."""
    return dequantize(quantize(w, bits, **kwargs)).to(w.dtype)


# ---- bit packing: b-bit codes really take b bits ----------------------------------------------

def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    r"""Pack signed codes in :math:`[-Q, Q]` into exactly :math:`\lceil n b / 8 \rceil` bytes.

    Each code is offset to an unsigned integer (:math:`u = q + Q`; for 1 bit :math:`u = (q+1)/2`)
    and its ``bits`` lowest bits are written little-endian, back to back.
    """
    bits = check_bits(bits)
    Q = qmax(bits)
    q = codes.reshape(-1).to(torch.int64).numpy()
    if q.size and (q.min() < -Q or q.max() > Q):
        raise ValueError(f"codes outside [-{Q}, {Q}] cannot be packed in {bits} bits")
    u = ((q + 1) // 2) if bits == 1 else (q + Q)
    u = u.astype("<u2")
    bitmat = np.unpackbits(u.view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitmat.reshape(-1), bitorder="little").tobytes()


def unpack_codes(body: bytes, n: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``n`` signed int32 codes; ``ValueError`` if ``body`` does not fit."""
    bits = check_bits(bits)
    Q = qmax(bits)
    need = -(-n * bits // 8)
    if len(body) != need:
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes, got {len(body)}")
    # O(n) memory with a small constant: never an (n, bits) int64 matrix
    raw = np.frombuffer(body, dtype=np.uint8)
    if 8 % bits == 0:   # 1, 2, 4, 8 bits: codes never straddle a byte; shift them out of each byte
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        u = ((raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(-1)[:n].astype(np.int32)
    else:               # 3, 5, 6, 7, 16 bits: one uint8 per bit, accumulated into int32 codes
        flat = np.unpackbits(raw, bitorder="little", count=n * bits).reshape(n, bits)
        u = np.zeros(n, dtype=np.int32)
        for b in range(bits):
            u |= flat[:, b].astype(np.int32) << b
    if bits == 1:
        u *= 2
        u -= 1
    else:
        if u.size and u.max() > 2 * Q:
            raise ValueError(f"code {int(u.max())} is outside the {bits}-bit range [0, {2 * Q}]")
        u -= Q
    return torch.from_numpy(u)


# ---- learned step size quantization (LSQ) -----------------------------------------------------

def lsq_codes(w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    r"""The int32 codes :math:`q = \mathrm{round}(\mathrm{clip}(w/\Delta, -Q, Q))` of ``w`` under a
    positive step ``step`` (shape ``()``/``(1,)`` per tensor or ``(C,)`` per output channel)."""
    bits = check_bits(bits)
    step = step.detach().to(torch.float32).reshape(-1)
    if not bool(torch.isfinite(step).all()) or bool((step <= 0).any()):
        raise ValueError("step must be finite and positive")
    Q = qmax(bits)
    return torch.round(torch.clamp(w.detach().to(torch.float32) / _scale_like(step, w.shape), -Q, Q)).to(torch.int32)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward: ``x``. Backward: the gradient times ``g`` (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


class _LSQFunction(torch.autograd.Function):
    r"""LSQ fake-quant with a hand-written backward (about half the tensor ops of autograd's version):
    :math:`\partial\hat w/\partial w = 1` inside the range, 0 outside (STE with clipping);
    :math:`\partial\hat w/\partial\Delta = q - x\,[|x| \le Q]` with :math:`x = w/\Delta`, times :math:`g`."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, Q: int, g: float) -> torch.Tensor:
        x = w / s
        q = torch.round(torch.clamp(x, -Q, Q))
        ctx.save_for_backward(x, q)
        ctx.Q, ctx.g, ctx.s_shape = Q, g, s.shape
        return q * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, q = ctx.saved_tensors
        inside = (x.abs() <= ctx.Q).to(grad.dtype)
        gs = grad * (q - x * inside)
        if len(ctx.s_shape) == 0:
            gs = gs.sum()
        else:
            gs = gs.sum(dim=tuple(range(1, gs.dim())), keepdim=True)
        return grad * inside, gs * ctx.g, None, None


class LSQQuantizer(nn.Module):
    r"""Fake-quantizes a tensor with a *learned* step :math:`\Delta` (Esser et al. 2020):

    .. math::  \hat w = \mathrm{round}\big(\mathrm{clip}(w/\Delta, -Q, Q)\big)\,\Delta,\qquad
               \frac{\partial \hat w}{\partial \Delta} =
               \begin{cases} -w/\Delta + \mathrm{round}(w/\Delta) & |w/\Delta| < Q \\ \pm Q & \text{else}\end{cases}

    and the step's gradient is multiplied by :math:`g = 1/\sqrt{N Q}` (:math:`N` values per step).
    Initial step: :math:`2\,\mathrm{mean}|w| / \sqrt{Q}` as in the paper (:func:`lsq_init_scale`).
    ``learn_step=False`` freezes :math:`\Delta` at that value (the weights still train through the
    quantizer): the ablation that separates "training through the grid" from "learning the grid".

    ``step_lr=None`` (the default) leaves the step to the weights' optimizer (same learning rate, same
    momentum). A number gives the step its own plain SGD, :math:`\Delta \leftarrow \Delta - \eta_\Delta\,
    g\,\partial L/\partial\Delta`, applied as soon as backward has accumulated its gradient
    (``register_post_accumulate_grad_hook``); the gradient is then cleared, so the weights' optimizer skips
    the step (no momentum, no weight decay on it). A floor such as :class:`QATFedAvg`'s then acts on a
    step that carries no velocity.
    """

    def __init__(self, bits: int, init_from: torch.Tensor, per_channel: bool = False, learn_step: bool = True,
                 step_lr: float | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        if self.bits == 1:
            raise ValueError("LSQ needs bits ≥ 2 (a 1-bit symmetric grid has no zero and no learnable clip)")
        if step_lr is not None and not (isinstance(step_lr, (int, float)) and not isinstance(step_lr, bool)
                                        and math.isfinite(step_lr) and step_lr > 0):
            raise ValueError(f"step_lr must be None or a finite positive number, got {step_lr!r}")
        if step_lr is not None and not learn_step:
            raise ValueError("step_lr needs learn_step=True (a frozen step has no learning rate)")
        self.Q = qmax(self.bits)
        self.per_channel = per_channel and init_from.dim() >= 2
        self.learn_step = bool(learn_step)
        self.step_lr = None if step_lr is None else float(step_lr)
        init = lsq_init_scale(init_from, self.bits, self.per_channel)
        self.step = nn.Parameter(init.clamp_min(1e-8), requires_grad=self.learn_step)
        self.values_per_step = _channel_view(init_from, self.per_channel).shape[1]

    def _own_step_sgd(self) -> None:
        """Hook the step's own SGD on the current step parameter (once per parameter object: a copied or
        unpickled module has a new one, and hooks do not travel with a copy)."""
        if _OWN_STEP_SGD.get(id(self.step)) is self.step:
            return
        lr = self.step_lr

        def sgd(p: torch.Tensor) -> None:
            with torch.no_grad():
                p.sub_(lr * p.grad)
            p.grad = None

        self.step.register_post_accumulate_grad_hook(sgd)
        _OWN_STEP_SGD[id(self.step)] = self.step

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.step_lr is not None:
            self._own_step_sgd()
        g = 1.0 / math.sqrt(self.values_per_step * self.Q)
        return _LSQFunction.apply(w, _scale_like(self.step, w.shape), self.Q, g)

    def reference_forward(self, w: torch.Tensor) -> torch.Tensor:
        """The same fake-quant written with :func:`round_ste` and :func:`grad_scale` (autograd does
        the rest); :meth:`forward` computes identical values and gradients in fewer tensor ops."""
        g = 1.0 / math.sqrt(self.values_per_step * self.Q)
        s = _scale_like(grad_scale(self.step, g), w.shape)
        return round_ste(torch.clamp(w / s, -self.Q, self.Q)) * s

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes the fake-quantized weight stands for (int32)."""
        return lsq_codes(w, self.step, self.bits)

    def extra_repr(self) -> str:
        lr = "" if self.step_lr is None else f", step_lr={self.step_lr:g}"
        return f"bits={self.bits}, per_channel={self.per_channel}, learn_step={self.learn_step}{lr}"


_OWN_STEP_SGD: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
"""The step parameters that carry :class:`LSQQuantizer`'s own-SGD hook, by ``id``."""


class LSQLinear(nn.Linear):
    """``nn.Linear`` whose weight passes through an :class:`LSQQuantizer` (bias stays float32)."""

    def __init__(self, linear: nn.Linear, bits: int, per_channel: bool = False, learn_step: bool = True,
                 step_lr: float | None = None) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.wq = LSQQuantizer(bits, self.weight, per_channel, learn_step, step_lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wq(self.weight), self.bias)


class LSQConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight passes through an :class:`LSQQuantizer` (bias stays float32)."""

    def __init__(self, conv: nn.Conv2d, bits: int, per_channel: bool = False, learn_step: bool = True,
                 step_lr: float | None = None) -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        self.load_state_dict(conv.state_dict())
        self.wq = LSQQuantizer(bits, self.weight, per_channel, learn_step, step_lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.wq(self.weight), self.bias)


def swap_to_lsq(model: nn.Module, bits: int, per_channel: bool = False, learn_step: bool = True,
                step_lr: float | None = None, init: str = "lsq") -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` / ``nn.Conv2d`` replaced by its LSQ version
    (same weights; steps learned unless ``learn_step=False``, with their own SGD rate when ``step_lr`` is
    given: :class:`LSQQuantizer`). The steps start at LSQ's initial value (``init="lsq"``) or at another
    rule of :data:`STEP_RULES` (``"maxabs"``, ``"mse"``). The original model is not modified."""
    check_bits(bits)
    if init not in STEP_RULES:
        raise ValueError(f"init must be one of {sorted(STEP_RULES)}, got {init!r}")
    model = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, LSQLinear(child, bits, per_channel, learn_step, step_lr))
            elif type(child) is nn.Conv2d:
                setattr(parent, name, LSQConv2d(child, bits, per_channel, learn_step, step_lr))
            else:
                swap(child)

    swap(model)
    if init != "lsq":
        with torch.no_grad():
            for layer in lsq_layers(model).values():
                wq = layer.wq
                wq.step.copy_(STEP_RULES[init](layer.weight, bits, wq.per_channel).reshape_as(wq.step).clamp_min(1e-8))
    return model


def lsq_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: layer}`` for every LSQ layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LSQLinear, LSQConv2d))}


# ---- integer export ---------------------------------------------------------------------------

def _integer_codes(codes: torch.Tensor) -> torch.Tensor:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (int8 up to 8 bits, int16 for 16), got {codes.dtype}")
    return codes


class IntegerLinear(nn.Module):
    r"""A linear layer that stores integer codes: :math:`y = (x\,q^\top)\,\Delta + b`.

    The codes keep their integer dtype (:func:`code_dtype`: ``int8`` up to 8 bits, ``int16`` at 16)."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("codes", _integer_codes(codes).clone())
        self.register_buffer("step", step.detach().float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # codes up to 2^15 are exact in float32; the step is applied once per output
        y = F.linear(x, self.codes.to(x.dtype)) * self.step
        return y if self.bias is None else y + self.bias


class IntegerConv2d(nn.Module):
    """A conv layer that stores integer codes (``int8``/``int16``); the step multiplies each output channel."""

    def __init__(self, conv: nn.Conv2d, codes: torch.Tensor, step: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("codes", _integer_codes(codes).clone())
        self.register_buffer("step", step.detach().float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.codes.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)
        y = y * self.step.reshape(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)


def export_integer(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a device stores for an LSQ model: per LSQ layer ``<name>.codes`` (:func:`code_dtype` of its bit
    width: int8 up to 8 bits, int16 at 16), ``<name>.step`` (float32) and ``<name>.bias``; every other
    float parameter/buffer as float32. ``PackedIntCodec(bits)`` then stores the codes at ``bits`` bits each."""
    layers = lsq_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        out[f"{name}.codes"] = layer.wq.codes(layer.weight).to(code_dtype(layer.wq.bits))
        out[f"{name}.step"] = layer.wq.step.detach().clone()
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach().clone()
    for key, value in model.state_dict().items():
        if not any(key.startswith(n + ".") for n in layers) and value.is_floating_point():
            out[key] = value.detach().clone()
    return out


def integer_model(template: nn.Module, exported: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a model from :func:`export_integer`'s tensors: ``template`` (the LSQ model or its float
    original) gives the architecture; each LSQ layer becomes an :class:`IntegerLinear`/:class:`IntegerConv2d`."""
    if not isinstance(template, nn.Module):
        raise TypeError(f"template must be an nn.Module, got {type(template).__name__}")
    if not isinstance(exported, dict) or not all(isinstance(v, torch.Tensor) for v in exported.values()):
        raise TypeError("exported must be the dict of tensors that export_integer returns")
    model = copy.deepcopy(template)
    names = sorted({k[:-len(".codes")] for k in exported if k.endswith(".codes")})
    if not names:
        raise ValueError("exported has no '<layer>.codes' tensors: pass what export_integer returns")
    modules = dict(model.named_modules())
    for name in names:
        old = modules.get(name)
        if old is None:
            raise ValueError(f"exported holds layer {name!r}, which template ({type(template).__name__}) does "
                             f"not have: export and template come from different architectures")
        if f"{name}.step" not in exported:
            raise ValueError(f"exported has {name!r}.codes but no {name!r}.step")
        weight = getattr(old, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(exported[f"{name}.codes"].shape):
            raise ValueError(f"exported[{name + '.codes'!r}] has shape {tuple(exported[name + '.codes'].shape)}, "
                             f"template's layer {name!r} has weight shape "
                             f"{None if weight is None else tuple(weight.shape)}")
    own = model.state_dict()
    for key, value in exported.items():
        if any(key.startswith(n + ".") for n in names):
            continue
        if key not in own or tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"exported[{key!r}] does not match template ({type(template).__name__}): "
                             f"{'no such tensor' if key not in own else f'shape {tuple(own[key].shape)}'}")
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child_name)
        codes, step, bias = exported[f"{name}.codes"], exported[f"{name}.step"], exported.get(f"{name}.bias")
        if isinstance(old, nn.Conv2d):
            setattr(parent, child_name, IntegerConv2d(old, codes, step, bias))
        elif isinstance(old, nn.Linear):
            setattr(parent, child_name, IntegerLinear(codes, step, bias))
        else:
            raise ValueError(f"{name!r} is neither a Linear nor a Conv2d layer")
    rest = {k: v for k, v in exported.items() if not any(k.startswith(n + ".") for n in names)}
    model.load_state_dict(rest, strict=False)
    return model


@torch.no_grad()
def ptq_model(model: nn.Module, bits: int, per_channel: bool = True, step: str = "maxabs") -> nn.Module:
    """Post-training quantization: a copy of ``model`` whose Linear/Conv2d weights are replaced by
    ``fake_quantize(w, bits, scale=Δ)`` with Δ from the rule ``step`` (:data:`STEP_RULES`: ``"maxabs"``,
    the codecs' rule; ``"mse"``, :func:`mse_scale`; ``"lsq"``, LSQ's initial step); biases stay float."""
    check_bits(bits)
    if step not in STEP_RULES:
        raise ValueError(f"step must be one of {sorted(STEP_RULES)}, got {step!r}")
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            pc = per_channel and m.weight.dim() >= 2
            m.weight.copy_(fake_quantize(m.weight, bits, scale=STEP_RULES[step](m.weight, bits, pc)))
    return model


# ---- federated QAT ----------------------------------------------------------------------------

def lsq_steps(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{step name: Δ}`` for every LSQ step (``*.wq.step``) in a state dict, cloned."""
    return {k: v.detach().clone() for k, v in state.items() if k.endswith("wq.step")}


class QATFedAvg(FedAvg):
    r"""FedAvg for federated QAT. Before each round it (1) hands the broadcast global state to an uplink
    that needs it (:class:`helpers.codecs.quantized.QATUploadCodec` encodes a client's quantized
    *weights*, so it needs the state the update is relative to) and (2) records every LSQ step,
    so ``steps[t]`` holds the global steps at the start of round ``t + 1`` (call :meth:`finish` with the
    final model to append the last ones).

    After every local SGD step it keeps each learned step :math:`\ge` ``min_step``: with the weights'
    learning rate and momentum, a 2-bit layer's step can be pushed through zero, where the grid collapses
    (and a payload with a non-positive step is rejected). ``floor_hits`` counts the channel-steps clamped."""

    def __init__(self, min_step: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        if not (isinstance(min_step, (int, float)) and math.isfinite(min_step) and min_step > 0):
            raise ValueError(f"min_step must be a finite positive number, got {min_step!r}")
        self.min_step = float(min_step)
        self.floor_hits = 0
        self.steps: list[dict[str, torch.Tensor]] = []

    def after_local_step(self, model: nn.Module) -> None:
        for layer in lsq_layers(model).values():
            step = layer.wq.step
            if step.requires_grad:
                low = step.data < self.min_step
                if bool(low.any()):
                    self.floor_hits += int(low.sum())
                    step.data.clamp_(min=self.min_step)

    def before_round(self, round_idx: int, server) -> None:
        state = server.state
        if hasattr(server.uplink, "set_base"):
            server.uplink.set_base(state)
        self.steps.append(lsq_steps(state))

    def finish(self, model: nn.Module) -> list[dict[str, torch.Tensor]]:
        """Append the final model's steps and return the trajectory (rounds 0..R)."""
        self.steps.append(lsq_steps(dict(model.state_dict())))
        return self.steps


