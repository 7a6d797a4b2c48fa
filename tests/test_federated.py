import math

import pytest
import torch
from torch import nn

from helpers import seed_everything
from helpers.codecs import Float16Codec
from helpers.data import partition_dirichlet, partition_iid
from helpers.error_feedback import ErrorFeedback
from helpers.aggregation import fedavg
from helpers.federated import Client, FedConfig, run_federated
from helpers.training import evaluate, float_state, train_centralized
from helpers.models import MLP, SmallCNN, count_parameters, model_bytes


def _rand_update(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def test_fedavg_of_identical_updates_is_that_update():
    u = _rand_update(0)
    out = fedavg([u, u, u], [1, 50, 7])
    assert all(torch.allclose(out[k], u[k], atol=1e-6) for k in u)


def test_fedavg_weights_follow_sample_counts():
    a, b = _rand_update(1), _rand_update(2)
    out = fedavg([a, b], [100, 300])
    for k in a:
        assert torch.allclose(out[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6)
    # the unweighted mean is different: weighting matters
    assert not torch.allclose(out["w"], (a["w"] + b["w"]) / 2)


def test_fedavg_bad_arguments():
    with pytest.raises(ValueError):
        fedavg([], [])
    with pytest.raises(ValueError):
        fedavg([_rand_update(0)], [1, 2])
    with pytest.raises(ValueError):
        fedavg([_rand_update(0)], [0])


def test_client_is_not_a_module():
    assert not isinstance(Client(0, torch.arange(5)), nn.Module)


def test_fedconfig_rejects_bad_values():
    for kwargs in ({"rounds": 0}, {"fraction": 0.0}, {"fraction": 1.5}, {"lr": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            FedConfig(**kwargs)


def test_models_sizes():
    cnn = SmallCNN()
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(cnn) == sum(p.numel() for p in cnn.parameters())
    assert model_bytes(cnn) == 4 * count_parameters(cnn)
    assert model_bytes(cnn, bits_per_parameter=2) == math.ceil(count_parameters(cnn) / 4)
    mlp = MLP(hidden=(200,))
    assert count_parameters(mlp) == 784 * 200 + 200 + 200 * 10 + 10


def test_short_federated_run_learns_and_counts_bytes(small_train, small_test):
    seed_everything(0)
    model = SmallCNN()
    before = float_state(model)
    parts = partition_iid(small_train.y, 5, seed=0)
    cfg = FedConfig(rounds=3, fraction=0.6, local_epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=0)
    run = run_federated(model, small_train, parts, small_test, cfg)
    h = run.history
    assert len(h) == 3 and h.final_accuracy > 0.6, h.column("test_acc")  # chance is 0.1
    # the caller's model is untouched (runs start from the same init)
    assert all(torch.equal(before[k], v) for k, v in float_state(model).items())
    # 3 of 5 clients each round; every upload is one float32 payload of the model
    from helpers.codecs import Float32Codec
    size = len(Float32Codec().encode(before))
    assert h.column("clients") == [3, 3, 3]
    assert h.column("bytes_up") == [3 * size] * 3 and h.column("bytes_down") == [3 * size] * 3
    assert h.bytes_up_per_client == size
    sizes = [len(p) for p in parts]
    assert all(3 * min(sizes) <= s <= 3 * max(sizes) for s in h.column("samples"))


def test_run_is_deterministic(small_train, small_test):
    parts = partition_dirichlet(small_train.y, 4, 0.5, seed=0)
    cfg = FedConfig(rounds=2, batch_size=64, lr=0.05, seed=3)
    seed_everything(0)
    model = MLP(hidden=(32,))
    a = run_federated(model, small_train, parts, small_test, cfg)
    b = run_federated(model, small_train, parts, small_test, cfg)
    assert a.history.column("test_acc") == b.history.column("test_acc")


def test_corrupted_payload_is_skipped_and_round_goes_on(small_train, small_test):
    seed_everything(0)
    model = MLP(hidden=(32,))
    parts = partition_iid(small_train.y, 4, seed=0)
    cfg = FedConfig(rounds=2, batch_size=64, lr=0.05, seed=0)

    def flip_client_2(rnd, cid, payload):
        if cid == 2 and rnd == 1:
            bad = bytearray(payload)
            bad[len(bad) // 2] ^= 0xFF
            return bytes(bad)
        return payload

    clean = run_federated(model, small_train, parts, small_test, cfg)
    attacked = run_federated(model, small_train, parts, small_test, cfg, transmit=flip_client_2)
    assert attacked.history.column("rejected") == [1, 0]
    (rnd, cid, reason), = attacked.server.rejected
    assert (rnd, cid) == (1, 2) and "checksum" in reason
    assert attacked.history.final_accuracy > 0.5
    assert clean.history.column("rejected") == [0, 0]


def test_nan_update_is_rejected(small_train, small_test):
    seed_everything(0)
    model = MLP(hidden=(16,))
    parts = partition_iid(small_train.y, 2, seed=0)
    cfg = FedConfig(rounds=1, batch_size=64, lr=1e6, seed=0)  # a huge step overflows float16 to inf
    run = run_federated(model, small_train, parts, small_test, cfg, uplink=Float16Codec())
    assert run.history.column("rejected") == [2]
    # no update survived, so the global model is the initial one
    assert all(torch.equal(float_state(model)[k], v) for k, v in float_state(run.model).items())


def test_error_feedback_residual_is_what_was_not_sent():
    ef = ErrorFeedback()
    u = {"w": torch.tensor([1.0, 2.0])}
    sent = {"w": torch.tensor([1.0, 0.0])}
    assert torch.equal(ef.compensate(0, u)["w"], u["w"])
    ef.remember(0, u, sent)
    assert torch.equal(ef.residuals[0]["w"], torch.tensor([0.0, 2.0]))
    assert torch.equal(ef.compensate(0, u)["w"], torch.tensor([1.0, 4.0]))
    assert ef.residual_norm(1) == 0.0 and ef.residual_norm(0) == 2.0


def test_centralized_baseline_learns(small_train, small_test):
    seed_everything(0)
    run = train_centralized(SmallCNN(), small_train, small_test, epochs=1, batch_size=32, lr=0.05, momentum=0.9)
    loss, acc = evaluate(run.model, small_test)
    assert acc == run.history.final_accuracy and acc > 0.65


def test_local_steps_and_samples_seen(small_train):
    from helpers.federated import samples_seen
    from helpers.training import local_train
    # 100 samples in batches of 32 make one pass of [32, 32, 32, 4]
    assert samples_seen(100, FedConfig(batch_size=32, local_steps=5)) == 132
    cfg = FedConfig(batch_size=32, local_steps=4)
    assert samples_seen(100, cfg) == 100          # 32 + 32 + 32 + 4: exactly one pass
    assert samples_seen(100, FedConfig(batch_size=32, local_steps=6)) == 100 + 64
    assert samples_seen(100, FedConfig(batch_size=32, local_epochs=2)) == 200
    seen = []
    model = MLP(hidden=(8,))
    local_train(model, small_train, torch.arange(100), batch_size=32, lr=0.01, steps=6,
                generator=torch.Generator().manual_seed(0),
                loss_fn=lambda out, y, idx: (seen.append(len(idx)), torch.nn.functional.cross_entropy(out, y))[1])
    assert seen == [32, 32, 32, 4, 32, 32]
    with pytest.raises(ValueError):
        FedConfig(local_steps=0)


def test_lr_decay_is_applied_per_round(small_train):
    """Round t trains with lr * lr_decay**(t-1): round 2 with lr 0.05 and decay 0.5 equals lr 0.025."""
    seed_everything(0)
    model = MLP(hidden=(16,))
    state = float_state(model)
    client = Client(0, torch.arange(500))
    a, _ = client.local_update(model, state, small_train, FedConfig(lr=0.05, lr_decay=0.5, batch_size=64), 2)
    b, _ = client.local_update(model, state, small_train, FedConfig(lr=0.025, batch_size=64), 2)
    c, _ = client.local_update(model, state, small_train, FedConfig(lr=0.05, batch_size=64), 2)
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)
    with pytest.raises(ValueError):
        FedConfig(lr_decay=0.0)


def test_local_train_uses_channels_last_for_speed_but_changes_only_the_layout(fmnist_train):
    """local_train runs a CNN in channels-last layout (faster convolutions on a CPU): the trained weights
    must match a plain NCHW SGD loop over the same minibatches up to float rounding, and the model must come
    back in the default layout."""
    from helpers.training import local_train, minibatches

    idx = torch.arange(640)
    seed_everything(0)
    fast = SmallCNN()
    plain = SmallCNN()
    plain.load_state_dict(fast.state_dict())
    local_train(fast, fmnist_train, idx, batch_size=32, lr=0.05, momentum=0.9,
                generator=torch.Generator().manual_seed(3))
    assert all(p.is_contiguous() for p in fast.parameters())
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    plain.train()
    for batch in minibatches(idx, 32, torch.Generator().manual_seed(3), 1, None):
        loss = nn.functional.cross_entropy(plain(fmnist_train.x[batch]), fmnist_train.y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = max(float((p - q).abs().max()) for p, q in zip(plain.state_dict().values(), seed_state(0).values()))
    diff = max(float((p - q).abs().max()) for p, q in zip(fast.state_dict().values(), plain.state_dict().values()))
    assert moved > 1e-2 and diff < 1e-4, (moved, diff)    # trained for real; the same up to rounding


def seed_state(seed):
    seed_everything(seed)
    return SmallCNN().state_dict()


def test_round_tally_counts_every_upload_and_keeps_only_the_accepted(small_train, small_test):
    """The round bookkeeping shared by run_federated and the Flower ServerApp: bytes and samples count every
    upload, a corrupted one is rejected and left out of the aggregate, and close() applies and records."""
    from helpers.federated import RoundTally, Server
    from helpers.codecs import Float32Codec

    seed_everything(0)
    model = MLP(hidden=(16,))
    server = Server(model)
    config = FedConfig(rounds=1, fraction=1.0, local_epochs=1, batch_size=32, lr=0.05)
    update = {k: torch.full_like(v, 0.01) for k, v in float_state(model).items()}
    good = Float32Codec().encode(update)
    bad = bytearray(good)
    bad[100] ^= 0x01
    before = {k: v.clone() for k, v in float_state(model).items()}
    tally = RoundTally()
    tally.receive(server, good, 1, 0, 64, 0.5, config)
    tally.receive(server, bytes(bad), 1, 1, 32, 9.0, config)
    assert tally.up_bytes == 2 * len(good) and tally.samples == 64 + 32 and tally.rejected == 1
    assert tally.weights == [64] and tally.losses == [0.5]
    record = tally.close(server, small_test, 1, config, bytes_down=0, clients=2, t0=0.0)
    assert record.rejected == 1 and record.train_loss == 0.5 and 0.0 <= record.test_acc <= 1.0
    after = float_state(model)
    assert all(torch.allclose(after[k], before[k] + 0.01) for k in before)
