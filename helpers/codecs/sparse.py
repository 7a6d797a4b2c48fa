r"""Sparse codecs (ids 10-19): send only the nonzero (or the k largest) entries of each tensor.

A sparse tensor body is *where* the kept entries are plus *what* they are. Positions have
several exact encodings, and the encoder measures them all and keeps the smallest:

=============  ====================================  =========================================
layout         bytes for k kept entries out of n      best when
=============  ====================================  =========================================
dense          0 (every value is sent)                nearly nothing is zero
bitmask        ⌈n/8⌉                                  density d = k/n above about 1/8
indices        k·w, w = 1, 2 or 4 bytes (fits n-1)    small tensors
delta          Σ varint(gap) (LEB128, 1 byte < 128)   very sparse: gaps small enough for 1 byte
=============  ====================================  =========================================

A yardstick for the position cost is :math:`\log_2\binom{n}{k} \approx n\,H_b(d)` bits,
:math:`H_b(d) = -d\log_2 d - (1-d)\log_2(1-d)`: the fewest bits, on average, that any code can spend
when the k positions are drawn *uniformly at random*. It is not a limit for real position sets:
positions with structure (whole pruned rows, the same coordinates round after round) can be coded
in fewer bits by a code that models that structure.

Body layout (little-endian)::

    layout (uint8: 0 dense, 1 bitmask, 2 indices, 3 delta), k (uint32),
    positions (layout-specific), values-length (uint32), values (the value codec's body for k values)

Values are encoded by any :class:`~helpers.codecs.Codec` (float32, float16, or a quantizing codec
from Chapter 2) applied to the 1-D tensor of kept values, so no value format is written twice.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from .format import Codec, Float16Codec, Float32Codec, PayloadError

__all__ = [
    "LAYOUTS",
    "encode_positions",
    "decode_positions",
    "binary_entropy",
    "position_entropy_bits",
    "SparseCodec",
    "TopKCodec",
    "varint_encode",
    "varint_decode",
]

LAYOUTS = {0: "dense", 1: "bitmask", 2: "indices", 3: "delta"}
_MAX_VARINT_BYTES = 5   # enough for any gap below 2^35 (tensors are limited to 2^28 elements)


# ---- variable-length integers (LEB128), vectorized ---------------------------------------------------
def varint_encode(values: np.ndarray) -> bytes:
    """LEB128: 7 bits per byte, high bit set on every byte but the last of a number."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.maximum(1, (np.floor(np.log2(np.maximum(v, 1).astype(np.float64))).astype(np.int64) // 7) + 1)
    nbytes[v == 0] = 1
    offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    out = np.zeros(int(nbytes.sum()), dtype=np.uint8)
    for b in range(int(nbytes.max())):
        sel = nbytes > b
        byte = ((v[sel] >> np.uint64(7 * b)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(nbytes[sel] > b + 1, 0x80, 0).astype(np.uint8)
        out[offsets[sel] + b] = byte
    return out.tobytes()


def varint_decode(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`varint_encode`; raises :class:`PayloadError` unless ``data`` holds exactly
    ``count`` well-formed numbers."""
    a = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero((a & 0x80) == 0)
    if len(ends) != count or (count and ends[-1] != len(a) - 1) or (count == 0 and len(a)):
        raise PayloadError(f"varint stream holds {len(ends)} complete numbers, expected {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > _MAX_VARINT_BYTES:
        raise PayloadError("varint longer than 5 bytes")
    pos = np.arange(len(a)) - np.repeat(starts, lengths)
    vals = (a & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(vals, starts).astype(np.int64)


# ---- positions ------------------------------------------------------------------------------------
def _index_width(n: int) -> int:
    return 1 if n <= 1 << 8 else 2 if n <= 1 << 16 else 4


def _position_bodies(idx: np.ndarray, n: int) -> dict[int, bytes]:
    """Every exact encoding of sorted positions ``idx`` in ``range(n)``, by layout code."""
    out: dict[int, bytes] = {}
    if len(idx) == n:
        out[0] = b""
    bits = np.zeros(n, dtype=np.uint8)
    bits[idx] = 1
    out[1] = np.packbits(bits, bitorder="little").tobytes()
    out[2] = idx.astype({1: "<u1", 2: "<u2", 4: "<u4"}[_index_width(n)]).tobytes()
    gaps = np.diff(idx, prepend=-1) - 1          # first gap = idx[0]; zero for adjacent positions
    out[3] = varint_encode(gaps)
    return out


def encode_positions(idx: np.ndarray | torch.Tensor, n: int, layout: str | None = None) -> tuple[int, bytes]:
    """(layout code, bytes) for the sorted, unique positions ``idx`` of a length-``n`` tensor;
    the smallest layout unless one is named (``"bitmask"``, ``"indices"``, ``"delta"``, ``"dense"``)."""
    idx = np.asarray(idx, dtype=np.int64)
    bodies = _position_bodies(idx, n)
    if layout is not None:
        code = {v: k for k, v in LAYOUTS.items()}.get(layout)
        if code is None or code not in bodies:
            raise ValueError(f"layout {layout!r} is not available here; choose from "
                             f"{[LAYOUTS[c] for c in bodies]}")
        return code, bodies[code]
    code = min(bodies, key=lambda c: (len(bodies[c]), c))
    return code, bodies[code]


def decode_positions(code: int, body: bytes, k: int, n: int) -> np.ndarray:
    """Sorted positions from a layout body; :class:`PayloadError` unless they are valid and exactly ``k``."""
    if code == 0:
        if body or k != n:
            raise PayloadError("dense layout must carry every value and no positions")
        return np.arange(n, dtype=np.int64)
    if code == 1:
        if len(body) != (n + 7) // 8:
            raise PayloadError(f"bitmask has {len(body)} bytes, expected {(n + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), bitorder="little")
        if bits[n:].any():
            raise PayloadError("bitmask has bits set beyond the tensor")
        idx = np.flatnonzero(bits[:n])
    elif code == 2:
        w = _index_width(n)
        if len(body) != k * w:
            raise PayloadError(f"index list has {len(body)} bytes, expected {k * w}")
        idx = np.frombuffer(body, dtype={1: "<u1", 2: "<u2", 4: "<u4"}[w]).astype(np.int64)
    elif code == 3:
        idx = np.cumsum(varint_decode(body, k) + 1) - 1
    else:
        raise PayloadError(f"unknown position layout {code}")
    if len(idx) != k:
        raise PayloadError(f"positions hold {len(idx)} entries, header says {k}")
    if k and (idx[0] < 0 or idx[-1] >= n or (np.diff(idx) <= 0).any()):
        raise PayloadError("positions are out of range or not strictly increasing")
    return idx


def binary_entropy(d: float) -> float:
    r""":math:`H_b(d) = -d\log_2 d - (1-d)\log_2(1-d)` bits (0 at d = 0 or 1)."""
    if not 0 <= d <= 1:
        raise ValueError(f"density must be in [0, 1], got {d!r}")
    if d in (0, 1):
        return 0.0
    return float(-d * math.log2(d) - (1 - d) * math.log2(1 - d))


def position_entropy_bits(k: int, n: int) -> float:
    r""":math:`\log_2 \binom{n}{k}` bits: what naming k of n positions costs when every k-subset is equally
    likely (positions drawn uniformly at random), the least any code can spend on average then. Position
    sets with structure can cost less; this is a yardstick, not a limit for them."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


# ---- codecs ---------------------------------------------------------------------------------------
def _value_codec(values: str | Codec) -> Codec:
    if isinstance(values, Codec):
        return values
    if values == "float32":
        return Float32Codec()
    if values == "float16":
        return Float16Codec()
    raise ValueError(f"values must be 'float32', 'float16' or a Codec instance, got {values!r}")


class SparseCodec(Codec):
    """Lossless for the positions: sends the *nonzero* entries of each tensor (a pruned model, or
    an update of a pruned model) with the smallest position layout, values via ``values``."""

    codec_id = 10
    name = "sparse"

    def __init__(self, values: str | Codec = "float32", layout: str | None = None) -> None:
        self.values = _value_codec(values)
        self.layout = layout
        if layout is not None and layout not in LAYOUTS.values():
            raise ValueError(f"layout must be one of {list(LAYOUTS.values())} or None, got {layout!r}")
        self.last_layouts: dict[str, str] = {}   # layout chosen per tensor by the last encode (for reports)
        self._chosen: list[str] = []

    def select(self, flat: torch.Tensor) -> np.ndarray:
        """Positions to send: the nonzeros."""
        return torch.nonzero(flat).reshape(-1).numpy()

    def encode_tensor(self, tensor: torch.Tensor) -> bytes:
        flat = tensor.reshape(-1)
        n = flat.numel()
        idx = np.sort(self.select(flat))
        layout = self.layout
        if layout == "dense" and len(idx) != n:
            layout = None   # the dense layout only exists when every entry is kept
        code, pos = encode_positions(idx, n, layout)
        self._chosen.append(LAYOUTS[code])
        vals = self.values.encode_tensor(flat[torch.from_numpy(idx)].to(torch.float32))
        return b"".join([struct.pack("<BI", code, len(idx)), pos, struct.pack("<I", len(vals)), vals])

    def encode(self, tensors):  # noqa: D102 - same as Codec.encode, also records the layouts
        self._chosen = []
        payload = super().encode(tensors)
        self.last_layouts = dict(zip(tensors, self._chosen))
        return payload

    def decode_tensor(self, body: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        if len(body) < 5:
            raise PayloadError("sparse body shorter than its header")
        code, k = struct.unpack("<BI", body[:5])
        if k > n:
            raise PayloadError(f"{k} kept entries in a tensor of {n}")
        if code == 0:
            pos_len = 0
        elif code == 1:
            pos_len = (n + 7) // 8
        elif code == 2:
            pos_len = k * _index_width(n)
        elif code == 3:   # the varint stream ends where the values-length field starts: find k ends
            a = np.frombuffer(body, dtype=np.uint8, offset=5)
            ends = np.flatnonzero((a & 0x80) == 0)
            if k and len(ends) < k:
                raise PayloadError("varint positions truncated")
            pos_len = int(ends[k - 1]) + 1 if k else 0
        else:
            raise PayloadError(f"unknown position layout {code}")
        if len(body) < 5 + pos_len + 4:
            raise PayloadError("sparse body truncated")
        idx = decode_positions(code, body[5:5 + pos_len], k, n)
        (vlen,) = struct.unpack("<I", body[5 + pos_len:9 + pos_len])
        vbody = body[9 + pos_len:]
        if len(vbody) != vlen:
            raise PayloadError(f"values have {len(vbody)} bytes, header says {vlen}")
        vals = self.values.decode_tensor(vbody, (k,), torch.float32)
        out = torch.zeros(n, dtype=torch.float32)
        out[torch.from_numpy(idx)] = vals.reshape(-1).to(torch.float32)
        return out.reshape(shape).to(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(values={self.values.name!r})"


class TopKCodec(SparseCodec):
    r"""Top-k sparsification (lossy): per tensor keep the :math:`k = \lceil \rho n \rceil` entries of
    largest magnitude (at least one), send them as a :class:`SparseCodec` body, drop the rest.
    Pair it with error feedback (``run_federated(..., error_feedback=True)``) so that what is
    dropped is sent later instead of lost (DGC, Lin et al. 2018)."""

    codec_id = 11
    name = "topk"

    def __init__(self, fraction: float | None = None, *, k: int | None = None, values: str | Codec = "float32",
                 layout: str | None = None) -> None:
        if (fraction is None) == (k is None):
            raise ValueError("give exactly one of fraction (share of each tensor kept) or k (entries per tensor)")
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise ValueError(f"k must be a positive integer, got {k!r}")
        super().__init__(values=values, layout=layout)
        self.fraction = None if fraction is None else float(fraction)
        self.k = k

    def k_for(self, n: int) -> int:
        """Entries kept in a tensor of ``n``: ``max(1, ceil(fraction * n))`` or ``min(k, n)``."""
        if n == 0:
            return 0
        if self.k is not None:
            return min(self.k, n)
        return min(n, max(1, math.ceil(self.fraction * n - 1e-9)))

    def select(self, flat: torch.Tensor) -> np.ndarray:
        k = self.k_for(flat.numel())
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        return torch.topk(flat.abs().to(torch.float32), k, sorted=False).indices.numpy()

    def __repr__(self) -> str:
        size = f"fraction={self.fraction}" if self.k is None else f"k={self.k}"
        return f"TopKCodec({size}, values={self.values.name!r})"
