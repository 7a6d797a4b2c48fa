"""A server that no upload can crash, exhaust or poison: crafted payloads with *valid* checksums
(a CRC is not a signature), poisoned dtypes and sizes, and bad arguments that must fail early and clearly."""

import math
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch

from helpers import seed_everything
from helpers.aggregation import (CoordinateMedian, FedAvg, TrimmedMean, WeightedMean, bound_norms, fedavg,
                                 update_norm)
from helpers.codecs import (MAGIC, Float16Codec, Float32Codec, PackedIntCodec, PayloadError, QuantizedCodec,
                            SparseCodec, TopKCodec)
from helpers.codecs.format import _DTYPE_CODES, VERSION
from helpers.data import partition_iid
from helpers.distillation import kd_loss
from helpers.federated import FedConfig, Server, run_federated
from helpers.models import MLP
from helpers.quantization import quantize, unpack_codes
from helpers.training import evaluate, float_state, train_centralized

CODECS = [Float32Codec(), Float16Codec(), QuantizedCodec(4), QuantizedCodec(1), SparseCodec(), TopKCodec(0.1),
          SparseCodec(values=QuantizedCodec(2))]


def forge(codec_id: int, entries: list[tuple[str, torch.dtype, tuple[int, ...], bytes]]) -> bytes:
    """A payload in the book's layout with a correct CRC-32: exactly what an attacker can send."""
    parts = [MAGIC, struct.pack("<BBH", VERSION, codec_id, len(entries))]
    for name, dtype, shape, body in entries:
        nb = name.encode()
        parts += [struct.pack("<H", len(nb)), nb, struct.pack("<BB", _DTYPE_CODES[dtype], len(shape)),
                  struct.pack(f"<{len(shape)}I", *shape), struct.pack("<I", len(body)), body]
    blob = b"".join(parts)
    return blob + struct.pack("<I", zlib.crc32(blob))


@pytest.fixture
def model():
    seed_everything(0)
    return MLP(hidden=(32,))


def _measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return seconds, peak


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_a_tiny_payload_claiming_a_huge_tensor_is_rejected_fast_and_cheaply(codec, model):
    # 16384 x 16384 float32 = 1 GiB claimed; the sparse body says "0 kept entries, delta layout"
    body = struct.pack("<BI", 3, 0) + struct.pack("<I", 0)
    payload = forge(codec.codec_id, [("net.1.weight", torch.float32, (16384, 16384), body)])
    assert len(payload) < 64
    server = Server(model, uplink=codec)
    seconds, peak = _measure(lambda: server.receive(payload, 1, 0))
    assert server.rejected and "shape" in server.rejected[0][2] or "elements" in server.rejected[0][2]
    assert peak < 2_000_000, peak            # no large allocation (the model itself is ~100 kB)
    assert seconds < 0.5, seconds
    # without a reference the codec still refuses absurd claims before allocating
    with pytest.raises(PayloadError):
        codec.decode(payload)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float64, torch.bool])
def test_an_update_declared_with_another_dtype_is_rejected(dtype, model):
    state = float_state(model)
    codec = Float32Codec()
    entries = [(k, dtype if k == "net.1.weight" else v.dtype, tuple(v.shape),
                np.full(v.numel(), 1e30, "<f4").tobytes()) for k, v in state.items()]
    server = Server(model, uplink=codec)
    assert server.receive(forge(codec.codec_id, entries), 1, 0) is None
    assert "declared" in server.rejected[0][2]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_updates_are_rejected(value, model):
    update = {k: torch.full_like(v, value) for k, v in float_state(model).items()}
    server = Server(model)
    assert server.receive(Float32Codec().encode(update), 1, 0) is None
    assert "NaN or infinite" in server.rejected[0][2]


def test_decoding_failures_of_any_kind_become_rejections(monkeypatch, model):
    def explode(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(Float32Codec, "decode_tensor", explode)
    server = Server(model)
    payload = Float32Codec.encode(Float32Codec(), float_state(model))
    assert server.receive(payload, 1, 0) is None
    assert "MemoryError" in server.rejected[0][2]


def test_unpack_codes_memory_is_linear_with_a_small_constant():
    n = 2_000_000
    codes = torch.randint(-7, 8, (n,), dtype=torch.int32)
    from helpers.quantization import pack_codes

    body = pack_codes(codes, 4)
    out = []
    _, peak = _measure(lambda: out.append(unpack_codes(body, n, 4)))
    assert torch.equal(out[0], codes)
    # the int32 result itself is 4 bytes per code; the old (n, bits) int64 matrix alone was 32 bytes per code
    assert peak < 7 * n, peak / n


def test_a_huge_finite_update_is_dropped_by_the_norm_bound_and_the_round_equals_the_round_without_it(
        small_train, small_test, model):
    parts = partition_iid(small_train.y[:2000], 5, seed=0)
    cfg = FedConfig(rounds=2, lr=0.05, momentum=0.9, batch_size=64, local_steps=5)
    small_test = small_test.subset(torch.arange(200))
    huge = Float32Codec().encode({k: torch.full_like(v, 1e30) for k, v in float_state(model).items()})
    garbage = b"not a payload"

    attacked = run_federated(model, small_train, parts, small_test, cfg,
                             transmit=lambda r, cid, p: huge if cid == 2 else p)
    absent = run_federated(model, small_train, parts, small_test, cfg,
                           transmit=lambda r, cid, p: garbage if cid == 2 else p)
    assert attacked.history.column("bounded") == [1, 1] and attacked.history.column("rejected") == [0, 0]
    assert absent.history.column("rejected") == [1, 1]
    a, b = float_state(attacked.model), float_state(absent.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the honest run is never touched by the default bound
    honest = run_federated(model, small_train, parts, small_test, cfg)
    assert honest.history.column("bounded") == [0, 0]


def test_clip_mode_keeps_the_aggregate_within_the_honest_range():
    g = torch.Generator().manual_seed(0)
    honest = [{"w": torch.randn(50, generator=g) * 0.01} for _ in range(9)]
    evil = {"w": torch.full((50,), 1e30)}
    ups, ws, hit = bound_norms(honest + [evil], [1.0] * 10, 10.0, action="clip")
    assert hit == 1 and update_norm(ups[-1]) == pytest.approx(10 * np.median([update_norm(u) for u in honest + [evil]]),
                                                              rel=1e-5)
    agg = FedAvg(norm_bound=10.0, norm_action="clip").aggregate(honest + [evil], [1.0] * 10)
    assert update_norm(agg) < 10 * max(update_norm(u) for u in honest)


def test_the_aggregate_has_the_reference_dtype_whatever_the_updates_say():
    a = {"w": torch.ones(3, dtype=torch.float16)}
    b = {"w": torch.full((3,), 0.3, dtype=torch.float32)}
    like = {"w": torch.zeros(3, dtype=torch.float32)}
    out = fedavg([a, b], [1, 1], like=like)
    assert out["w"].dtype == torch.float32
    assert torch.allclose(out["w"], torch.full((3,), 0.65))


def test_one_bit_quantization_of_an_empty_tensor_and_sparse_values():
    qt = quantize(torch.zeros(0), 1)
    assert torch.isfinite(qt.scale).all()
    codec = SparseCodec(values=QuantizedCodec(1))
    state = {"zero": torch.zeros(4, 3), "w": torch.tensor([0.0, 1.5, -2.0])}
    out = codec.decode(codec.encode(state), reference=state)
    assert torch.equal(out["zero"], state["zero"])


def test_robust_aggregators_against_hand_computation():
    ups = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, -5.0])}, {"w": torch.tensor([3.0, 0.0])},
           {"w": torch.tensor([100.0, 1.0])}]
    assert torch.equal(CoordinateMedian()(ups, [1] * 4)["w"], torch.tensor([2.5, 0.5]))
    assert torch.equal(TrimmedMean(0.25)(ups, [1] * 4)["w"], torch.tensor([2.5, 0.5]))
    assert torch.allclose(WeightedMean()(ups, [1, 1, 1, 1])["w"], torch.tensor([26.5, 1.5]))


# ---- bad arguments fail before any work, with the parameter's name -------------------------------
@pytest.mark.parametrize("kwargs, name", [
    ({"lr": float("nan")}, "lr"), ({"lr": float("inf")}, "lr"), ({"rounds": 1.5}, "rounds"),
    ({"rounds": True}, "rounds"), ({"momentum": -0.1}, "momentum"), ({"seed": -1}, "seed"),
    ({"local_steps": 0}, "local_steps"), ({"fraction": float("nan")}, "fraction"),
])
def test_fedconfig_names_the_bad_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FedConfig(**kwargs)


def test_bad_arguments_are_named(small_train, small_test, model):
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 10), torch.zeros(2, 10), temperature=float("inf"))
    with pytest.raises(ValueError, match="indices"):
        train_centralized(model, small_train, small_test, epochs=1, indices=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="scale"):
        quantize(torch.ones(4), 4, scale=-1.0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, small_test.subset(torch.tensor([], dtype=torch.long)))
    cfg = FedConfig(rounds=1)
    for bad in ([torch.tensor([0, 1, -1])], [torch.tensor([0, len(small_train)])]):
        with pytest.raises(ValueError, match=r"partition\[0\]"):
            run_federated(model, small_train, bad, small_test, cfg)
    with pytest.raises(ValueError, match="test set"):
        run_federated(model, small_train, [torch.arange(10)], small_test.subset(torch.tensor([], dtype=torch.long)), cfg)
    with pytest.raises(ValueError, match="updates\\[1\\] has tensors"):
        fedavg([{"a": torch.ones(2)}, {"b": torch.ones(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fedavg([{"a": torch.ones(2)}, {"a": torch.ones(3)}], [1, 1])
    with pytest.raises(ValueError, match="65,535"):
        Float32Codec().encode({"x" * 70_000: torch.ones(1)})
    with pytest.raises(ValueError, match="norm_bound"):
        FedAvg(norm_bound=0)
    with pytest.raises(ValueError, match="trim"):
        TrimmedMean(0.5)
    with pytest.raises(TypeError, match="config"):
        run_federated(model, small_train, [torch.arange(10)], small_test, {"rounds": 1})
    assert math.isfinite(kd_loss(torch.zeros(2, 10), torch.zeros(2, 10), torch.tensor([0, 1]), temperature=4.0).item())


def test_packed_int_codec_rejects_mismatched_kinds():
    codec = PackedIntCodec(4)
    payload = forge(codec.codec_id, [("c", torch.int8, (4,), struct.pack("<BB", 0, 32) + b"\x00" * 16)])
    with pytest.raises(PayloadError):
        codec.decode(payload)


def test_the_held_out_bad_inputs_raise_clear_errors_naming_the_parameter(small_train):
    """Four inputs a new user tried, each of which used to fail deep inside numpy or torch."""
    from helpers.data import label_histogram
    from helpers.federated import Client
    from helpers.models import SmallCNN
    from helpers.quantization import export_integer, integer_model, swap_to_lsq

    with pytest.raises(ValueError, match="labels is empty.*num_classes"):
        label_histogram(torch.zeros(0, dtype=torch.long), [])
    assert label_histogram(torch.zeros(0, dtype=torch.long), [torch.zeros(0, dtype=torch.long)],
                           num_classes=3).tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match=r"partition\[1\]"):
        label_histogram(small_train.y, [torch.arange(3), torch.tensor([len(small_train)])])

    # Server.apply: one update (so check_updates has nothing to compare against) missing a tensor
    seed_everything(0)
    server = Server(SmallCNN())
    update = {k: torch.zeros_like(v) for k, v in server.state.items()}
    before = server.state
    del update["features.0.bias"]
    with pytest.raises(ValueError, match=r"updates\[0\].*features\.0\.bias"):
        server.apply([update], [1.0])
    assert all(torch.equal(before[k], v) for k, v in server.state.items())   # nothing was applied
    wrong_shape = {k: torch.zeros(3) if k == "features.0.bias" else torch.zeros_like(v)
                   for k, v in server.state.items()}
    with pytest.raises(ValueError, match=r"updates\[0\]\['features\.0\.bias'\] has shape"):
        server.apply([wrong_shape], [1.0])

    # integer_model with an export of another architecture
    exported = export_integer(swap_to_lsq(MLP(hidden=(16,)), 4))
    with pytest.raises(ValueError, match="exported.*template.*SmallCNN"):
        integer_model(SmallCNN(), exported)
    with pytest.raises(TypeError, match="template"):
        integer_model("SmallCNN", exported)

    # Client.local_update with another model's state: ValueError naming the tensor, before any training
    client = Client(0, torch.arange(64))
    mlp_state = float_state(MLP(hidden=(16,)))
    with pytest.raises(ValueError, match="start_state"):
        client.local_update(SmallCNN(), mlp_state, small_train, FedConfig(rounds=1), 1)
    cnn_state = float_state(SmallCNN())
    cnn_state["classifier.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"start_state\['classifier\.2\.weight'\] has shape"):
        client.local_update(SmallCNN(), cnn_state, small_train, FedConfig(rounds=1), 1)


# ---------------------------------------------------------------- ALIE: an attack inside the honest spread
from helpers.attacks import ALIE, alie_update, alie_z, robust_strategy  # noqa: E402
from helpers.data import partition_dirichlet  # noqa: E402


def test_alie_z_and_update_by_hand():
    # m = 10, a = 2: s = floor(6) - 2 = 4, z = Phi^-1(6/10)
    assert alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)
    assert alie_z(10, 1) == pytest.approx(0.0, abs=1e-12)          # s = 5: Phi^-1(1/2)
    ups = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}, {"w": torch.tensor([2.0, 3.0])}]
    # mean [2, 1], population std [sqrt(2/3), sqrt(2)]
    out = alie_update(ups, 1.5)["w"]
    assert torch.allclose(out, torch.tensor([2 - 1.5 * math.sqrt(2 / 3), 1 - 1.5 * math.sqrt(2)]))
    for bad in ((10, 0), (10, 10), (3, -1)):
        with pytest.raises(ValueError):
            alie_z(*bad)
    with pytest.raises(ValueError, match="z"):
        alie_update(ups, float("nan"))
    with pytest.raises(TypeError, match="strategy"):
        ALIE("median", [1], Float32Codec())
    with pytest.raises(TypeError, match="codec"):
        ALIE(FedAvg(), [1], "float32")


def test_alie_evades_the_norm_bound_and_moves_the_median(small_train, small_test):
    """On real data: ALIE's crafted update is never bounded, arrives as a valid payload's decoding, replaces
    exactly the attackers' updates, and pulls the coordinate-wise median away from the honest run's."""
    parts = partition_dirichlet(small_train.y, 10, 0.5, seed=0)
    cfg = FedConfig(rounds=2, fraction=1.0, local_steps=5, batch_size=32, lr=0.02, momentum=0.9, seed=0)

    def run(strategy):
        seed_everything(0)
        return run_federated(MLP(hidden=(32,)), small_train, parts, small_test, cfg, strategy=strategy)

    norm = ALIE(FedAvg(), [3, 7], Float32Codec(), z=1.0)
    attacked = run(norm)
    assert attacked.history.column("bounded") == [0, 0] and norm.z_used == [1.0, 1.0]
    honest_med = run(robust_strategy("median"))
    med = ALIE(robust_strategy("median"), [3, 7], QuantizedCodec(8))
    attacked_med = run(med)
    assert med.z_used == [pytest.approx(alie_z(10, 2))] * 2
    a, b = float_state(attacked_med.model), float_state(honest_med.model)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the wrapper changes nothing without attackers in the round
    none = run(ALIE(robust_strategy("median"), [], Float32Codec()))
    assert all(torch.equal(v, float_state(none.model)[k]) for k, v in b.items())


def test_the_attack_grid_task_names_bad_arguments_and_its_sign_flip_hurts_fedavg(small_train, small_test):
    """Chapter 6's attack-grid run: bad codec/attack names fail before any training; on real data two
    sign-flipping clients in ten (scale 10) cost plain FedAvg accuracy, while the trimmed mean keeps most of it."""
    from helpers.chapters import ch6
    parts = partition_dirichlet(small_train.y, 10, 0.5, seed=0)
    cfg = FedConfig(rounds=3, fraction=1.0, local_steps=5, batch_size=32, lr=0.02, momentum=0.9, seed=0)
    kw = dict(seed=0, train=small_train, test=small_test, partition=parts, config=cfg)
    with pytest.raises(ValueError, match="codec"):
        ch6.attack_task(**kw, rule="fedavg", codec="q3")
    with pytest.raises(ValueError, match="attack"):
        ch6.attack_task(**kw, rule="fedavg", attack="backdoor", fraction=0.2)
    clean = ch6.attack_task(**kw, rule="fedavg")
    flipped = ch6.attack_task(**kw, rule="fedavg", attack="signflip", fraction=0.2)
    trimmed = ch6.attack_task(**kw, rule="trimmed", attack="signflip", fraction=0.2, codec="q4")
    assert clean["attackers"] == [] and len(flipped["attackers"]) == 2 and flipped["rejected"] == 0
    assert flipped["acc"] < clean["acc"] - 0.1, (flipped, clean)
    assert trimmed["acc"] > flipped["acc"] + 0.1, (trimmed, flipped)
