"""The wire format, and the float codecs: a dict of tensors becomes bytes and back.

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
    "expect_length",
]

MAGIC = b"FLBK"
VERSION = 1
MAX_ELEMENTS = 1 << 26
"""Without a reference state, a payload may claim at most this many values in all (256 MiB as float32).
A server always decodes against its reference, which bounds every allocation by the model's size."""

_DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64,
                                   4: torch.int8, 5: torch.uint8, 6: torch.int32, 7: torch.int64, 8: torch.bool,
                                   9: torch.int16}
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
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {type(name).__name__}")
            name_b = name.encode("utf-8")
            if len(name_b) > 0xFFFF:
                raise ValueError(f"tensor name {name[:40]!r}... is {len(name_b)} bytes in UTF-8; the format allows 65,535")
            if tensor.dim() > 255:
                raise ValueError(f"tensor {name!r} has {tensor.dim()} dimensions; the format allows 255")
            body = self.encode_tensor(tensor.detach().cpu())
            parts += [struct.pack("<H", len(name_b)), name_b,
                      struct.pack("<BB", _DTYPE_CODES[tensor.dtype], tensor.dim()),
                      struct.pack(f"<{tensor.dim()}I", *tensor.shape),
                      struct.pack("<I", len(body)), body]
        blob = b"".join(parts)
        return blob + struct.pack("<I", zlib.crc32(blob))

    def decode(self, payload: bytes, reference: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parse and check a payload; raise :class:`PayloadError` with the reason if it is bad.

        With ``reference`` (the server's global state), every tensor's name, shape and dtype are checked
        against it *before* its body is decoded, so a payload can never make the server allocate more
        than the model's size, and the result is checked by :func:`validate_update`.
        """
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
            limit = MAX_ELEMENTS if reference is None else sum(t.numel() for t in reference.values())
            if total > limit:
                raise PayloadError(f"payload claims {total} elements, more than the limit {limit}")
            (body_len,) = r.unpack("I")
            body = r.take(body_len)
            if name in out:
                raise PayloadError(f"tensor {name!r} appears twice")
            if reference is not None:
                _check_against(name, shape, _DTYPES[dtype_code], reference)
            try:
                out[name] = self.decode_tensor(body, shape, _DTYPES[dtype_code])
            except PayloadError:
                raise
            except Exception as exc:  # any failure while decoding untrusted bytes is a rejection, never a crash
                raise PayloadError(f"tensor {name!r}: body does not match its header "
                                   f"({type(exc).__name__}: {exc})") from exc
        if r.pos != len(r.data):
            raise PayloadError(f"{len(r.data) - r.pos} unexpected trailing bytes")
        if reference is not None:
            validate_update(out, reference)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def expect_length(body: bytes, n: int, what: str) -> None:
    if len(body) != n:
        raise PayloadError(f"{what}: body has {len(body)} bytes, header implies {n}")


class Float32Codec(Codec):
    """Raw little-endian float32: 32 bits per value, the uncompressed baseline."""

    codec_id = 0
    name = "float32"

    def encode_tensor(self, tensor: torch.Tensor) -> bytes:
        return tensor.to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()

    def decode_tensor(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        expect_length(body, 4 * math.prod(shape), "float32")
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
        expect_length(body, 2 * math.prod(shape), "float16")
        arr = np.frombuffer(body, dtype="<f2").reshape(shape)
        return torch.from_numpy(arr.astype(np.float32)).to(dtype)


def _check_against(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   reference: Mapping[str, torch.Tensor]) -> None:
    """A header entry must name a tensor of the reference with the same shape and dtype."""
    if name not in reference:
        raise PayloadError(f"unexpected tensor {name!r}: the model has no such tensor")
    ref = reference[name]
    if tuple(shape) != tuple(ref.shape):
        raise PayloadError(f"{name!r} has shape {tuple(shape)}, the model expects {tuple(ref.shape)}")
    if dtype != ref.dtype:
        raise PayloadError(f"{name!r} is declared {dtype}, the model's tensor is {ref.dtype}")


def validate_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Check a decoded update against the global state: same names, shapes and dtypes, finite values."""
    missing = set(reference) - set(update)
    extra = set(update) - set(reference)
    if missing or extra:
        raise PayloadError(f"update tensors do not match the model (missing {sorted(missing)}, "
                           f"unexpected {sorted(extra)})")
    for name, ref in reference.items():
        t = update[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise PayloadError(f"{name!r} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise PayloadError(f"{name!r} has dtype {t.dtype}, the model's tensor is {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"{name!r} contains NaN or infinite values")
