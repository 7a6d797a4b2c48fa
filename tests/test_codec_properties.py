"""Property-based tests (hypothesis) for every codec: arbitrary tensors round-trip, and arbitrary mutations
of valid payloads -- bit flips, truncation, appended bytes, header fields set to extreme values, with and
without a re-computed checksum -- either decode to a valid update or raise ``PayloadError``, never anything
else, in bounded time and memory.

``make test`` runs the ``ci`` profile (about half a minute); ``pytest tests/test_codec_properties.py
--hypothesis-profile=long`` tries many more payloads. The numbers tried and the worst decode time and peak
memory are printed at the end of the run (see ``conftest.py``).
"""

import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from helpers.codecs import (Float16Codec, Float32Codec, PackedIntCodec, PayloadError, QuantizedCodec, SparseCodec,
                            TopKCodec, validate_update)
from helpers.quantization import fake_quantize, max_abs_scale, qmax

from .conftest import FUZZ_STATS

FLOAT_CODECS = {
    "float32": Float32Codec(), "float16": Float16Codec(),
    **{f"q{b}": QuantizedCodec(b) for b in (1, 2, 4, 8, 16)},
    "q4-tensor": QuantizedCodec(4, per_channel=False),
    "sparse": SparseCodec(), "sparse-f16": SparseCodec(values="float16"), "sparse-q2": SparseCodec(values=QuantizedCodec(2)),
    "topk": TopKCodec(0.25), "topk-k3": TopKCodec(k=3),
}

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
magnitudes = st.sampled_from([1e-38, 1e-20, 1e-3, 1.0, 1e3, 1e20, 3e38])


@st.composite
def float_tensors(draw):
    shape = draw(shapes)
    kind = draw(st.sampled_from(["any", "zeros", "scaled"]))
    if kind == "zeros":
        return torch.zeros(shape)
    arr = draw(arrays(np.float32, shape, elements=finite32 if kind == "any" else st.floats(-1, 1, width=32)))
    t = torch.from_numpy(arr.copy())
    return t * draw(magnitudes) if kind == "scaled" else t


@given(name=st.sampled_from(sorted(FLOAT_CODECS)), tensors=st.dictionaries(
    st.text(min_size=1, max_size=8), float_tensors(), min_size=1, max_size=3))
def test_float_codecs_round_trip_arbitrary_tensors(name, tensors):
    codec = FLOAT_CODECS[name]
    tensors = {k: torch.where(torch.isfinite(v), v, torch.zeros_like(v)) for k, v in tensors.items()}
    out = codec.decode(codec.encode(tensors))
    assert list(out) == list(tensors)
    for k, x in tensors.items():
        y = out[k]
        assert y.shape == x.shape and y.dtype == x.dtype
        if name == "float32" or name == "sparse":
            assert torch.equal(y, x)
        elif name in ("float16", "sparse-f16"):
            assert torch.equal(y, x.to(torch.float16).to(torch.float32))
        elif name.startswith("q") and name[1:].split("-")[0].isdigit():
            bits = codec.bits
            per_channel = codec.per_channel and x.dim() >= 2 and x.shape[0] > 0
            assert torch.equal(y, fake_quantize(x, bits, per_channel=per_channel))
            if bits >= 2 and x.numel():
                step = max_abs_scale(x, bits, per_channel)
                bound = (step / 2).reshape(-1, *([1] * (x.dim() - 1))) if per_channel else step / 2
                assert bool(((y - x).abs() <= bound * (1 + 1e-5) + 1e-30).all())
        elif name.startswith("topk"):
            k = codec.k_for(x.numel())
            kept = y.reshape(-1) != 0
            assert int(kept.sum()) <= k
            assert torch.equal(y.reshape(-1)[kept], x.reshape(-1)[kept])
        else:  # sparse with quantized values: zeros stay zero, shape and dtype survive
            assert torch.all(y[x == 0] == 0)


@given(bits=st.sampled_from([2, 3, 4, 8, 16]), data=st.data())
def test_packed_int_codec_round_trips_integer_codes(bits, data):
    q = qmax(bits)
    arr = data.draw(arrays(np.int32, data.draw(shapes), elements=st.integers(-q, q)))
    t = {"codes": torch.from_numpy(arr.copy()), "step": torch.tensor([0.5])}
    out = PackedIntCodec(bits).decode(PackedIntCodec(bits).encode(t))
    assert torch.equal(out["codes"], t["codes"]) and torch.equal(out["step"], t["step"])


# ---- mutations of valid payloads ----------------------------------------------------------------------
REFERENCE = {"layer.weight": torch.linspace(-1, 1, 24).reshape(6, 4), "layer.bias": torch.tensor([0.0, 0.5, -0.25, 1.0]),
             "scale": torch.tensor(2.0)}
FIELD_VALUES = [0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


def _first_entry_offsets(name: str, ndim: int) -> dict[str, tuple[int, str]]:
    """Byte offsets and struct formats of the header fields of the first tensor."""
    o = 8 + 2 + len(name.encode())
    return {"count": (6, "<H"), "codec_id": (5, "<B"), "version": (4, "<B"), "name_len": (8, "<H"),
            "dtype": (o, "<B"), "ndim": (o + 1, "<B"), "dim0": (o + 2, "<I"), "body_len": (o + 2 + 4 * ndim, "<I")}


def _recrc(blob: bytes) -> bytes:
    return blob[:-4] + struct.pack("<I", zlib.crc32(blob[:-4]))


@st.composite
def mutated_payloads(draw):
    name = draw(st.sampled_from(sorted(FLOAT_CODECS)))
    codec = FLOAT_CODECS[name]
    payload = bytearray(codec.encode(REFERENCE))
    kind = draw(st.sampled_from(["flip", "truncate", "append", "field", "overwrite"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(payload) - 1))
            payload[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        payload = payload[:draw(st.integers(0, len(payload) - 1))]
    elif kind == "append":
        payload += draw(st.binary(min_size=1, max_size=64))
    elif kind == "field":
        first = next(iter(REFERENCE))
        offsets = _first_entry_offsets(first, REFERENCE[first].dim())
        field = draw(st.sampled_from(sorted(offsets)))
        pos, fmt = offsets[field]
        value = draw(st.sampled_from(FIELD_VALUES)) & ((1 << (8 * struct.calcsize(fmt))) - 1)
        struct.pack_into(fmt, payload, pos, value)
    else:  # overwrite a run of bytes with arbitrary ones
        start = draw(st.integers(0, len(payload) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        payload[start:start + len(chunk)] = chunk
    if draw(st.booleans()) and len(payload) >= 4:
        payload = bytearray(_recrc(bytes(payload)))   # an attacker recomputes the checksum
    note(f"codec {name}, mutation {kind}")
    return codec, bytes(payload)


@settings(max_examples=max(1500, settings.default.max_examples))
@given(mutated_payloads())
def test_mutated_payloads_decode_to_a_valid_update_or_raise_payload_error(case):
    codec, payload = case
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        out = codec.decode(payload, reference=REFERENCE)
    except PayloadError:
        out = None
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    FUZZ_STATS["payloads"] += 1
    FUZZ_STATS["seconds"] = max(FUZZ_STATS["seconds"], seconds)
    FUZZ_STATS["peak_bytes"] = max(FUZZ_STATS["peak_bytes"], peak)
    if out is not None:
        validate_update(out, REFERENCE)
    assert peak < 256 * 1024 + 64 * len(payload), peak   # the reference is 29 values: nothing may grow large
    assert seconds < 1.0


@pytest.mark.parametrize("codec", list(FLOAT_CODECS.values()), ids=list(FLOAT_CODECS))
def test_every_codec_accepts_its_own_honest_payload_against_the_reference(codec):
    out = codec.decode(codec.encode(REFERENCE), reference=REFERENCE)
    validate_update(out, REFERENCE)
