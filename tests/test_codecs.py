import struct

import pytest
import torch

from helpers.codecs import Float16Codec, Float32Codec, PayloadError, validate_update
from helpers.training import float_state
from helpers.models import SmallCNN


@pytest.fixture
def state():
    torch.manual_seed(0)
    return float_state(SmallCNN())


def test_float32_round_trip_is_exact(state):
    codec = Float32Codec()
    out = codec.decode(codec.encode(state))
    assert list(out) == list(state)
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_float32_payload_size_is_header_plus_4_bytes_per_value(state):
    payload = Float32Codec().encode(state)
    n = sum(t.numel() for t in state.values())
    header = 4 + 4 + 4 + sum(2 + len(k) + 2 + 4 * t.dim() + 4 for k, t in state.items())
    assert len(payload) == header + 4 * n


def test_float16_halves_the_body_and_rounds_within_2_to_minus_11(state):
    p32, p16 = Float32Codec().encode(state), Float16Codec().encode(state)
    n = sum(t.numel() for t in state.values())
    assert len(p32) - len(p16) == 2 * n
    out = Float16Codec().decode(p16)
    for k, t in state.items():
        assert out[k].dtype == torch.float32
        assert torch.allclose(out[k], t, rtol=2 ** -11, atol=1e-7)
    exact = {"w": torch.tensor([0.5, -2.0, 1024.0])}  # representable values survive exactly
    assert torch.equal(Float16Codec().decode(Float16Codec().encode(exact))["w"], exact["w"])


def test_scalar_and_empty_tensors_round_trip():
    t = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)}
    out = Float32Codec().decode(Float32Codec().encode(t))
    assert out["scalar"].shape == () and float(out["scalar"]) == 3.5 and out["empty"].shape == (0, 4)


@pytest.mark.parametrize("cut", [0, 3, 11, 100, -1])
def test_truncated_payload_is_rejected(state, cut):
    payload = Float32Codec().encode(state)
    with pytest.raises(PayloadError):
        Float32Codec().decode(payload[:cut])


def test_every_single_byte_corruption_is_rejected():
    payload = Float32Codec().encode({"w": torch.randn(3, 4), "b": torch.randn(4)})
    for i in range(len(payload)):
        bad = bytearray(payload)
        bad[i] ^= 0x40
        with pytest.raises(PayloadError):
            Float32Codec().decode(bytes(bad))


def test_wrong_codec_and_garbage_are_rejected(state):
    with pytest.raises(PayloadError, match="codec"):
        Float16Codec().decode(Float32Codec().encode(state))
    with pytest.raises(PayloadError, match="magic"):
        Float32Codec().decode(b"GARBAGE-GARBAGE-GARBAGE")
    with pytest.raises(PayloadError, match="bytes"):
        Float32Codec().decode("not bytes")


def test_a_forged_header_with_a_valid_checksum_is_still_rejected():
    """An attacker can recompute the CRC; the body-length checks must still hold."""
    import zlib
    payload = bytearray(Float32Codec().encode({"w": torch.randn(4)}))
    body = payload[:-4]
    # claim shape (5,) while the body holds 4 floats; recompute the checksum
    pos = body.index(b"w") + 1 + 2
    body[pos:pos + 4] = struct.pack("<I", 5)
    forged = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(PayloadError, match="body"):
        Float32Codec().decode(forged)


def test_validate_update_checks_names_shapes_and_finiteness(state):
    validate_update(state, state)
    with pytest.raises(PayloadError, match="missing"):
        validate_update({k: v for k, v in list(state.items())[1:]}, state)
    bad = dict(state)
    first = next(iter(bad))
    bad[first] = torch.zeros(1)
    with pytest.raises(PayloadError, match="shape"):
        validate_update(bad, state)
    bad[first] = torch.full_like(state[first], float("nan"))
    with pytest.raises(PayloadError, match="NaN"):
        validate_update(bad, state)
