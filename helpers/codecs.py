"""What crosses the network: codecs turn a dict of tensors into bytes and back.

``len(codec.encode(tensors))`` *is* the communication cost. Payloads are untrusted input, so
the format is a fixed binary layout (never pickle) and :meth:`Codec.decode` validates it::

    magic  b"FLBK"              4 bytes
    version, codec id           2 x uint8
    number of tensors           uint16
    per tensor:  name length (uint16), name (UTF-8), dtype code (uint8), ndim (uint8),
                 shape (ndim x uint32), body length (uint32), body (codec-specific bytes)
    CRC-32 of everything above  uint32

All integers are little-endian. A subclass only says how one tensor becomes a body and back
(:meth:`Codec.encode_tensor`, :meth:`Codec.decode_tensor`); the framing, the checksum and
the checks live here once.
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Mapping

import numpy as np
import torch

__all__ = [
    "PayloadError",
    "Codec",
    "Float32Codec",
    "Float16Codec",
    "validate_update",
    "MAGIC",
]

MAGIC = b"FLBK"
VERSION = 1
MAX_ELEMENTS = 1 << 28  # refuse payloads that claim absurd sizes (a memory-exhaustion guard)

_DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64,
                                   4: torch.int8, 5: torch.uint8, 6: torch.int32, 7: torch.int64, 8: torch.bool}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}


class PayloadError(ValueError):
    """A payload that cannot be trusted: truncated, corrupted, or not what the server expects."""


class _Reader:
    """Reads little-endian fields from bytes, raising :class:`PayloadError` when they run out."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PayloadError(f"payload truncated: needed {n} bytes at offset {self.pos}, "
                               f"only {len(self.data) - self.pos} left")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


class Codec:
    """Base class: frames tensors into a checked binary payload. Subclasses set ``codec_id``
    and implement :meth:`encode_tensor` / :meth:`decode_tensor`."""

    codec_id: int = -1
    name: str = "codec"

    # ---- what a subclass implements -------------------------------------------------
    def encode_tensor(self, tensor: torch.Tensor) -> bytes:
        raise NotImplementedError

    def decode_tensor(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # ---- the shared framing ------------------------------------------------------------
    def encode(self, tensors: Mapping[str, torch.Tensor]) -> bytes:
        """Serialize ``{name: tensor}`` into one payload with a header and a CRC-32."""
        if len(tensors) > 0xFFFF:
            raise ValueError("at most 65535 tensors per payload")
        parts = [MAGIC, struct.pack("<BBH", VERSION, self.codec_id, len(tensors))]
        for name, tensor in tensors.items():
            if tensor.dtype not in _DTYPE_CODES:
                raise ValueError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
            name_b = name.encode("utf-8")
            body = self.encode_tensor(tensor.detach().cpu())
            parts += [struct.pack("<H", len(name_b)), name_b,
                      struct.pack("<BB", _DTYPE_CODES[tensor.dtype], tensor.dim()),
                      struct.pack(f"<{tensor.dim()}I", *tensor.shape),
                      struct.pack("<I", len(body)), body]
        blob = b"".join(parts)
        return blob + struct.pack("<I", zlib.crc32(blob))

    def decode(self, payload: bytes) -> dict[str, torch.Tensor]:
        """Parse and check a payload; raise :class:`PayloadError` with the reason if it is bad."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) < len(MAGIC) + 8:
            raise PayloadError(f"payload truncated: {len(payload)} bytes is shorter than any header")
        if payload[:4] != MAGIC:
            raise PayloadError("not a book payload (bad magic bytes)")
        (crc,) = struct.unpack("<I", payload[-4:])
        if zlib.crc32(payload[:-4]) != crc:
            raise PayloadError("checksum mismatch: the payload was corrupted or truncated in transit")
        r = _Reader(payload[:-4])
        r.take(4)
        version, codec_id, count = r.unpack("BBH")
        if version != VERSION:
            raise PayloadError(f"unsupported payload version {version} (expected {VERSION})")
        if codec_id != self.codec_id:
            raise PayloadError(f"payload was encoded by codec id {codec_id}, this is {self.name} (id {self.codec_id})")
        out: dict[str, torch.Tensor] = {}
        total = 0
        for _ in range(count):
            (name_len,) = r.unpack("H")
            try:
                name = r.take(name_len).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PayloadError("tensor name is not valid UTF-8") from exc
            dtype_code, ndim = r.unpack("BB")
            if dtype_code not in _DTYPES:
                raise PayloadError(f"unknown dtype code {dtype_code} for {name!r}")
            shape = tuple(r.unpack(f"{ndim}I")) if ndim else ()
            numel = math.prod(shape)
            total += numel
            if total > MAX_ELEMENTS:
                raise PayloadError(f"payload claims {total} elements, more than the limit {MAX_ELEMENTS}")
            (body_len,) = r.unpack("I")
            body = r.take(body_len)
            if name in out:
                raise PayloadError(f"tensor {name!r} appears twice")
            try:
                out[name] = self.decode_tensor(body, shape, _DTYPES[dtype_code])
            except PayloadError:
                raise
            except (ValueError, RuntimeError, struct.error) as exc:
                raise PayloadError(f"tensor {name!r}: body does not match its header ({exc})") from exc
        if r.pos != len(r.data):
            raise PayloadError(f"{len(r.data) - r.pos} unexpected trailing bytes")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _expect(body: bytes, n: int, what: str) -> None:
    if len(body) != n:
        raise PayloadError(f"{what}: body has {len(body)} bytes, header implies {n}")


class Float32Codec(Codec):
    """Raw little-endian float32: 32 bits per value, the uncompressed baseline."""

    codec_id = 0
    name = "float32"

    def encode_tensor(self, tensor: torch.Tensor) -> bytes:
        return tensor.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()

    def decode_tensor(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        _expect(body, 4 * math.prod(shape), "float32")
        arr = np.frombuffer(body, dtype="<f4").reshape(shape)
        return torch.from_numpy(arr.copy()).to(dtype)


class Float16Codec(Codec):
    """IEEE half precision: 16 bits per value; values beyond ±65504 become ±inf (rejected by
    :func:`validate_update`), relative rounding error ≤ 2^-11."""

    codec_id = 1
    name = "float16"

    def encode_tensor(self, tensor: torch.Tensor) -> bytes:
        return tensor.to(torch.float16).contiguous().numpy().astype("<f2", copy=False).tobytes()

    def decode_tensor(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        _expect(body, 2 * math.prod(shape), "float16")
        arr = np.frombuffer(body, dtype="<f2").reshape(shape)
        return torch.from_numpy(arr.astype(np.float32)).to(dtype)


def validate_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Check a decoded update against the global state: same names, same shapes, finite values."""
    missing = set(reference) - set(update)
    extra = set(update) - set(reference)
    if missing or extra:
        raise PayloadError(f"update tensors do not match the model (missing {sorted(missing)}, "
                           f"unexpected {sorted(extra)})")
    for name, ref in reference.items():
        t = update[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise PayloadError(f"{name!r} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"{name!r} contains NaN or infinite values")


# ---- Chapter 2: quantizing codecs (codec ids 2-9) ------------------------------------------------
# Appended after the float codecs; the math lives in helpers.quantization, the framing above.

from . import quantization as _q  # noqa: E402  (kept next to the codecs that use it)

__all__ += ["QuantizedCodec", "PackedIntCodec"]


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
        _expect(body, 2 + 4 * k + -(-n * bits // 8), self.name)
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
