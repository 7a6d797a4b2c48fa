"""The aggregation rules and the FedAvg strategy's norm bound, each against a hand computation."""

import pytest
import torch

from helpers.aggregation import (CoordinateMedian, FedAvg, TrimmedMean, WeightedMean, bound_norms, check_updates,
                                 update_norm)


def U(*values):
    """One update with a single 1-D tensor ``w``."""
    return {"w": torch.tensor(values, dtype=torch.float32)}


# Five clients, two coordinates; the last client is an outlier in the first coordinate.
UPDATES = [U(1.0, -2.0), U(2.0, 0.0), U(3.0, 1.0), U(4.0, 5.0), U(100.0, 3.0)]
WEIGHTS = [1, 1, 2, 4, 2]


def test_weighted_mean_by_hand():
    # sum w_k u_k / sum w_k, coordinate 1: (1 + 2 + 6 + 16 + 200) / 10 = 22.5; coordinate 2: (-2 + 0 + 2 + 20 + 6) / 10 = 2.6
    out = WeightedMean()(UPDATES, WEIGHTS)
    assert torch.allclose(out["w"], torch.tensor([22.5, 2.6]))


def test_weighted_mean_ignores_scale_of_weights():
    a = WeightedMean()(UPDATES, WEIGHTS)["w"]
    b = WeightedMean()(UPDATES, [10 * w for w in WEIGHTS])["w"]
    assert torch.allclose(a, b)


def test_coordinate_median_odd_by_hand():
    # sorted coordinate 1: 1 2 3 4 100 -> 3; coordinate 2: -2 0 1 3 5 -> 1; weights play no role
    out = CoordinateMedian()(UPDATES, WEIGHTS)
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))


def test_coordinate_median_even_is_mean_of_middle_two():
    # first four: coordinate 1: 1 2 3 4 -> 2.5; coordinate 2: -2 0 1 5 -> 0.5
    out = CoordinateMedian()(UPDATES[:4], WEIGHTS[:4])
    assert torch.equal(out["w"], torch.tensor([2.5, 0.5]))


def test_trimmed_mean_by_hand():
    # m = 5, trim 0.2 -> drop 1 smallest and 1 largest per coordinate:
    # coordinate 1: mean(2, 3, 4) = 3; coordinate 2: mean(0, 1, 3) = 4/3
    out = TrimmedMean(0.2)(UPDATES, WEIGHTS)
    assert torch.allclose(out["w"], torch.tensor([3.0, 4.0 / 3.0]))


def test_trimmed_mean_rounds_the_trim_down():
    # m = 5, trim 0.1 -> floor(0.5) = 0 values dropped: the plain (unweighted) mean
    out = TrimmedMean(0.1)(UPDATES, WEIGHTS)
    assert torch.allclose(out["w"], torch.tensor([110 / 5, 7 / 5]))


def test_trimmed_mean_rejects_bad_trim():
    with pytest.raises(ValueError, match="trim"):
        TrimmedMean(0.5)


def test_median_shrugs_off_one_huge_update_the_mean_does_not():
    honest = [U(1.0, 1.0), U(1.2, 0.8), U(0.8, 1.1)]
    attacked = honest + [U(-1e6, -1e6)]
    assert WeightedMean()(attacked, [1] * 4)["w"].abs().max() > 1e5
    assert CoordinateMedian()(attacked, [1] * 4)["w"].abs().max() <= 1.2


def test_update_norm_by_hand():
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == pytest.approx(5.0)


def test_bound_norms_clip_by_hand():
    ups = [U(3.0, 4.0), U(0.0, 1.0), U(0.0, 2.0), U(30.0, 40.0)]   # norms 5, 1, 2, 50; median 3.5
    out, weights, hit = bound_norms(ups, [1, 2, 3, 4], multiple=2.0, action="clip")   # bound 7
    assert hit == 1 and weights == [1, 2, 3, 4]
    assert torch.allclose(out[3]["w"], torch.tensor([30.0, 40.0]) * 7 / 50)
    assert update_norm(out[3]) == pytest.approx(7.0)
    for a, b in zip(out[:3], ups[:3]):
        assert torch.equal(a["w"], b["w"])


def test_bound_norms_drop_removes_update_and_weight():
    ups = [U(3.0, 4.0), U(0.0, 1.0), U(0.0, 2.0), U(30.0, 40.0)]
    out, weights, hit = bound_norms(ups, [1, 2, 3, 4], multiple=2.0, action="drop")
    assert hit == 1 and weights == [1, 2, 3] and len(out) == 3


@pytest.mark.parametrize("action", ["drop", "clip"])
def test_bound_norms_drops_non_finite_updates_and_ignores_them_in_the_median(action):
    # norms 5, 1, 2, inf, nan: the median of the finite ones is 2, bound 4 -> the 5 is bounded too
    ups = [U(3.0, 4.0), U(0.0, 1.0), U(0.0, 2.0), U(float("inf"), 0.0), U(float("nan"), 1.0)]
    out, weights, hit = bound_norms(ups, [1, 2, 3, 4, 5], multiple=2.0, action=action)
    assert hit == 3 and all(torch.isfinite(u["w"]).all() for u in out)
    if action == "drop":
        assert weights == [2, 3] and len(out) == 2
    else:
        assert weights == [1, 2, 3] and update_norm(out[0]) == pytest.approx(4.0)


def test_bound_norms_needs_three_updates():
    ups = [U(1.0, 0.0), U(100.0, 0.0)]
    out, weights, hit = bound_norms(ups, [1, 1], multiple=1.0, action="clip")
    assert hit == 0 and torch.equal(out[1]["w"], ups[1]["w"])


def test_fedavg_strategy_clip_then_mean_by_hand():
    ups = [U(3.0, 4.0), U(0.0, 1.0), U(0.0, 2.0), U(30.0, 40.0)]
    strategy = FedAvg(norm_bound=2.0, norm_action="clip")
    out = strategy.aggregate(ups, [1, 1, 1, 1])
    clipped = torch.tensor([30.0, 40.0]) * 7 / 50
    expected = (torch.tensor([3.0, 4.0]) + torch.tensor([0.0, 1.0]) + torch.tensor([0.0, 2.0]) + clipped) / 4
    assert torch.allclose(out["w"], expected) and strategy.last_bounded == 1


def test_fedavg_strategy_without_bound_is_the_weighted_mean():
    out = FedAvg(norm_bound=None).aggregate(UPDATES, WEIGHTS)
    assert torch.allclose(out["w"], torch.tensor([22.5, 2.6]))


def test_robust_rules_in_a_strategy():
    out = FedAvg(aggregator=CoordinateMedian(), norm_bound=None).aggregate(UPDATES, WEIGHTS)
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))


def test_check_updates_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        check_updates([U(1.0, 2.0), U(1.0)])


def test_aggregators_agree_when_clients_agree():
    """Identical updates: every rule returns that update."""
    torch.manual_seed(0)
    u = {"a": torch.randn(20, 5), "b": torch.randn(5)}
    ups = [u] * 5
    for agg in (WeightedMean(), CoordinateMedian(), TrimmedMean(0.2)):
        out = agg(ups, [1, 2, 3, 4, 5])
        for k in u:
            assert torch.allclose(out[k], u[k], atol=1e-6), (agg, k)
