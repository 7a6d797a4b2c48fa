"""SCAFFOLD (helpers.heterogeneity.run_scaffold): the control-variate rule by hand, FedAvg with zero
variates, the variates' bookkeeping and bytes on real Fashion-MNIST slices."""

import dataclasses

import pytest
import torch

from helpers.codecs import Float32Codec, QuantizedCodec
from helpers.data import partition_dirichlet
from helpers.federated import Client, FedConfig, run_federated
from helpers.heterogeneity import effective_steps, local_steps_run, run_scaffold, scaffold_variate_update
from helpers.models import MLP
from helpers.reproducibility import seed_everything
from helpers.training import float_state


def small_mlp(seed=0):
    seed_everything(seed)
    return MLP(hidden=(16,))


def config(**kw):
    base = FedConfig(rounds=1, fraction=1.0, local_steps=6, batch_size=32, lr=0.05, momentum=0.0, seed=1)
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="module")
def parts(small_train):
    return partition_dirichlet(small_train.y, 4, 0.3, seed=0)


def test_effective_steps_by_hand():
    assert effective_steps(5) == 5.0
    # beta = 0.5: (1 - 0.5) / 0.5 + (1 - 0.25) / 0.5 = 1 + 1.5
    assert effective_steps(2, 0.5) == pytest.approx(2.5)
    # a constant gradient moves K_beta * lr * g: simulate heavy-ball momentum by hand
    v, pos = 0.0, 0.0
    for _ in range(20):
        v = 0.9 * v + 1.0
        pos += 0.1 * v
    assert effective_steps(20, 0.9) * 0.1 == pytest.approx(pos)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            effective_steps(bad)
    with pytest.raises(ValueError, match="momentum"):
        effective_steps(3, 1.0)


def test_variate_update_rule_by_hand():
    c_k = {"w": torch.tensor([1.0, -2.0])}
    c = {"w": torch.tensor([0.5, 0.5])}
    x = {"w": torch.tensor([3.0, 3.0])}
    y = {"w": torch.tensor([1.0, 4.0])}
    # c_k - c + (x - y) / (K lr) with K = 4, lr = 0.5: [1 - 0.5 + 2/2, -2 - 0.5 - 1/2]
    out = scaffold_variate_update(c_k, c, x, y, 4, 0.5)
    assert torch.allclose(out["w"], torch.tensor([1.5, -3.0]))
    with pytest.raises(ValueError, match="lr"):
        scaffold_variate_update(c_k, c, x, y, 4, 0.0)
    with pytest.raises(ValueError, match="c has tensors"):
        scaffold_variate_update(c_k, {"v": c["w"]}, x, y, 4, 0.5)


def test_local_steps_run():
    assert local_steps_run(100, config()) == 6
    assert local_steps_run(100, config(local_steps=None, local_epochs=2)) == 8   # ceil(100/32) * 2


def test_first_round_is_fedavg(small_train, small_test, parts):
    """Zero control variates: the first round is FedAvg's, bit for bit (momentum included)."""
    cfg = config(momentum=0.9)
    a = run_federated(small_mlp(), small_train, parts, small_test, cfg)
    b = run_scaffold(small_mlp(), small_train, parts, small_test, cfg)
    for k, v in float_state(a.model).items():
        assert torch.equal(v, float_state(b.model)[k]), k
    assert b.history.final_accuracy == a.history.final_accuracy


def test_variates_follow_the_rule_and_cost_real_bytes(small_train, small_test, parts):
    """After one round of plain SGD each c_k = (x - y_k)/(K lr), y_k the client's own local model;
    c is the n_k-weighted mean of the c_k; the uplink carries two float32 payloads per client."""
    cfg = config()
    run = run_scaffold(small_mlp(), small_train, parts, small_test, cfg)
    x = float_state(small_mlp())
    worker = small_mlp()
    n = sum(len(p) for p in parts)
    for cid, idx in enumerate(parts):
        update, _ = Client(cid, torch.as_tensor(idx)).local_update(worker, x, small_train, cfg, 1)
        for k in x:
            expect = -update[k] / (cfg.local_steps * cfg.lr)
            assert torch.allclose(run.client_variates[cid][k], expect, atol=1e-6), (cid, k)
    for k in x:
        mean = sum(len(p) / n * run.client_variates[i][k] for i, p in enumerate(parts))
        assert torch.allclose(run.c[k], mean, atol=1e-6)
    one = len(Float32Codec().encode(x))
    row = run.history.rows[0]
    assert row.bytes_up == len(parts) * 2 * one          # update + variate, float32 each
    assert row.bytes_down == len(parts) * 2 * one        # model + c


def test_quantized_variates(small_train, small_test, parts):
    """4-bit variates: the client keeps what the server decoded, so c stays the weighted mean of the c_k;
    the uplink is one float32 payload plus one 4-bit payload; accuracy stays close to float32 variates."""
    cfg = config(rounds=3, momentum=0.9, lr=0.02)
    f32 = run_scaffold(small_mlp(), small_train, parts, small_test, cfg)
    q4 = run_scaffold(small_mlp(), small_train, parts, small_test, cfg, variate_codec=QuantizedCodec(4))
    x = float_state(small_mlp())
    expect = len(Float32Codec().encode(x)) + len(QuantizedCodec(4).encode(x))
    assert [r.bytes_up for r in q4.history.rows] == [len(parts) * expect] * 3
    n = sum(len(p) for p in parts)
    for k in x:
        mean = sum(len(p) / n * q4.client_variates[i][k] for i, p in enumerate(parts))
        assert torch.allclose(q4.c[k], mean, atol=1e-5)
    assert abs(q4.history.final_accuracy - f32.history.final_accuracy) < 0.05
    assert q4.history.final_accuracy > 0.5


def test_scaffold_arguments(small_train, small_test, parts):
    with pytest.raises(TypeError, match="config"):
        run_scaffold(small_mlp(), small_train, parts, small_test, {"rounds": 1})
    with pytest.raises(TypeError, match="variate_codec"):
        run_scaffold(small_mlp(), small_train, parts, small_test, config(), variate_codec="q4")
    with pytest.raises(ValueError, match="no clients"):
        run_scaffold(small_mlp(), small_train, [], small_test, config())
