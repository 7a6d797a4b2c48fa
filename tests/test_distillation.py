import math

import pytest
import torch
import torch.nn.functional as F

from helpers import seed_everything
from helpers.codecs import Float16Codec, Float32Codec
from helpers.data import partition_dirichlet
from helpers.distillation import (KDLoss, distill_on_public, kd_loss, predict_logits, public_split,
                                  run_logit_exchange, soft_targets, train_student)
from helpers.federated import FedConfig
from helpers.training import evaluate, train_centralized
from helpers.models import MLP, SmallCNN, count_parameters, size_report, teacher_student_pair


def _hand_kd(zs, zt, y, alpha, t):
    """The KD loss of one sample, written out with math.exp/log only."""
    def softmax(z, temp):
        e = [math.exp(v / temp) for v in z]
        return [v / sum(e) for v in e]
    ce = -math.log(softmax(zs, 1.0)[y])
    ps, pt = softmax(zs, t), softmax(zt, t)
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return alpha * ce + (1 - alpha) * t * t * kl


def test_kd_loss_matches_hand_computation():
    zs = [[1.0, -0.5, 2.0], [0.2, 0.1, -1.0]]
    zt = [[0.5, 0.0, 3.0], [2.0, -1.0, 0.0]]
    y = [2, 0]
    for alpha, t in [(0.5, 1.0), (0.3, 4.0), (0.0, 2.0), (1.0, 3.0)]:
        expected = sum(_hand_kd(a, b, c, alpha, t) for a, b, c in zip(zs, zt, y)) / 2
        got = kd_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(y), alpha=alpha, temperature=t)
        assert float(got) == pytest.approx(expected, rel=1e-5)


def test_kd_loss_limits():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(64, 10, generator=g), torch.randn(64, 10, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    ce = F.cross_entropy(zs, y)
    # alpha = 1 is plain cross-entropy, whatever the teacher says
    assert torch.allclose(kd_loss(zs, zt, y, alpha=1.0, temperature=5.0), ce)
    # identical teacher and student: the KL term is zero at every temperature
    for t in (1.0, 4.0):
        assert float(kd_loss(zs, zs.clone(), None, alpha=0.0, temperature=t)) == pytest.approx(0.0, abs=1e-6)
        assert torch.allclose(kd_loss(zs, zs.clone(), y, alpha=0.5, temperature=t), 0.5 * ce, atol=1e-6)
    # the soft term is never negative (KL ≥ 0)
    assert float(kd_loss(zs, zt, None, alpha=0.0, temperature=2.0)) > 0


def test_temperature_softens_and_t_squared_keeps_gradient_scale():
    z = torch.tensor([[4.0, 1.0, 0.0]])
    assert soft_targets(z, 1.0).max() > soft_targets(z, 4.0).max() > soft_targets(z, 20.0).max()
    assert torch.allclose(soft_targets(z, 3.0).sum(), torch.tensor(1.0))
    # with the T^2 factor the soft-target gradient stays O(1) as T grows (Hinton et al., sec. 2.1)
    g = torch.Generator().manual_seed(1)
    zt = torch.randn(256, 10, generator=g)
    norms = []
    for t in (2.0, 8.0):
        zs = torch.randn(256, 10, generator=torch.Generator().manual_seed(2)).requires_grad_()
        kd_loss(zs, zt, None, alpha=0.0, temperature=t).backward()
        norms.append(float(zs.grad.norm()))  # the gradient of T^2 * KL
    assert 0.8 < norms[1] / norms[0] < 1.25  # without the T^2 it would shrink 16x from T = 2 to T = 8


def test_bad_arguments():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        kd_loss(z, z, torch.zeros(2, dtype=torch.long), alpha=1.5)
    with pytest.raises(ValueError):
        kd_loss(z, z, torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError):
        kd_loss(z, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        kd_loss(z, z, None, alpha=0.5)  # labels needed when alpha > 0
    with pytest.raises(ValueError):
        KDLoss(torch.zeros(5))
    with pytest.raises(ValueError):
        public_split(100, 0, seed=0)


def test_kdloss_looks_up_teacher_logits_by_index():
    table = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    idx = torch.tensor([7, 2, 2])
    out = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 3])
    assert torch.allclose(KDLoss(table, 0.3, 2.0)(out, y, idx), kd_loss(out, table[idx], y, 0.3, 2.0))


def test_teacher_student_pair_size_ratio():
    teacher, student = teacher_student_pair()
    assert count_parameters(teacher) == 159_010 and count_parameters(student) == 12_730
    assert count_parameters(teacher) >= 5 * count_parameters(student)
    assert size_report(student) == {"parameters": 12_730, "bytes_fp32": 50_920, "bytes_fp16": 25_460}


def test_public_split_is_disjoint_from_every_client(small_train):
    private, public = public_split(len(small_train), 500, seed=0)
    assert len(public) == 500 and len(private) == len(small_train) - 500
    parts = [private[p] for p in partition_dirichlet(small_train.y[private], 5, 0.5, seed=0)]
    pub = set(public.tolist())
    assert all(pub.isdisjoint(p.tolist()) for p in parts)
    assert sorted(torch.cat(parts).tolist()) == private.tolist()


def test_student_learns_from_soft_labels_alone(small_train, small_test):
    seed_everything(0)
    teacher = train_centralized(MLP(), small_train, small_test, epochs=2, lr=0.05).model
    t_logits = predict_logits(teacher, small_train.x)
    student = MLP(hidden=(16,))
    _, before = evaluate(student, small_test)
    # alpha = 0: the student never sees a label, only the teacher's predictions
    train_student(student, small_train, torch.arange(len(small_train)), t_logits, alpha=0.0, temperature=2.0,
                  epochs=2, generator=torch.Generator().manual_seed(0))
    _, after = evaluate(student, small_test)
    _, t_acc = evaluate(teacher, small_test)
    assert before < 0.3 and after > 0.7 and after > t_acc - 0.06


def test_distill_on_public_never_needs_labels(small_train):
    model = MLP(hidden=(16,))
    x = small_train.x[:200]
    target = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    loss0 = float(kd_loss(predict_logits(model, x), target, None, alpha=0.0))
    distill_on_public(model, x, target, epochs=5, batch_size=32, lr=0.05, momentum=0.9,
                      generator=torch.Generator().manual_seed(0))
    assert float(kd_loss(predict_logits(model, x), target, None, alpha=0.0)) < loss0


def test_logit_exchange_bytes_consensus_and_heterogeneous_clients(small_train, small_test):
    seed_everything(0)
    private, public = public_split(len(small_train), 300, seed=0)
    parts = [private[p] for p in partition_dirichlet(small_train.y[private], 3, 0.5, seed=0)]
    models = [MLP(hidden=(32,)), MLP(hidden=(16, 16)), SmallCNN(channels=(4, 8), hidden=16)]  # all different
    cfg = FedConfig(rounds=2, local_epochs=1, batch_size=32, lr=0.02, momentum=0.9, seed=0)
    pub_x = small_train.x[public]
    run = run_logit_exchange(models, small_train, parts, pub_x, small_test, cfg, codec=Float16Codec())
    one = len(Float16Codec().encode({"logits": torch.zeros(300, 10)}))
    assert [r.bytes_up for r in run.history.rows] == [3 * one, 3 * one]
    assert [r.bytes_down for r in run.history.rows] == [3 * one, 3 * one]
    assert one < 300 * 10 * 2 + 64            # 2 bytes per logit plus a small header
    assert run.consensus.shape == (300, 10) and sum(r.rejected for r in run.history.rows) == 0
    assert len(run.client_accuracies) == 3 and run.history.final_accuracy == pytest.approx(
        sum(run.client_accuracies) / 3)
    # the same run with float32 logits sends about twice the bytes
    run32 = run_logit_exchange(models, small_train, parts, pub_x, small_test, FedConfig(
        rounds=1, batch_size=32, lr=0.02, momentum=0.9, seed=0), codec=Float32Codec())
    assert run32.history.rows[0].bytes_up == pytest.approx(2 * run.history.rows[0].bytes_up, rel=0.02)
    # local only: no bytes, same schedule
    alone = run_logit_exchange(models, small_train, parts, pub_x, small_test, cfg, share=False)
    assert alone.history.total_bytes_up == 0 and alone.consensus is None
    with pytest.raises(ValueError):
        run_logit_exchange(models[:2], small_train, parts, pub_x, small_test, cfg)


def test_consensus_is_the_sample_weighted_mean_of_client_logits(small_train, small_test):
    """With distillation switched off after the upload, the consensus is exactly the n_k-weighted mean."""
    seed_everything(0)
    private, public = public_split(len(small_train), 100, seed=1)
    parts = [private[:1000], private[1000:4000]]
    cfg = FedConfig(rounds=1, batch_size=64, lr=0.02, seed=0)
    models = [MLP(hidden=(8,)), MLP(hidden=(8,))]
    run = run_logit_exchange(models, small_train, parts, small_train.x[public], small_test, cfg,
                             codec=Float32Codec(), distill_epochs=1)
    # recompute each client's logits the same way (same seeds) to check the average
    alone = run_logit_exchange(models, small_train, parts, small_train.x[public], small_test, cfg, share=False)
    z = [predict_logits(m, small_train.x[public]) for m in alone.models]
    assert torch.allclose(run.consensus, 0.25 * z[0] + 0.75 * z[1], atol=1e-5)


# --------------------------------------------------------------------------- Chapter 4's task functions

from helpers.chapters.ch4 import chapter_task, federated_task, logit_exchange_task  # noqa: E402
from helpers.models import build_model  # noqa: E402
from helpers.parallel import run_parallel  # noqa: E402


def test_build_model_by_name():
    assert count_parameters(build_model("cnn")) == count_parameters(SmallCNN())
    assert count_parameters(build_model("mlp-16")) == 12_730
    assert [m.out_features for m in build_model("mlp-128-64").modules() if isinstance(m, torch.nn.Linear)] == [128, 64, 10]
    for bad in ("mlp", "mlp-", "mlp-0", "mlp-x", "resnet"):
        with pytest.raises(ValueError, match="unknown model name"):
            build_model(bad)
    with pytest.raises(TypeError):
        build_model(16)


def test_public_split_of_a_pool_stays_inside_it():
    pool = torch.arange(1000, 3000)          # e.g. book.pool: everything outside a validation split
    private, public = public_split(pool, 200, seed=0)
    assert len(public) == 200 and len(private) == 1800
    assert set(public.tolist()) | set(private.tolist()) == set(pool.tolist())
    assert set(public.tolist()).isdisjoint(private.tolist()) and int(public.min()) >= 1000
    assert torch.equal(public_split(pool, 200, seed=0)[1], public)      # fixed by the seed
    with pytest.raises(ValueError):
        public_split(pool, 2000, seed=0)


def _small_setting(small_train):
    pool, val_idx = torch.arange(5000), torch.arange(5000, 6000)
    return pool, val_idx, FedConfig(rounds=1, batch_size=64, lr=0.02, momentum=0.9)


def test_federated_task_seed_fixes_everything_and_kd_changes_the_run(small_train, small_test):
    pool, val_idx, cfg = _small_setting(small_train)
    kw = dict(arch="mlp-16", train=small_train, pool=pool, test=small_test, val_idx=val_idx, config=cfg)
    a, b, c = federated_task(seed=1, **kw), federated_task(seed=1, **kw), federated_task(seed=2, **kw)
    sa, sb, sc = (float_state_of(r["model"]) for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)                # same seed: bit-identical
    assert not torch.equal(sa["net.1.weight"], sc["net.1.weight"])   # another seed: another run
    assert a["val_acc"] == evaluate(a["model"], small_train.subset(val_idx))[1]
    assert a["test_acc"] == a["history"].final_accuracy > 0.3      # chance is 0.1; one short round
    teacher = torch.randn(len(small_train), 10, generator=torch.Generator().manual_seed(0))
    d = federated_task(seed=1, teacher_logits=teacher, alpha=0.5, temperature=2.0, **kw)
    assert not torch.equal(float_state_of(d["model"])["net.1.weight"], sa["net.1.weight"])
    assert d["history"].bytes_up_per_client == a["history"].bytes_up_per_client   # KD changes the loss only


def float_state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_logit_exchange_task_and_dispatch(small_train, small_test):
    pool, _, cfg = _small_setting(small_train)
    private, public = public_split(pool, 300, seed=0)
    kw = dict(seed=0, archs=["mlp-16"] * 10, train=small_train, pool=private, public=public, test=small_test,
              config=cfg, codec=Float16Codec())
    run = logit_exchange_task(**kw)
    assert run["bytes_up_per_client"] == len(Float16Codec().encode({"logits": torch.zeros(300, 10)}))
    assert run["mean_acc"] == pytest.approx(sum(run["client_accuracies"]) / 10)
    with pytest.raises(ValueError, match="architectures"):
        logit_exchange_task(**{**kw, "archs": ["mlp-16"] * 3})
    with pytest.raises(ValueError, match="job"):
        chapter_task("nope")
    # through run_parallel (in-process): arguments pickle, the result is the same run
    [again] = run_parallel(chapter_task, [dict(job="logit_exchange", **kw)], workers=1, progress=False)
    assert again["client_accuracies"] == run["client_accuracies"]


def test_logit_exchange_task_refuses_a_public_set_inside_the_pool(small_train, small_test):
    pool, _, cfg = _small_setting(small_train)
    with pytest.raises(ValueError, match="overlaps"):
        logit_exchange_task(seed=0, archs=["mlp-16"] * 10, train=small_train, pool=pool, public=pool[:100],
                            test=small_test, config=cfg)


def test_federated_task_label_smoothing_control_and_uplink_codec(small_train, small_test):
    """Chapter 4's control for KD (cross-entropy with label smoothing) changes the run but not the payload;
    an 8-bit uplink shrinks the payload; the two ways to soften the target cannot be mixed."""
    from helpers.codecs import QuantizedCodec

    pool, val_idx, cfg = _small_setting(small_train)
    kw = dict(seed=1, arch="mlp-16", train=small_train, pool=pool, test=small_test, val_idx=val_idx, config=cfg)
    plain, smooth = federated_task(**kw), federated_task(label_smoothing=0.5, **kw)
    assert not torch.equal(float_state_of(plain["model"])["net.1.weight"], float_state_of(smooth["model"])["net.1.weight"])
    assert smooth["history"].bytes_up_per_client == plain["history"].bytes_up_per_client
    q8 = federated_task(uplink=QuantizedCodec(8), **kw)
    assert q8["history"].bytes_up_per_client < 0.3 * plain["history"].bytes_up_per_client
    assert q8["test_acc"] > 0.3
    with pytest.raises(ValueError, match="not both"):
        federated_task(label_smoothing=0.1, teacher_logits=torch.zeros(len(small_train), 10), **kw)
    with pytest.raises(ValueError, match="label_smoothing"):
        federated_task(label_smoothing=1.0, **kw)


# --------------------------------------------------------------------------- FedDF: server-side ensemble distillation

def test_feddf_round_is_fedavg_then_distillation_toward_the_ensemble(small_train, small_test):
    """One FedDF round, rebuilt by hand: the clients' updates (the simulator's own Client), their n_k-weighted
    FedAvg, the n_k-weighted mean of the client models' logits on the public images, and distill_on_public with
    the server's generator: the global model must equal it exactly."""
    from helpers.aggregation import FedAvg, fedavg
    from helpers.distillation import FedDF
    from helpers.federated import Client, run_federated
    from helpers.training import client_generator, float_state

    private, public = public_split(len(small_train), 400, seed=0)
    by_label = private[torch.argsort(small_train.y[private], stable=True)]   # label skew: where FedDF matters
    parts = [by_label[:1500], by_label[1500:2500], by_label[2500:5000]]
    cfg = FedConfig(rounds=1, batch_size=64, lr=0.02, momentum=0.9, seed=3)
    pub_x = small_train.x[public]
    seed_everything(0)
    model = MLP(hidden=(16,))
    strategy = FedDF(pub_x, epochs=2, lr=0.02, momentum=0.9, seed=3, norm_bound=None)
    run = run_federated(model, small_train, parts, small_test, cfg, strategy=strategy)
    # by hand
    start = float_state(model)
    worker = copy_of(model)
    updates = [Client(k, p).local_update(worker, start, small_train, cfg, 1)[0] for k, p in enumerate(parts)]
    n = [len(p) for p in parts]
    avg = fedavg(updates, n)
    zs = []
    for u in updates:
        worker.load_state_dict({k: v + u[k] for k, v in start.items()})
        zs.append(predict_logits(worker, pub_x))
    ensemble = sum(nk / sum(n) * z for nk, z in zip(n, zs))
    assert torch.allclose(strategy.ensemble_logits(worker, start, updates, n), ensemble, atol=1e-5)
    worker.load_state_dict({k: v + avg[k] for k, v in start.items()})
    before = float(kd_loss(predict_logits(worker, pub_x), ensemble, None, alpha=0.0))
    plain_acc = evaluate(worker, small_test)[1]
    distill_on_public(worker, pub_x, ensemble, epochs=2, batch_size=32, lr=0.02, momentum=0.9,
                      generator=client_generator(3, 1, 0, stream=2))
    got, want = float_state(run.model), float_state(worker)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    # the distillation moved the averaged model toward the ensemble
    after = float(kd_loss(predict_logits(run.model, pub_x), ensemble, None, alpha=0.0))
    assert after < 0.5 * before
    # and it is not FedAvg any more, while the payloads are FedAvg's
    fa = run_federated(model, small_train, parts, small_test, cfg, strategy=FedAvg(norm_bound=None))
    assert fa.history.final_accuracy == pytest.approx(plain_acc)
    assert run.history.final_accuracy != fa.history.final_accuracy
    assert run.history.rows[0].bytes_up == fa.history.rows[0].bytes_up


def copy_of(model):
    import copy
    return copy.deepcopy(model)


def test_feddf_bad_arguments_and_task(small_train, small_test):
    from helpers.distillation import FedDF

    x = small_train.x[:10]
    for bad in (dict(epochs=0, lr=0.1), dict(epochs=1, lr=0.0), dict(epochs=1, lr=0.1, momentum=1.0),
                dict(epochs=1, lr=0.1, temperature=0.0), dict(epochs=1, lr=0.1, batch_size=0)):
        with pytest.raises(ValueError):
            FedDF(x, **bad)
    with pytest.raises(ValueError, match="public_x"):
        FedDF(torch.zeros(0, 1, 28, 28), lr=0.1)
    with pytest.raises(RuntimeError, match="server"):
        FedDF(x, lr=0.1).aggregate([{"w": torch.zeros(2)}] * 3, [1, 1, 1])
    # Chapter 4's task: the public set must lie outside the pool and the validation split
    pool, val_idx, cfg = _small_setting(small_train)
    kw = dict(seed=0, arch="mlp-16", train=small_train, test=small_test, val_idx=val_idx, config=cfg)
    with pytest.raises(ValueError, match="overlaps"):
        federated_task(pool=pool, public=pool[:100], feddf=dict(lr=0.02), **kw)
    with pytest.raises(ValueError, match="overlaps"):
        federated_task(pool=pool[:4000], public=val_idx[:100], feddf=dict(lr=0.02), **kw)
    private, public = pool[:4500], pool[4500:]
    plain = federated_task(pool=private, **kw)
    df = federated_task(pool=private, public=public, feddf=dict(epochs=1, lr=0.02, momentum=0.9), **kw)
    assert df["history"].bytes_up_per_client == plain["history"].bytes_up_per_client
    assert df["test_acc"] != plain["test_acc"] and df["test_acc"] > 0.3
