r"""Quantizing codecs (ids 2-9): uniform ``b``-bit codes on the wire (Chapter 2).

The quantizer math lives in :mod:`helpers.quantization`; the byte format in :mod:`helpers.codecs.format`.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from .. import quantization as _q
from .format import Codec, Float32Codec, PayloadError, expect_length

__all__ = ["QuantizedCodec", "PackedIntCodec"]


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
