"""Chapter 6's helpers: the simulated clock and deadline policies (helpers.systems), FedProx and
personalization (helpers.heterogeneity), and the poisoning attacks (helpers.attacks)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from helpers.attacks import GaussianNoise, SignFlip, choose_attackers, robust_strategy
from helpers.codecs import Float32Codec, QuantizedCodec
from helpers.data import partition_iid
from helpers.federated import Client, FedConfig, Server, run_federated
from helpers.heterogeneity import FedProx, fine_tune_curve
from helpers.models import MLP
from helpers.reproducibility import seed_everything
from helpers.systems import DeadlineFedAvg, DeviceProfile, draw_profiles, time_to_accuracy
from helpers.training import evaluate, float_state

FAST = 1e12   # a link so fast its transfer time is negligible


def tiny_mlp(seed=0):
    seed_everything(seed)
    return MLP(hidden=(8,))


def config(**kw):
    base = FedConfig(rounds=1, fraction=1.0, local_steps=5, batch_size=32, lr=0.05, momentum=0.9, seed=3)
    return dataclasses.replace(base, **kw)


# ---------------------------------------------------------------- the clock


def test_device_profile_round_by_hand():
    p = DeviceProfile(samples_per_s=100, up_bps=8000, down_bps=16000)
    # download 8*2000/16000 = 1 s, compute 50/100 = 0.5 s, upload 8*1000/8000 = 1 s
    assert p.round_s(down_bytes=2000, samples=50, up_bytes=1000) == pytest.approx(2.5)


def test_device_profile_rejects_bad_values():
    with pytest.raises(ValueError, match="up_bps"):
        DeviceProfile(100, 0, 1)


def test_draw_profiles_is_seeded_and_lognormal():
    a, b = draw_profiles(2000, seed=1), draw_profiles(2000, seed=1)
    assert a == b and a != draw_profiles(2000, seed=2)
    up = np.array([p.up_bps for p in a])
    assert np.median(up) == pytest.approx(5e6, rel=0.1)
    assert all(p.down_bps == pytest.approx(4 * p.up_bps) for p in a)


def _server_and_sizes(sizes):
    model = tiny_mlp()
    server = Server(model, uplink=Float32Codec())
    payload = len(Float32Codec().encode(float_state(model)))
    return server, payload


def test_clock_on_a_hand_computed_round():
    """Three clients; the round lasts as long as the slowest one's download + compute + upload."""
    server, nbytes = _server_and_sizes([400, 400, 400])
    bits = 8 * nbytes
    # client 0: 1 s down, 160 samples at 160/s = 1 s, 2 s up -> 4 s; client 1: 0.5 + 0.5 + 1 = 2 s; client 2: 6 s
    profiles = [DeviceProfile(160, bits / 2, bits), DeviceProfile(320, bits, 2 * bits),
                DeviceProfile(160 / 4, bits, bits)]   # client 2: 1 + 4 + 1 = 6 s
    cfg = config()
    wait = DeadlineFedAvg(profiles, cfg, [400, 400, 400], policy="wait")
    wait.before_round(1, server)
    assert wait.sample_clients(3, 1.0, np.random.default_rng(0)) == [0, 1, 2]
    assert wait.log[0].seconds == pytest.approx(6.0) and wait.clock == pytest.approx(6.0)
    assert wait.log[0].down_bytes == wait.log[0].up_bytes == nbytes

    drop = DeadlineFedAvg(profiles, cfg, [400, 400, 400], policy="drop", deadline=5.0)
    drop.before_round(1, server)
    assert drop.sample_clients(3, 1.0, np.random.default_rng(0)) == [0, 1]
    assert drop.log[0].dropped == [2] and drop.log[0].seconds == 5.0   # the server waits until the deadline

    # nobody late: the round ends with the last report, before the deadline
    early = DeadlineFedAvg(profiles, cfg, [400, 400, 400], policy="drop", deadline=10.0)
    early.before_round(1, server)
    early.sample_clients(3, 1.0, np.random.default_rng(0))
    assert early.log[0].seconds == pytest.approx(6.0)

    # partial work: client 2 has 5 - 1 - 1 = 3 s for compute = 120 samples = 3 full batches of 32 (of 5)
    part = DeadlineFedAvg(profiles, cfg, [400, 400, 400], policy="partial", deadline=5.0)
    part.before_round(1, server)
    assert part.sample_clients(3, 1.0, np.random.default_rng(0)) == [0, 1, 2]
    assert part.log[0].steps == [5, 5, 3] and part.log[0].dropped == []
    assert part.log[0].seconds == pytest.approx(max(4.0, 2.0, 1 + 96 / 40 + 1))


def test_compression_shortens_the_round():
    server, nbytes = _server_and_sizes([400])
    profiles = [DeviceProfile(1e6, 1e5, 4e5)]
    times = []
    for codec in (Float32Codec(), QuantizedCodec(4)):
        server.uplink = codec
        s = DeadlineFedAvg(profiles, config(), [400], policy="wait")
        s.before_round(1, server)
        s.sample_clients(1, 1.0, np.random.default_rng(0))
        times.append(s.log[0].seconds)
    assert times[1] < 0.5 * times[0]


def test_dropped_straggler_update_is_not_averaged(small_train, small_test):
    parts = partition_iid(small_train.y, 3, seed=0)
    cfg = config(rounds=2)
    profiles = [DeviceProfile(1e6, FAST, FAST), DeviceProfile(1e6, FAST, FAST), DeviceProfile(1.0, FAST, FAST)]
    init = tiny_mlp()
    strategy = DeadlineFedAvg(profiles, cfg, [len(p) for p in parts], policy="drop", deadline=1.0,
                              norm_bound=None)
    run = run_federated(init, small_train, parts, small_test, cfg, strategy=strategy)
    # the same rounds with only clients 0 and 1 in the federation
    ref = run_federated(init, small_train, parts[:2], small_test, cfg)
    full = run_federated(init, small_train, parts, small_test, cfg)
    for k, v in float_state(run.model).items():
        assert torch.allclose(v, float_state(ref.model)[k], atol=1e-6), k
    assert not all(torch.allclose(v, float_state(full.model)[k]) for k, v in float_state(run.model).items())
    assert [t.dropped for t in strategy.log] == [[2], [2]]
    assert run.history.column("clients") == [2, 2]


def test_partial_work_equals_fewer_local_steps(small_train, small_test):
    parts = partition_iid(small_train.y, 2, seed=0)
    cfg = config(local_steps=5)
    # client 1 computes 32 samples/s over fast links: a deadline of 3.5 s leaves it 3 steps
    profiles = [DeviceProfile(1e6, FAST, FAST), DeviceProfile(32.0, FAST, FAST)]
    init = tiny_mlp()
    strategy = DeadlineFedAvg(profiles, cfg, [len(p) for p in parts], policy="partial", deadline=3.5,
                              norm_bound=None)
    run = run_federated(init, small_train, parts, small_test, cfg, strategy=strategy)
    assert strategy.log[0].steps == [5, 3]
    # by hand: client 0's 5-step update and client 1's 3-step update, weighted by sample counts
    start = float_state(init)
    worker = tiny_mlp()
    u0, _ = Client(0, parts[0]).local_update(worker, start, small_train, cfg, 1)
    u1, _ = Client(1, parts[1]).local_update(worker, start, small_train, dataclasses.replace(cfg, local_steps=3), 1)
    n0, n1 = len(parts[0]), len(parts[1])
    for k, v in float_state(run.model).items():
        expected = start[k] + (n0 * u0[k] + n1 * u1[k]) / (n0 + n1)
        assert torch.allclose(v, expected, atol=1e-6), k


def test_deadline_policy_arguments():
    cfg = config()
    p = [DeviceProfile(1, 1, 1)]
    with pytest.raises(ValueError, match="policy"):
        DeadlineFedAvg(p, cfg, [10], policy="hurry", deadline=1.0)
    with pytest.raises(ValueError, match="deadline"):
        DeadlineFedAvg(p, cfg, [10], policy="drop")
    with pytest.raises(ValueError, match="local_steps"):
        DeadlineFedAvg(p, config(local_steps=None), [10], policy="partial", deadline=1.0)
    with pytest.raises(ValueError, match="client_sizes"):
        DeadlineFedAvg(p, cfg, [10, 10], policy="wait")


def test_time_to_accuracy():
    server, _ = _server_and_sizes([400])
    s = DeadlineFedAvg([DeviceProfile(1e6, FAST, FAST)], config(), [400], policy="drop", deadline=2.0)
    for r in (1, 2, 3):
        s.before_round(r, server)
        s.sample_clients(1, 1.0, np.random.default_rng(0))
    clocks = [t.clock for t in s.log]
    assert time_to_accuracy(s.log, [0.5, 0.7, 0.8], 0.7) == clocks[1]
    assert time_to_accuracy(s.log, [0.5, 0.7, 0.8], 0.9) == math.inf


# ---------------------------------------------------------------- FedProx and personalization


def test_fedprox_step_by_hand():
    model = tiny_mlp(0)
    server = Server(model)
    prox = FedProx(mu=2.0, config=config(lr=0.1))
    prox.before_round(1, server)     # anchor = the global model, c = 0.1 * 2 = 0.2
    local = tiny_mlp(1)              # some other weights v
    v = float_state(local)
    prox.after_local_step(local)
    for name, p in local.named_parameters():
        assert torch.allclose(p.detach(), (v[name] + 0.2 * server.state[name]) / 1.2, atol=1e-7)


def test_fedprox_mu_zero_is_fedavg(small_train, small_test):
    parts = partition_iid(small_train.y, 2, seed=0)
    cfg = config()
    init = tiny_mlp()
    a = run_federated(init, small_train, parts, small_test, cfg, strategy=FedProx(0.0, cfg))
    b = run_federated(init, small_train, parts, small_test, cfg)
    for k, v in float_state(a.model).items():
        assert torch.equal(v, float_state(b.model)[k])


def test_fedprox_keeps_clients_closer(small_train, small_test):
    parts = partition_iid(small_train.y, 2, seed=0)
    cfg = config(local_steps=20)
    init = tiny_mlp()
    start = float_state(init)
    dist = []
    for strategy in (None, FedProx(5.0, cfg)):
        run = run_federated(init, small_train, parts, small_test, cfg, strategy=strategy)
        dist.append(sum(float((v - start[k]).pow(2).sum()) for k, v in float_state(run.model).items()))
    assert dist[1] < 0.8 * dist[0]


def test_fine_tune_curve_starts_at_the_global_model(small_train):
    model = tiny_mlp()
    tune, ev = torch.arange(0, 300), torch.arange(300, 600)
    curve = fine_tune_curve(model, small_train, tune, ev, [0, 10, 40], lr=0.05)
    assert curve[0] == evaluate(model, small_train.subset(ev))[1]
    assert curve[-1] > curve[0] + 0.2     # 40 steps of a fresh model learn something
    with pytest.raises(ValueError, match="ascending"):
        fine_tune_curve(model, small_train, tune, ev, [10, 5], lr=0.05)


# ---------------------------------------------------------------- attacks


def honest_update(seed=0):
    torch.manual_seed(seed)
    return {"a": 0.01 * torch.randn(8, 4), "b": 0.01 * torch.randn(4)}


def test_sign_flip_is_a_valid_reversed_payload():
    u = honest_update()
    codec = Float32Codec()
    attack = SignFlip([1], codec, scale=10.0)
    payload = codec.encode(u)
    assert attack(1, 0, payload) is payload                  # an honest client passes untouched
    evil = codec.decode(attack(1, 1, payload), reference=u)  # validates against the reference
    for k in u:
        assert torch.allclose(evil[k], -10.0 * u[k])


def test_attacks_survive_quantized_uplink():
    u = honest_update()
    codec = QuantizedCodec(4)
    model = MLP(hidden=(4,))
    state = float_state(model)
    u = {k: 0.01 * torch.randn_like(v) for k, v in state.items()}
    server = Server(model, uplink=QuantizedCodec(4))
    for attack in (SignFlip([0], codec), GaussianNoise([0], codec, seed=1)):
        assert server.receive(attack(1, 0, codec.encode(u)), 1, 0) is not None
    assert server.rejected == []


def test_gaussian_noise_has_the_stated_norm():
    u = {"a": torch.randn(300, 100)}
    codec = Float32Codec()
    noisy = codec.decode(GaussianNoise([0], codec, scale=5.0, seed=2)(1, 0, codec.encode(u)))
    ratio = float(noisy["a"].norm() / u["a"].norm())
    assert ratio == pytest.approx(5.0, rel=0.05)


def test_choose_attackers_and_rules():
    assert choose_attackers(10, 0.2, seed=0) == choose_attackers(10, 0.2, seed=0)
    assert len(choose_attackers(10, 0.2, seed=0)) == 2 and choose_attackers(10, 0.0, seed=0) == []
    with pytest.raises(ValueError, match="fraction"):
        choose_attackers(10, 0.5, seed=0)
    assert robust_strategy("fedavg").norm_bound is None
    assert robust_strategy("clip").norm_action == "clip"
    with pytest.raises(ValueError, match="rule"):
        robust_strategy("krum")
