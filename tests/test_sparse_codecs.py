import math
import struct
import zlib

import numpy as np
import pytest
import torch

from helpers.codecs import (Float32Codec, PayloadError, QuantizedCodec, SparseCodec, TopKCodec, binary_entropy,
                            decode_positions, encode_positions, position_entropy_bits, varint_decode, varint_encode)
from helpers.models import MLP
from helpers.training import float_state


def _sparse(n, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    t[torch.rand(n, generator=g) >= density] = 0
    return t


def test_varint_round_trip_and_sizes():
    v = np.array([0, 1, 127, 128, 16383, 16384, 2 ** 28, 2 ** 34])
    b = varint_encode(v)
    assert len(b) == 1 + 1 + 1 + 2 + 2 + 3 + 5 + 5
    assert np.array_equal(varint_decode(b, len(v)), v)
    with pytest.raises(PayloadError):
        varint_decode(b[:-1], len(v))
    with pytest.raises(PayloadError):
        varint_decode(b"\xff" * 6 + b"\x01", 1)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (300, 0), (1000, 10), (70000, 700), (70000, 40000), (5000, 5000)])
@pytest.mark.parametrize("layout", ["bitmask", "indices", "delta", None])
def test_positions_round_trip_in_every_layout(n, k, layout):
    idx = np.sort(np.random.default_rng(n + k).choice(n, size=k, replace=False))
    code, body = encode_positions(idx, n, layout)
    assert np.array_equal(decode_positions(code, body, k, n), idx)


def test_encoder_picks_the_smallest_layout():
    n = 100_000
    for k, expected in [(100, "delta"), (30_000, "bitmask"), (n, "dense")]:
        idx = np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))
        sizes = {name: len(encode_positions(idx, n, name)[1]) for name in ("bitmask", "indices", "delta")}
        code, body = encode_positions(idx, n)
        assert len(body) == min(sizes.values()) if k < n else len(body) == 0
        assert {0: "dense", 1: "bitmask", 2: "indices", 3: "delta"}[code] == expected
    # tiny tensor: one-byte indices beat both the bitmask and varints of large gaps
    code, _ = encode_positions(np.array([3, 200]), 256)
    assert code == 2


def test_sparse_codec_round_trips_a_pruned_state_exactly():
    torch.manual_seed(0)
    state = float_state(MLP())
    for k in state:
        if k.endswith("weight"):
            state[k][state[k].abs() < state[k].abs().quantile(0.8)] = 0
    codec = SparseCodec()
    payload = codec.encode(state)
    out = codec.decode(payload)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert codec.last_layouts["net.1.bias"] == "dense" and codec.last_layouts["net.1.weight"] == "bitmask"
    # the pruned model at 80% sparsity stores in well under a third of float32
    assert len(payload) * 3 < len(Float32Codec().encode(state))
    half = SparseCodec(values="float16")
    out16 = half.decode(half.encode(state))
    assert all(torch.allclose(out16[k], state[k], rtol=2 ** -10, atol=1e-7) for k in state)
    assert all(torch.equal(out16[k] == 0, state[k] == 0) for k in state)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_topk_keeps_the_k_largest_and_round_trips(fraction):
    t = {"w": torch.randn(40, 50), "b": torch.randn(7)}
    codec = TopKCodec(fraction)
    out = codec.decode(codec.encode(t))
    for name, x in t.items():
        k = max(1, math.ceil(fraction * x.numel() - 1e-9))
        kept = out[name] != 0
        assert int(kept.sum()) == k
        assert torch.equal(out[name][kept], x[kept])                      # values exact in float32
        if k < x.numel():
            assert x[kept].abs().min() >= x[~kept].abs().max()              # the largest ones


def test_topk_with_fixed_k_and_error_feedback_residual():
    from helpers.error_feedback import ErrorFeedback
    codec = TopKCodec(k=3)
    ef = ErrorFeedback()
    u = {"w": torch.tensor([5.0, -4.0, 3.0, 0.5, -0.4, 0.3])}
    sent = codec.decode(codec.encode(ef.compensate(0, u)))
    assert torch.equal(sent["w"], torch.tensor([5.0, -4.0, 3.0, 0, 0, 0]))
    ef.remember(0, u, sent)
    nxt = ef.compensate(0, {"w": torch.zeros(6)})
    assert torch.equal(codec.decode(codec.encode(nxt))["w"], torch.tensor([0, 0, 0, 0.5, -0.4, 0.3]))


def test_topk_cost_is_far_below_float32_and_near_the_entropy_bound():
    torch.manual_seed(0)
    state = float_state(MLP())
    n = sum(t.numel() for t in state.values())
    p = TopKCodec(0.01).encode(state)
    assert len(p) * 30 < len(Float32Codec().encode(state))
    bound_bits = sum(position_entropy_bits(max(1, math.ceil(0.01 * t.numel())), t.numel()) + 32 * max(1, math.ceil(0.01 * t.numel()))
                     for t in state.values())
    assert bound_bits / 8 < len(p) < 1.25 * bound_bits / 8
    assert TopKCodec(0.01, values="float16").encode(state).__len__() < len(p)


def test_entropy_helpers():
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0) == 0.0
    assert position_entropy_bits(1, 1024) == pytest.approx(10.0)
    assert position_entropy_bits(500, 100_000) == pytest.approx(100_000 * binary_entropy(0.005), rel=0.01)
    with pytest.raises(ValueError):
        binary_entropy(1.5)


@pytest.mark.parametrize("kwargs", [{"fraction": 0.0}, {"fraction": -0.1}, {"fraction": 1.5}, {"k": 0}, {"k": -3},
                                    {"k": 2.5}, {}, {"fraction": 0.1, "k": 3}])
def test_bad_topk_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        TopKCodec(**kwargs)


def test_bad_value_format_and_layout_are_rejected():
    with pytest.raises(ValueError, match="values"):
        SparseCodec(values="int3")
    with pytest.raises(ValueError, match="layout"):
        SparseCodec(layout="zigzag")


def _reframe(payload: bytes, edit) -> bytes:
    body = bytearray(payload[:-4])
    edit(body)
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_forged_sparse_bodies_are_rejected_even_with_a_valid_checksum():
    codec = SparseCodec(layout="indices")
    payload = codec.encode({"w": torch.tensor([0.0, 1.0, 0.0, 2.0])})
    body_start = payload.index(b"w") + 1 + 2 + 4 + 4          # dtype, ndim, shape, body length
    # k larger than the tensor
    bad = _reframe(payload, lambda b: b.__setitem__(slice(body_start + 1, body_start + 5), struct.pack("<I", 9)))
    with pytest.raises(PayloadError):
        codec.decode(bad)
    # positions not increasing (swap the two one-byte indices 1, 3 -> 3, 1)
    def swap(b):
        b[body_start + 5], b[body_start + 6] = b[body_start + 6], b[body_start + 5]
    with pytest.raises(PayloadError, match="increasing"):
        codec.decode(_reframe(payload, swap))
    # index out of range
    with pytest.raises(PayloadError):
        codec.decode(_reframe(payload, lambda b: b.__setitem__(body_start + 6, 4)))
    # unknown layout code
    with pytest.raises(PayloadError, match="layout"):
        codec.decode(_reframe(payload, lambda b: b.__setitem__(body_start, 7)))
    # a top-k payload is not a sparse payload (different codec ids)
    with pytest.raises(PayloadError, match="codec"):
        SparseCodec().decode(TopKCodec(0.5).encode({"w": torch.randn(4)}))


def test_truncations_are_rejected():
    payload = TopKCodec(0.1).encode({"w": torch.randn(1000)})
    for cut in (1, 5, 20, len(payload) - 1):
        with pytest.raises(PayloadError):
            TopKCodec(0.1).decode(payload[:-cut])


@pytest.mark.parametrize("layout", ["bitmask", "indices", "delta"])
def test_the_sparse_decoder_itself_rejects_short_bodies(layout):
    """Below the framing (which a checksum would already protect): every cut of a sparse body fails."""
    codec = SparseCodec(layout=layout)
    t = _sparse(1000, 0.1)
    body = codec.encode_tensor(t)
    assert torch.equal(codec.decode_tensor(body, (1000,), torch.float32), t)
    for cut in range(1, len(body)):
        with pytest.raises(PayloadError):
            codec.decode_tensor(body[:-cut], (1000,), torch.float32)


def test_values_can_use_chapter_2_quantizer():
    t = {"w": _sparse(5000, 0.2).reshape(50, 100)}
    q = SparseCodec(values=QuantizedCodec(8, per_channel=False))
    payload = q.encode(t)
    out = q.decode(payload)["w"]
    kept = t["w"] != 0
    assert torch.all(out[~kept] == 0)                   # nothing appears where nothing was sent
    err = (out - t["w"]).abs()
    assert 0 < err.max() <= t["w"].abs().max() / 127 * 0.51             # really quantized, within half a step
    # 8-bit values: positions + 1 byte per kept value, below float16 (2 bytes) and float32 (4 bytes)
    assert len(payload) < len(SparseCodec(values="float16").encode(t)) < len(SparseCodec().encode(t))
    assert len(payload) < len(SparseCodec().encode(t)) - 2.5 * int(kept.sum())
