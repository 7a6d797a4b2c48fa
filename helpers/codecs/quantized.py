r"""Quantizing codecs (ids 2-9): uniform ``b``-bit codes on the wire (Chapter 2).

* :class:`QuantizedCodec` (id 2): any update, max-abs steps, codes bit-packed;
* :class:`PackedIntCodec` (id 3): a deployable integer model (codes packed, floats raw);
* :class:`QATUploadCodec` (id 4): the uplink of federated QAT, a client's *quantized weights*.

The quantizer math lives in :mod:`helpers.quantization`; the byte format in :mod:`helpers.codecs.format`.
"""

from __future__ import annotations

import math
import struct
from typing import Mapping

import numpy as np
import torch

from .. import quantization as _q
from .format import Codec, Float32Codec, PayloadError, expect_length, validate_update

__all__ = ["QuantizedCodec", "PackedIntCodec", "QATUploadCodec", "lsq_weight_steps"]


class QuantizedCodec(Codec):
    r"""Uniform symmetric ``bits``-bit quantization of every tensor, codes bit-packed.

    Body of one tensor (little-endian)::

        bits (uint8) | mode (uint8: 0 one scale, 1 one scale per output channel)
        | k scales (float32; k = 1, or shape[0] in mode 1) | codes packed at ``bits`` bits each

    so a tensor of :math:`n` values costs exactly :math:`2 + 4k + \lceil n b / 8 \rceil` bytes.
    Per-channel scales (``per_channel=True``) are used only for tensors with ≥ 2 dims (weights);
    biases and scalars get one scale. ``stochastic=True`` rounds stochastically (unbiased) with a
    ``torch.Generator`` the codec owns, seeded by ``seed``: use a fresh codec for each run.
    """

    codec_id = 2

    def __init__(self, bits: int, per_channel: bool = True, stochastic: bool = False, seed: int = 0) -> None:
        self.bits = _q.check_bits(bits)
        self.per_channel = bool(per_channel)
        self.stochastic = bool(stochastic)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed) if stochastic else None
        self.name = f"q{self.bits}" + ("-sr" if stochastic else "")

    def _mode(self, shape: tuple[int, ...]) -> int:
        return int(self.per_channel and len(shape) >= 2 and shape[0] > 0)

    def encode_tensor(self, tensor: torch.Tensor) -> bytes:
        if not tensor.is_floating_point():
            raise ValueError(f"{self.name} quantizes floating-point tensors only, got {tensor.dtype}")
        mode = self._mode(tuple(tensor.shape))
        qt = _q.quantize(tensor.float(), self.bits, per_channel=bool(mode), stochastic=self.stochastic,
                         generator=self.generator)
        scales = qt.scale.numpy().astype("<f4", copy=False).tobytes()
        return struct.pack("<BB", self.bits, mode) + scales + _q.pack_codes(qt.codes, self.bits)

    def decode_tensor(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not dtype.is_floating_point:
            raise PayloadError(f"{self.name}: header says dtype {dtype}, quantized tensors are floating point")
        if len(body) < 2:
            raise PayloadError(f"{self.name}: body of {len(body)} bytes is shorter than its 2-byte header")
        bits, mode = body[0], body[1]
        if bits != self.bits:
            raise PayloadError(f"{self.name}: tensor was quantized with {bits} bits, this codec expects {self.bits}")
        if mode not in (0, 1) or (mode == 1 and len(shape) < 2):
            raise PayloadError(f"{self.name}: invalid scale mode {mode} for shape {shape}")
        k = shape[0] if mode == 1 else 1
        n = math.prod(shape)
        expect_length(body, 2 + 4 * k + -(-n * bits // 8), self.name)
        scales = torch.from_numpy(np.frombuffer(body, dtype="<f4", count=k, offset=2).copy())
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise PayloadError(f"{self.name}: scales must be finite and non-negative")
        try:
            codes = _q.unpack_codes(body[2 + 4 * k:], n, bits).reshape(shape)
        except ValueError as exc:
            raise PayloadError(f"{self.name}: {exc}") from exc
        return _q.dequantize(_q.QuantizedTensor(codes, scales, bits)).to(dtype)

    def __repr__(self) -> str:
        return (f"QuantizedCodec(bits={self.bits}, per_channel={self.per_channel}, "
                f"stochastic={self.stochastic}, seed={self.seed})")


class PackedIntCodec(Codec):
    """Stores a deployable integer model: integer tensors (quantization codes) bit-packed at
    ``bits`` bits, floating-point tensors (steps, biases) as raw float32.

    Body: kind (uint8: 0 float32, 1 packed integers) | bits (uint8) | data.
    """

    codec_id = 3

    def __init__(self, bits: int) -> None:
        self.bits = _q.check_bits(bits)
        self.name = f"int{self.bits}-packed"

    def encode_tensor(self, tensor: torch.Tensor) -> bytes:
        if tensor.is_floating_point():
            return struct.pack("<BB", 0, 32) + Float32Codec().encode_tensor(tensor)
        if tensor.dtype == torch.bool:
            raise ValueError(f"{self.name}: bool tensors are not supported")
        return struct.pack("<BB", 1, self.bits) + _q.pack_codes(tensor, self.bits)

    def decode_tensor(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if len(body) < 2:
            raise PayloadError(f"{self.name}: body of {len(body)} bytes is shorter than its 2-byte header")
        kind, bits = body[0], body[1]
        if kind == 0 and bits == 32 and dtype.is_floating_point:
            return Float32Codec().decode_tensor(body[2:], shape, dtype)
        if kind == 1 and bits == self.bits and not dtype.is_floating_point and dtype != torch.bool:
            try:
                return _q.unpack_codes(body[2:], math.prod(shape), bits).reshape(shape).to(dtype)
            except ValueError as exc:
                raise PayloadError(f"{self.name}: {exc}") from exc
        raise PayloadError(f"{self.name}: body kind {kind} / {bits} bits does not match dtype {dtype}")

    def __repr__(self) -> str:
        return f"PackedIntCodec(bits={self.bits})"


def lsq_weight_steps(names) -> dict[str, str]:
    """``{weight name: step name}`` for the LSQ layers among a state dict's ``names``: ``P.weight`` is an
    LSQ weight exactly when ``P.wq.step`` is there too (:class:`helpers.quantization.LSQLinear`/``LSQConv2d``)."""
    names = set(names)
    pairs = {}
    for n in names:
        if n == "weight" or n.endswith(".weight"):
            step = n[:-len("weight")] + "wq.step"
            if step in names:
                pairs[n] = step
    return pairs


class QATUploadCodec(PackedIntCodec):
    r"""The uplink of federated QAT: a client sends the model it would deploy, not a float32 update.

    For every LSQ layer (``P.weight`` with its step ``P.wq.step``) the client's weight
    :math:`w_k = w + \delta w_k` travels as its integer codes :math:`q_k = \mathrm{round}(\mathrm{clip}(w_k/\Delta_k,
    -Q, Q))` packed at ``bits`` bits (``PackedIntCodec``'s body); every other tensor (the steps, biases) is
    the float32 update. The server rebuilds :math:`\hat w_k = q_k\,\Delta_k` with :math:`\Delta_k = \Delta + \delta\Delta_k`
    and hands FedAvg the update :math:`\hat w_k - w`, so the new global weight is the weighted mean of the
    clients' *quantized* weights.

    Both sides need the global state :math:`w` the update is relative to (the client received it; the
    server holds it): :meth:`decode` takes it as ``reference`` (the server's state, as ``Server.receive``
    passes it) and :meth:`encode` from :meth:`set_base`, which :class:`helpers.quantization.QATFedAvg` calls
    before every round. Decoding checks every header against the reference *before* reading a body (names,
    shapes, the integer wire dtype of codes), so a payload can never allocate more than the model; codes
    outside :math:`[-Q, Q]`, non-finite floats and non-positive steps are rejected; no pickle anywhere.
    """

    codec_id = 4

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        if self.bits == 1:
            raise ValueError("bits must be ≥ 2 for LSQ layers (a 1-bit symmetric grid has no zero)")
        self.name = f"qat{self.bits}-upload"
        self.base: dict[str, torch.Tensor] | None = None

    @property
    def wire_dtype(self) -> torch.dtype:
        """The integer dtype the header declares for codes (their body is packed at ``bits`` bits anyway)."""
        return torch.int8 if self.bits <= 8 else torch.int32

    def set_base(self, state: Mapping[str, torch.Tensor]) -> None:
        """The global state this round's updates are relative to (what the client received)."""
        self.base = {k: v.detach().clone() for k, v in state.items()}

    def encode(self, tensors: Mapping[str, torch.Tensor]) -> bytes:
        if self.base is None:
            raise ValueError(f"{self.name}: call set_base(global_state) before encoding (QATFedAvg does it every round)")
        if set(tensors) != set(self.base):
            raise ValueError(f"{self.name}: the update's tensors {sorted(tensors)} are not the base's {sorted(self.base)}")
        pairs = lsq_weight_steps(tensors)
        if not pairs:
            raise ValueError(f"{self.name}: no LSQ layer (P.weight with P.wq.step) in the update")
        wire: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name in pairs:
                w = self.base[name] + t
                step = self.base[pairs[name]] + tensors[pairs[name]]
                wire[name] = _q.lsq_codes(w, step, self.bits).to(self.wire_dtype)
            else:
                wire[name] = t.to(torch.float32)
        return super().encode(wire)

    def decode(self, payload: bytes, reference: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        ref = reference if reference is not None else self.base
        if ref is None:
            raise PayloadError(f"{self.name}: decoding needs the global state (pass reference=, or call set_base)")
        pairs = lsq_weight_steps(ref)
        # what the header must declare: codes as integers, the rest as in the model (meta tensors: no memory)
        wire_ref = {k: torch.empty(v.shape, dtype=self.wire_dtype if k in pairs else v.dtype, device="meta")
                    for k, v in ref.items()}
        wire = super().decode(payload, wire_ref)
        out: dict[str, torch.Tensor] = {}
        for name, t in wire.items():
            if name in pairs:
                step = (ref[pairs[name]] + wire[pairs[name]]).to(torch.float32).reshape(-1)
                if not bool(torch.isfinite(step).all()) or bool((step <= 0).any()):
                    raise PayloadError(f"{self.name}: the step of {name!r} must be finite and positive")
                w_hat = _q.dequantize(_q.QuantizedTensor(t.to(torch.int32), step, self.bits))
                out[name] = (w_hat - ref[name]).to(ref[name].dtype)
            else:
                out[name] = t
        validate_update(out, ref)
        return out

    def __repr__(self) -> str:
        return f"QATUploadCodec(bits={self.bits})"
