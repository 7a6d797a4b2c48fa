import copy

import pytest
import torch

from helpers import seed_everything
from helpers.data import partition_dirichlet
from helpers.federated import FedConfig, Server, run_federated
from helpers.training import float_state, local_train
from helpers.models import MLP, SmallCNN, count_parameters
from helpers.codecs import SparseCodec
from helpers import pruning
from helpers.chapters import ch3


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return SmallCNN()


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.8, 0.93, 0.999])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_mask_at_sparsity_s_zeroes_exactly_round_s_n(cnn, s, scope):
    masks = pruning.magnitude_masks(cnn, s, scope)
    weights = pruning.prunable_weights(cnn)
    assert set(masks) == set(weights) == {"features.0.weight", "features.3.weight",
                                          "classifier.0.weight", "classifier.2.weight"}
    if scope == "layer":
        for k, t in weights.items():
            assert int((~masks[k]).sum()) == round(s * t.numel())
    else:
        n = sum(t.numel() for t in weights.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(s * n)
    # the pruned weights are the smallest ones: every pruned |w| <= every kept |w|
    flat_w = torch.cat([weights[k].detach().abs().reshape(-1) for k in masks])
    flat_m = torch.cat([masks[k].reshape(-1) for k in masks])
    if scope == "global" and 0 < s:
        assert flat_w[~flat_m].max() <= flat_w[flat_m].min()


def test_apply_masks_keeps_state_dict_keys_and_biases(cnn):
    keys = list(cnn.state_dict())
    biases = {k: v.clone() for k, v in cnn.state_dict().items() if k.endswith("bias")}
    pruning.apply_masks(cnn, pruning.magnitude_masks(cnn, 0.7))
    assert list(cnn.state_dict()) == keys                     # no weight_orig / weight_mask
    assert all(torch.equal(cnn.state_dict()[k], v) for k, v in biases.items())
    assert abs(pruning.sparsity(cnn) - 0.7) < 1e-4
    assert pruning.sparsity_report(cnn)[-1]["zeros"] == round(0.7 * pruning.sparsity_report(cnn)[-1]["params"])


def test_threshold_and_sparsity_agree(cnn):
    tau = pruning.threshold_for_sparsity(cnn, 0.6)
    masks = pruning.masks_from_threshold(cnn, tau)
    assert abs(pruning.sparsity(masks) - 0.6) < 1e-3
    assert pruning.threshold_for_sparsity(cnn, 0.0) == 0.0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity_is_rejected(cnn, bad):
    with pytest.raises(ValueError, match="sparsity"):
        pruning.magnitude_masks(cnn, bad)
    with pytest.raises(ValueError):
        pruning.FederatedPruner(bad, begin=1, end=3)


def test_other_bad_arguments(cnn):
    with pytest.raises(ValueError, match="scope"):
        pruning.magnitude_masks(cnn, 0.5, scope="row")
    with pytest.raises(ValueError, match="tau"):
        pruning.masks_from_threshold(cnn, -1.0)
    with pytest.raises(ValueError, match="end"):
        pruning.cubic_sparsity(2, 0.8, begin=3, end=1)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        pruning.prunable_weights(torch.nn.ReLU())


def test_cubic_schedule_matches_zhu_gupta():
    assert pruning.cubic_sparsity(0, 0.8, 1, 3) == 0.0
    assert pruning.cubic_sparsity(1, 0.8, 1, 3) == 0.0
    assert pruning.cubic_sparsity(2, 0.8, 1, 3) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert pruning.cubic_sparsity(3, 0.8, 1, 3) == pytest.approx(0.8)
    assert pruning.cubic_sparsity(9, 0.8, 1, 3) == pytest.approx(0.8)
    steps = [pruning.cubic_sparsity(t, 0.9, 0, 10) for t in range(11)]
    assert all(a <= b for a, b in zip(steps, steps[1:]))


def test_masked_weights_stay_zero_after_local_training(small_train, cnn):
    masks = pruning.magnitude_masks(cnn, 0.8)
    pruning.apply_masks(cnn, masks)
    start = float_state(cnn)
    local_train(cnn, small_train, torch.arange(600), epochs=1, batch_size=32, lr=0.05, momentum=0.9,
                generator=torch.Generator().manual_seed(0), after_step=lambda m: pruning.apply_masks(m, masks))
    w = pruning.prunable_weights(cnn)
    for k, m in masks.items():
        assert torch.all(w[k][~m] == 0)
        assert not torch.equal(w[k][m], start[k][m])     # the kept weights did train
    update = {k: v - start[k] for k, v in float_state(cnn).items()}
    assert all(torch.all(update[k][~m] == 0) for k, m in masks.items())


def test_masks_survive_aggregation_and_tighten_over_rounds(small_train, small_test):
    seed_everything(0)
    model = MLP(hidden=(32,))
    part = partition_dirichlet(small_train.y, 4, 0.5, seed=0)
    seen = []

    class RecordingPruner(pruning.FederatedPruner):
        def before_round(self, round_idx, server):
            super().before_round(round_idx, server)
            seen.append({k: m.clone() for k, m in self.masks.items()})

    pruner = RecordingPruner(0.8, begin=1, end=3)
    run = run_federated(model, small_train, part, small_test, FedConfig(rounds=3, lr=0.02, momentum=0.9, batch_size=32),
                        uplink=SparseCodec(), downlink=SparseCodec(), strategy=pruner)
    assert [r["target"] for r in pruner.log] == pytest.approx([0.0, 0.7, 0.8])
    assert pruning.sparsity(run.model) == pytest.approx(0.8, abs=1e-4)   # after the last aggregation
    final = pruning.prunable_weights(run.model)
    for k, m in seen[-1].items():
        assert torch.all(final[k][~m] == 0)
    # masks only tighten: what round 2 pruned stays pruned in round 3
    assert all(torch.all(seen[2][k] <= seen[1][k]) for k in seen[2])
    # the sparse uplink shrinks as the mask tightens
    up = run.history.column("bytes_up")
    assert up[2] < up[1] < up[0]
    assert run.history.final_accuracy > 0.6


def test_server_apply_keeps_zeros_when_updates_are_masked(cnn):
    pruning.apply_masks(cnn, pruning.magnitude_masks(cnn, 0.5))
    server = Server(cnn)
    masks = pruning.magnitude_masks(cnn, 0.5)
    updates = [{k: torch.randn_like(v) * (masks[k] if k in masks else 1) for k, v in server.state.items()}
               for _ in range(3)]
    before = server.state
    server.apply(updates, [1, 2, 3])
    after = server.state
    expected = {k: v + sum(w * u[k] for w, u in zip([1 / 6, 2 / 6, 3 / 6], updates)) for k, v in before.items()}
    assert all(torch.allclose(after[k], expected[k], atol=1e-5) for k in after)   # apply really applied the mean
    for k, m in masks.items():
        assert torch.all(after[k][~m] == 0) and torch.all(after[k][m] != before[k][m])
    assert pruning.sparsity(server.model) == pytest.approx(0.5, abs=1e-3)


def test_choose_threshold_picks_largest_sparsity_within_tolerance(small_train, small_test):
    seed_everything(0)
    from helpers.training import train_centralized
    model = train_centralized(MLP(hidden=(64,)), small_train, small_test, epochs=1, lr=0.05).model
    val = small_test.subset(torch.arange(1000))
    before = copy.deepcopy(model.state_dict())
    choice = pruning.choose_threshold(model, val, [0.0, 0.5, 0.8, 0.9, 0.99], tolerance=0.02)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # not modified
    ok = [r for r in choice.sweep if r["val_acc"] >= choice.dense_val_acc - 0.02]
    assert choice.sparsity == max(r["sparsity"] for r in ok)
    assert choice.tau == pytest.approx(pruning.threshold_for_sparsity(model, choice.sparsity))
    assert choice.sweep[-1]["val_acc"] < choice.dense_val_acc - 0.02      # 99% is too much
    with pytest.raises(ValueError):
        pruning.choose_threshold(model, val, [], tolerance=0.01)


def test_shrink_small_cnn_matches_the_sliced_network(cnn, small_test):
    small = pruning.shrink_small_cnn(cnn, 1.0)
    x = small_test.x[:50]
    assert torch.allclose(small(x), cnn(x), atol=1e-5)          # keep=1 reorders nothing
    half = pruning.shrink_small_cnn(cnn, 0.5)
    assert half.features[0].out_channels == 4 and half.features[3].out_channels == 8
    assert count_parameters(half) < count_parameters(cnn) / 3
    with pytest.raises(ValueError):
        pruning.shrink_small_cnn(cnn, 0.0)


def test_run_seed_pairs_runs_by_seed_and_returns_the_pruner(fmnist_train, small_test):
    """A seed fixes partition + initialisation + sampling: the same seed twice gives the same run, another
    seed a different one; the strategy (with its masks and log) and a captured upload come back."""
    cfg = FedConfig(rounds=2, local_steps=3, batch_size=16, lr=0.02, momentum=0.9, seed=99)
    kw = dict(model="mlp", train=fmnist_train, test=small_test, config=cfg)
    a = ch3.run_seed(seed=1, capture=(2, 0), uplink=SparseCodec(), downlink=SparseCodec(),
                         strategy=pruning.FederatedPruner(0.5, begin=1, end=2), **kw)
    b = ch3.run_seed(seed=1, capture=(2, 0), uplink=SparseCodec(), downlink=SparseCodec(),
                         strategy=pruning.FederatedPruner(0.5, begin=1, end=2), **kw)
    c = ch3.run_seed(seed=2, **kw)
    sa, sb, sc = a.run.model.state_dict(), b.run.model.state_dict(), c.run.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and a.payload == b.payload
    assert not all(torch.equal(sa[k], sc[k]) for k in sa) and c.payload is None
    assert a.run.history.column("bytes_up") == b.run.history.column("bytes_up")
    pruner = a.run.server.strategy
    assert [r["target"] for r in pruner.log] == pytest.approx([0.0, 0.5])
    assert pruning.sparsity(a.run.model) == pytest.approx(0.5, abs=1e-3)
    # the captured payload is client 0's real round-2 upload: it decodes to an update that is zero on the mask
    update = SparseCodec().decode(a.payload)
    assert all(torch.all(update[k][~m] == 0) for k, m in pruner.masks.items())
    assert len(a.payload) < len(SparseCodec().encode(float_state(MLP())))
    # the clients are the book's: drawn from the pool, never the validation images
    from helpers.experiment import book_partition, validation_split
    val = set(validation_split(len(fmnist_train))[1].tolist())
    assert not val & set(torch.cat(book_partition(fmnist_train.y, seed=1)).tolist())
    with pytest.raises(ValueError, match="model"):
        ch3.run_seed(seed=0, model="resnet", train=fmnist_train, test=small_test, config=cfg)
    with pytest.raises(ValueError, match="capture"):
        ch3.run_seed(seed=0, capture=(5, 0), **kw)
