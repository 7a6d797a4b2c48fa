"""Tests for helpers.quantization and the quantizing codecs, on real Fashion-MNIST updates."""

import copy
import math
import struct
import zlib

import pytest
import torch

from helpers import quantization as Q
from helpers.codecs import Float32Codec, PackedIntCodec, PayloadError, QuantizedCodec
from helpers.codecs.quantized import QATUploadCodec
from helpers.federated import FedConfig, run_federated
from helpers.training import evaluate, float_state, local_train
from helpers.models import MLP


@pytest.fixture(scope="module")
def update(small_train):
    """A real client update: 100 SGD steps of an MLP on Fashion-MNIST, minus its start."""
    torch.manual_seed(0)
    model = MLP(hidden=(64,))
    start = float_state(model)
    local_train(model, small_train, torch.arange(3200), epochs=1, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    return {k: v - start[k] for k, v in float_state(model).items()}


def framing_bytes(tensors):
    """Bytes of the shared framing (magic, version, id, count, per-tensor header, CRC)."""
    return 4 + 4 + 4 + sum(2 + len(k) + 2 + 4 * t.dim() + 4 for k, t in tensors.items())


@pytest.mark.parametrize("bad", [0, 9, 12, 32, -2, 2.5, "4", True, None])
def test_bad_bit_widths_raise_clear_errors(bad):
    with pytest.raises(ValueError, match="bits must be one of"):
        Q.check_bits(bad)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedCodec(bad)
    with pytest.raises(ValueError, match="bits must be one of"):
        Q.quantize(torch.ones(3), bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_deterministic_round_trip_error_is_at_most_half_a_step(update, bits, per_channel):
    for name, w in update.items():
        qt = Q.quantize(w, bits, per_channel=per_channel)
        err = (Q.dequantize(qt) - w).abs()
        step = qt.scale.reshape(-1, *([1] * (w.dim() - 1))) if qt.scale.numel() > 1 else qt.scale
        # Δ/2, plus float32's own rounding of w/Δ and of q·Δ (a few ulps of |w|, visible only at 16 bits)
        assert bool((err <= step / 2 + 4 * 2.0 ** -23 * w.abs()).all()), name
        assert int(qt.codes.abs().max()) <= Q.qmax(bits)
        assert int(qt.codes.abs().max()) == Q.qmax(bits)  # max-abs scale uses the full range
    if per_channel:
        assert Q.quantize(update["net.1.weight"], bits, per_channel=True).scale.shape == (64,)
        assert Q.quantize(update["net.1.bias"], bits, per_channel=True).scale.shape == (1,)


def test_one_bit_is_a_scaled_sign(update):
    w = update["net.1.weight"]
    out = Q.fake_quantize(w, 1)
    assert torch.equal(out.sign(), torch.where(w >= 0, 1.0, -1.0))
    assert torch.allclose(out.abs(), w.abs().mean().expand_as(w))


def test_stochastic_rounding_is_unbiased_and_deterministic_rounding_is_not(update):
    w = update["net.3.weight"].reshape(-1)[:500]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([Q.fake_quantize(w, 2, stochastic=True, generator=gen) for _ in range(2000)])
    step = float(Q.max_abs_scale(w, 2))
    mean_err = (draws.mean(0) - w).abs()
    # per value the draw has std <= step/2, so the 2000-draw mean has std <= step/(2*sqrt(2000)) ~ 0.011 step
    assert float(mean_err.max()) < 0.06 * step
    assert float((Q.fake_quantize(w, 2) - w).abs().max()) > 0.3 * step   # deterministic: a fixed bias
    assert abs(float((draws.mean(0) - w).mean())) < 0.005 * step


def test_stochastic_rounding_needs_a_generator():
    with pytest.raises(ValueError, match="Generator"):
        Q.quantize(torch.ones(4), 4, stochastic=True)


@pytest.mark.parametrize("bits", Q.VALID_BITS)
def test_pack_unpack_round_trip_and_exact_size(bits):
    g = torch.Generator().manual_seed(bits)
    qm = Q.qmax(bits)
    for n in [0, 1, 7, 13, 1001]:
        if bits == 1:
            codes = torch.randint(0, 2, (n,), generator=g) * 2 - 1
        else:
            codes = torch.randint(-qm, qm + 1, (n,), generator=g)
        body = Q.pack_codes(codes, bits)
        assert len(body) == math.ceil(n * bits / 8)
        assert torch.equal(Q.unpack_codes(body, n, bits), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_payload_is_exactly_header_plus_packed_codes(update, bits, per_channel):
    codec = QuantizedCodec(bits, per_channel=per_channel)
    payload = codec.encode(update)
    body = 0
    for t in update.values():
        k = t.shape[0] if per_channel and t.dim() >= 2 else 1
        body += 2 + 4 * k + math.ceil(t.numel() * bits / 8)
    assert len(payload) == framing_bytes(update) + body
    out = codec.decode(payload)
    for name, w in update.items():
        assert out[name].dtype == torch.float32 and out[name].shape == w.shape
        assert torch.allclose(out[name], Q.fake_quantize(w, bits, per_channel=per_channel and w.dim() >= 2))
    n = sum(t.numel() for t in update.values())
    assert len(payload) < len(Float32Codec().encode(update)) * bits / 32 + 4 * 200 + 200


def test_stochastic_codec_is_reproducible_from_its_seed(update):
    a = QuantizedCodec(2, stochastic=True, seed=3).encode(update)
    assert a == QuantizedCodec(2, stochastic=True, seed=3).encode(update)
    assert a != QuantizedCodec(2, stochastic=True, seed=4).encode(update)


def _reframe(payload: bytes, offset: int, value: int) -> bytes:
    """Change one byte and recompute the CRC, so the codec's own checks must catch it."""
    blob = bytearray(payload[:-4])
    blob[offset] = value
    return bytes(blob) + struct.pack("<I", zlib.crc32(bytes(blob)))


def test_corrupted_payloads_raise_payload_errors():
    t = {"w": torch.linspace(-1, 1, 12).reshape(3, 4)}
    codec = QuantizedCodec(2)
    p = codec.encode(t)
    body_at = 4 + 4 + 2 + 1 + 2 + 8 + 4       # framing before the body of the one tensor "w"
    assert p[body_at] == 2 and p[body_at + 1] == 1
    with pytest.raises(PayloadError, match="checksum"):
        codec.decode(p[:20] + bytes([p[20] ^ 0xFF]) + p[21:])
    with pytest.raises(PayloadError, match="truncated"):
        codec.decode(p[:-7])
    with pytest.raises(PayloadError, match="quantized with 4 bits"):
        codec.decode(_reframe(p, body_at, 4))
    with pytest.raises(PayloadError, match="scale mode"):
        codec.decode(_reframe(p, body_at + 1, 7))
    with pytest.raises(PayloadError, match="outside the 2-bit range"):
        codec.decode(_reframe(p, len(p) - 5, 0xFF))   # code 3 does not exist in a symmetric 2-bit grid
    nan = struct.pack("<f", float("nan"))
    blob = bytearray(p[:-4])
    blob[body_at + 2:body_at + 6] = nan
    with pytest.raises(PayloadError, match="finite"):
        codec.decode(bytes(blob) + struct.pack("<I", zlib.crc32(bytes(blob))))
    with pytest.raises(PayloadError, match="codec id"):
        codec.decode(Float32Codec().encode(t))
    with pytest.raises(ValueError, match="NaN"):
        codec.encode({"w": torch.tensor([1.0, float("inf")])})


def test_lsq_fast_backward_matches_the_reference_written_with_ste(update):
    torch.manual_seed(0)
    for per_channel in [False, True]:
        layer = Q.LSQLinear(torch.nn.Linear(784, 64), bits=2, per_channel=per_channel)
        grads = []
        for fn in (layer.wq.forward, layer.wq.reference_forward):
            w = layer.weight.detach().clone().requires_grad_()
            layer.wq.step.grad = None
            out = fn(w)
            (out * update["net.1.weight"]).sum().backward()
            grads.append((out.detach(), w.grad, layer.wq.step.grad.clone()))
        (o1, gw1, gs1), (o2, gw2, gs2) = grads
        assert torch.equal(o1, o2)
        assert torch.allclose(gw1, gw2) and torch.allclose(gs1, gs2, rtol=1e-4, atol=1e-7)
        assert float(gs1.abs().sum()) > 0


def test_qat_export_gives_the_same_predictions_and_packed_size(small_train, small_test):
    torch.manual_seed(0)
    model = Q.swap_to_lsq(MLP(hidden=(64,)), bits=4, per_channel=True)
    assert set(Q.lsq_layers(model)) == {"net.1", "net.3"}
    step0 = model.net[1].wq.step.detach().clone()
    local_train(model, small_train, torch.arange(3200), epochs=1, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.net[1].wq.step.detach(), step0)   # the step was learned
    exported = Q.export_integer(model)
    codec = PackedIntCodec(4)
    payload = codec.encode(exported)
    n_w = 784 * 64 + 64 * 10
    floats = 64 + 10 + 64 + 10                # steps (per channel) + biases, float32
    assert len(payload) == framing_bytes(exported) + 2 * len(exported) + math.ceil(784 * 64 * 4 / 8) \
        + math.ceil(64 * 10 * 4 / 8) + 4 * floats
    assert len(payload) < 0.14 * n_w * 4
    int_model = Q.integer_model(model, codec.decode(payload))
    with torch.no_grad():
        fq, iq = model.eval()(small_test.x), int_model.eval()(small_test.x)
    assert torch.equal(fq.argmax(1), iq.argmax(1))
    assert torch.allclose(fq, iq, atol=1e-4)
    assert evaluate(int_model, small_test)[1] == evaluate(model, small_test)[1] > 0.6
    assert isinstance(int_model.net[1], Q.IntegerLinear) and int_model.net[1].codes.dtype == torch.int8


def test_ptq_and_lsq_refuse_bad_arguments():
    with pytest.raises(ValueError):
        Q.ptq_model(MLP(), 0)
    with pytest.raises(ValueError, match="LSQ needs bits"):
        Q.swap_to_lsq(MLP(), 1)
    with pytest.raises(ValueError, match="floating-point"):
        Q.max_abs_scale(torch.ones(3, dtype=torch.int32), 4)


def test_quantized_uplink_in_federated_run_costs_what_the_codec_says(small_train, small_test):
    torch.manual_seed(0)
    model = MLP(hidden=(32,))
    parts = [torch.arange(0, 1000), torch.arange(1000, 2000)]
    cfg = FedConfig(rounds=2, lr=0.05, seed=0)
    run = run_federated(model, small_train, parts, small_test, cfg, uplink=QuantizedCodec(4), error_feedback=True)
    expected = len(QuantizedCodec(4).encode(float_state(model)))
    assert run.history.bytes_up_per_client == expected
    assert run.history.final_accuracy > 0.6 and not run.server.rejected


# ---- step rules: max-abs, MSE-optimal, LSQ's initial step -----------------------------------------

def _sq_err(w, bits, step):
    return float(((Q.fake_quantize(w, bits, scale=step) - w) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_mse_scale_is_never_worse_than_max_abs_and_matches_a_fine_search(update, bits):
    w = update["net.1.weight"]
    per_ch = Q.mse_scale(w, bits, per_channel=True)
    top = Q.max_abs_scale(w, bits, per_channel=True)
    assert per_ch.shape == (64,) and bool((per_ch > 0).all()) and bool((per_ch <= top).all())
    for c in range(0, 64, 9):   # per channel: ≤ max-abs, and within 2% of a 2,000-point search (grid: 100 points)
        row = w[c]
        best = _sq_err(row, bits, per_ch[c])
        assert best <= _sq_err(row, bits, top[c]) * (1 + 1e-6)
        steps = top[c] * torch.arange(1, 2001) / 2000
        fine = float((torch.round((row / steps[:, None]).clamp(-Q.qmax(bits), Q.qmax(bits))) * steps[:, None] - row)
                     .pow(2).sum(1).min())
        assert best <= fine * 1.02 + 1e-12
    one = Q.mse_scale(w, bits)
    assert one.shape == (1,) and _sq_err(w, bits, one) <= _sq_err(w, bits, Q.max_abs_scale(w, bits))


def test_mse_scale_of_a_gaussian_matches_the_known_optimal_ternary_step():
    # the MSE-optimal 3-level uniform quantizer of N(0, σ²) has step ≈ 1.224 σ (Max 1960)
    w = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) * 0.05
    assert abs(float(Q.mse_scale(w, 2, num=400)) / 0.05 - 1.224) < 0.02
    # at 2 bits max-abs wastes the grid on the tails: the optimal step is far smaller, the error far lower
    assert float(Q.mse_scale(w, 2)) < 0.4 * float(Q.max_abs_scale(w, 2))
    assert _sq_err(w, 2, Q.mse_scale(w, 2)) < 0.3 * _sq_err(w, 2, Q.max_abs_scale(w, 2))


def test_mse_scale_edge_cases_and_bad_arguments():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]])
    s = Q.mse_scale(w, 4, per_channel=True)
    assert float(s[1]) == 0.0 and float(s[0]) > 0                # an all-zero channel keeps step 0
    assert torch.allclose(Q.mse_scale(w, 1, per_channel=True), w.abs().mean(1))   # 1 bit: mean|w| exactly
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num"):
            Q.mse_scale(w, 4, num=bad)
    with pytest.raises(ValueError, match="NaN"):
        Q.mse_scale(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="step must be one of"):
        Q.ptq_model(MLP(), 4, step="best")


def test_lsq_init_scale_is_the_step_lsq_starts_from(update):
    w = update["net.1.weight"]
    layer = Q.LSQLinear(torch.nn.Linear(784, 64), bits=2, per_channel=True)
    assert torch.allclose(layer.wq.step.detach(), Q.lsq_init_scale(layer.weight, 2, per_channel=True).clamp_min(1e-8))
    assert torch.allclose(Q.lsq_init_scale(w, 4), 2 * w.abs().mean() / math.sqrt(7))


@pytest.mark.parametrize("bits", [2, 4])
def test_ptq_step_rules_order_by_weight_error(small_train, bits):
    torch.manual_seed(0)
    model = MLP(hidden=(64,))
    local_train(model, small_train, torch.arange(3200), epochs=1, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    w = model.net[1].weight.detach()
    err = {rule: float(((Q.ptq_model(model, bits, step=rule).net[1].weight.detach() - w) ** 2).sum()) for rule in Q.STEP_RULES}
    assert err["mse"] <= err["maxabs"] and err["mse"] <= err["lsq"] * (1 + 1e-6)
    assert torch.equal(Q.ptq_model(model, bits).net[1].weight, Q.ptq_model(model, bits, step="maxabs").net[1].weight)


# ---- frozen vs learned steps, and integer export at every bit width ---------------------------------

def test_frozen_step_stays_put_while_the_weights_train(small_train):
    torch.manual_seed(0)
    model = Q.swap_to_lsq(MLP(hidden=(32,)), bits=2, per_channel=True, learn_step=False)
    step0, w0 = model.net[1].wq.step.detach().clone(), model.net[1].weight.detach().clone()
    local_train(model, small_train, torch.arange(1600), epochs=1, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.net[1].wq.step.detach(), step0)
    assert not torch.equal(model.net[1].weight.detach(), w0)
    assert "learn_step=False" in repr(model.net[1].wq)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
def test_export_then_integer_model_matches_the_fake_quant_model_at_every_bit_width(small_train, small_test, bits):
    torch.manual_seed(bits)
    model = Q.swap_to_lsq(MLP(hidden=(48,)), bits=bits, per_channel=True)
    local_train(model, small_train, torch.arange(800), epochs=1, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    exported = Q.export_integer(model)
    codes = exported["net.1.codes"]
    assert codes.dtype == Q.code_dtype(bits) == (torch.int8 if bits <= 8 else torch.int16)
    assert torch.equal(codes.to(torch.int32), model.net[1].wq.codes(model.net[1].weight))
    assert int(codes.abs().max()) <= Q.qmax(bits)
    int_model = Q.integer_model(model, exported)
    assert int_model.net[1].codes.dtype == codes.dtype and int_model.net[3].codes.dtype == codes.dtype
    with torch.no_grad():
        fq, iq = model.eval()(small_test.x), int_model.eval()(small_test.x)
    assert torch.allclose(fq, iq, atol=1e-4, rtol=1e-5)
    assert torch.equal(fq.argmax(1), iq.argmax(1))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_export_round_trip_keeps_codes_and_predictions(small_test, bits):
    torch.manual_seed(0)
    model = Q.swap_to_lsq(MLP(hidden=(48,)), bits=bits, per_channel=True)
    exported = Q.export_integer(model)
    decoded = PackedIntCodec(bits).decode(PackedIntCodec(bits).encode(exported))
    assert decoded["net.1.codes"].dtype == torch.int8 and torch.equal(decoded["net.1.codes"], exported["net.1.codes"])
    with torch.no_grad():
        assert torch.equal(Q.integer_model(model, decoded)(small_test.x), Q.integer_model(model, exported)(small_test.x))


def test_integer_layers_refuse_float_codes():
    with pytest.raises(TypeError, match="integer"):
        Q.IntegerLinear(torch.zeros(3, 4), torch.ones(3), None)
    with pytest.raises(TypeError, match="integer"):
        Q.IntegerConv2d(torch.nn.Conv2d(1, 2, 3), torch.zeros(2, 1, 3, 3), torch.ones(2), None)


# ---- the QAT uplink: quantized weights, bit-packed ------------------------------------------------------

@pytest.fixture()
def qat_pair(small_train):
    """(global state, one client's update) of a 4-bit per-channel LSQ MLP after 50 local steps."""
    torch.manual_seed(0)
    model = Q.swap_to_lsq(MLP(hidden=(64,)), bits=4, per_channel=True)
    base = float_state(model)
    local_train(model, small_train, torch.arange(1600), epochs=1, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    return base, {k: v - base[k] for k, v in float_state(model).items()}, model


def test_qat_upload_sends_the_clients_deployable_weights_bit_packed(qat_pair):
    base, update, model = qat_pair
    codec = QATUploadCodec(4)
    codec.set_base(base)
    payload = codec.encode(update)
    # body: 4-bit codes of the two weight matrices, float32 for steps and biases, 2 header bytes per tensor
    floats = 64 + 10 + 64 + 10
    assert len(payload) == framing_bytes(update) + 2 * len(update) + math.ceil(784 * 64 / 2) \
        + math.ceil(64 * 10 / 2) + 4 * floats
    assert len(payload) <= 0.14 * len(Float32Codec().encode(update))
    fresh = QATUploadCodec(4)                      # the server: no base, decodes against its reference
    out = fresh.decode(payload, reference=base)
    for layer in ("net.1", "net.3"):
        w_hat = base[f"{layer}.weight"] + out[f"{layer}.weight"]
        q = model.get_submodule(layer).wq
        assert torch.allclose(w_hat, q(model.get_submodule(layer).weight).detach(), atol=1e-6)  # the fake-quant weight
        assert torch.equal(out[f"{layer}.wq.step"], update[f"{layer}.wq.step"])
        assert torch.equal(out[f"{layer}.bias"], update[f"{layer}.bias"])
    assert torch.equal(codec.decode(payload)["net.1.weight"], out["net.1.weight"])  # without reference: the base


def test_qat_upload_refuses_what_it_cannot_trust(qat_pair):
    base, update, _ = qat_pair
    codec = QATUploadCodec(4)
    with pytest.raises(ValueError, match="set_base"):
        codec.encode(update)
    with pytest.raises(PayloadError, match="global state"):
        QATUploadCodec(4).decode(b"FLBK" + bytes(20))
    codec.set_base(base)
    payload = codec.encode(update)
    with pytest.raises(PayloadError, match="codec id"):
        codec.decode(Float32Codec().encode(update), reference=base)
    with pytest.raises(PayloadError, match="quantized|kind|bits"):
        QATUploadCodec(2).decode(payload, reference=base)
    small = {k: (v[:32] if k.startswith("net.1") else v) for k, v in base.items()}
    with pytest.raises(PayloadError, match="shape|limit"):   # a smaller model: bounded before any body is read
        codec.decode(payload, reference=small)
    # a step update that makes the client's step negative: the encoder refuses it, and so does the server
    bad = dict(update)
    bad["net.3.wq.step"] = -2 * base["net.3.wq.step"]
    with pytest.raises(ValueError, match="positive"):
        codec.encode(bad)
    wire = {k: bad[k] for k in update}
    for layer in ("net.1", "net.3"):
        w, step = base[f"{layer}.weight"] + update[f"{layer}.weight"], base[f"{layer}.wq.step"] + update[f"{layer}.wq.step"]
        wire[f"{layer}.weight"] = Q.lsq_codes(w, step, 4).to(torch.int8)
    forged = PackedIntCodec.encode(codec, wire)   # framed by hand, bypassing QATUploadCodec.encode's check
    with pytest.raises(PayloadError, match="positive"):
        codec.decode(forged, reference=base)
    with pytest.raises(ValueError, match="bits must be"):
        QATUploadCodec(1)


def test_federated_qat_with_the_packed_uplink(small_train, small_test):
    torch.manual_seed(0)
    for learn in (True, False):
        model = Q.swap_to_lsq(MLP(hidden=(32,)), bits=4, per_channel=True, learn_step=learn)
        strategy = Q.QATFedAvg()
        parts = [torch.arange(0, 1500), torch.arange(1500, 3000)]
        run = run_federated(model, small_train, parts, small_test, FedConfig(rounds=2, lr=0.05, seed=0),
                            uplink=QATUploadCodec(4), strategy=strategy)
        steps = strategy.finish(run.model)
        assert not run.server.rejected and len(steps) == 3
        assert run.history.bytes_up_per_client <= 0.14 * len(Float32Codec().encode(float_state(model)))
        moved = not torch.equal(steps[0]["net.1.wq.step"], steps[-1]["net.1.wq.step"])
        assert moved == learn
        assert run.history.final_accuracy > 0.6


def test_packed_export_at_16_bits_round_trips(small_test):
    torch.manual_seed(0)
    model = Q.swap_to_lsq(MLP(hidden=(48,)), bits=16, per_channel=True)
    exported = Q.export_integer(model)
    decoded = PackedIntCodec(16).decode(PackedIntCodec(16).encode(exported))
    assert decoded["net.1.codes"].dtype == torch.int16 and torch.equal(decoded["net.1.codes"], exported["net.1.codes"])


def test_qat_strategy_keeps_learned_steps_above_its_floor():
    model = Q.swap_to_lsq(MLP(hidden=(16,)), bits=2, per_channel=True)
    frozen = Q.swap_to_lsq(MLP(hidden=(16,)), bits=2, per_channel=True, learn_step=False)
    with torch.no_grad():
        model.net[1].wq.step[:3] = torch.tensor([-0.5, 0.0, 1e-9])
        frozen.net[1].wq.step[0] = -0.5
    strategy = Q.QATFedAvg(min_step=1e-4)
    strategy.after_local_step(model)
    strategy.after_local_step(frozen)          # a frozen step is never touched
    assert torch.equal(model.net[1].wq.step[:3].detach(), torch.full((3,), 1e-4))
    assert strategy.floor_hits == 3 and float(frozen.net[1].wq.step[0]) == -0.5
    assert strategy.needs_after_step
    for bad in (0, -1.0, float("nan"), "1e-6"):
        with pytest.raises(ValueError, match="min_step"):
            Q.QATFedAvg(min_step=bad)


def test_own_step_rate_is_plain_sgd_on_the_step_and_the_weights_keep_their_optimizer(small_train):
    x, y = small_train.x[:64], small_train.y[:64]
    loss = torch.nn.functional.cross_entropy
    torch.manual_seed(0)
    for lr_step in (1e-3, 0.5):
        own = Q.swap_to_lsq(MLP(hidden=(32,)), bits=2, per_channel=False, init="maxabs", step_lr=lr_step)
        step = own.net[1].wq.step
        assert torch.allclose(step.detach(), Q.max_abs_scale(own.net[1].weight, 2))
        opt = torch.optim.SGD(own.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            before = step.detach().clone()
            grad = torch.autograd.grad(loss(own(x), y), step)[0]     # dL/dΔ (autograd.grad fills no .grad)
            opt.zero_grad(set_to_none=True)
            loss(own(x), y).backward()
            opt.step()
            # Δ <- Δ - lr_step * dL/dΔ, no momentum: the weights' optimizer never saw the step's gradient
            assert torch.allclose(step.detach(), before - lr_step * grad, rtol=1e-5, atol=1e-9)
            assert step.grad is None and step not in opt.state
            assert own.net[1].weight in opt.state                     # the weights keep their momentum
        copied = copy.deepcopy(own)                                   # hooks do not travel with a copy: re-hooked
        before = copied.net[1].wq.step.detach().clone()
        loss(copied(x), y).backward()
        assert copied.net[1].wq.step.grad is None and not torch.equal(copied.net[1].wq.step.detach(), before)
    assert "step_lr=0.5" in repr(own.net[1].wq)
    default = Q.swap_to_lsq(MLP(hidden=(32,)), bits=2)
    loss(default(x), y).backward()
    assert default.net[1].wq.step.grad is not None                   # the default leaves the step to the optimizer
    for bad in (0, -1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="step_lr"):
            Q.swap_to_lsq(MLP(), 2, step_lr=bad)
    with pytest.raises(ValueError, match="learn_step"):
        Q.swap_to_lsq(MLP(), 2, learn_step=False, step_lr=0.1)
    with pytest.raises(ValueError, match="init"):
        Q.swap_to_lsq(MLP(), 2, init="minmax")
