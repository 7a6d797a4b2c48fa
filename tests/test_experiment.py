"""The book's standard setting: one validation split disjoint from every client, partitions of the pool,
and a config that matches what the chapters say."""

import numpy as np
import pytest
import torch

from helpers import experiment
from helpers.experiment import (BOOK_SEED, NUM_CLIENTS, VAL_SIZE, book_config, book_partition, chapter_setup,
                                validation_split)


def test_validation_split_is_fixed_disjoint_and_complete(fmnist_train):
    pool, val = validation_split(len(fmnist_train))
    assert len(val) == VAL_SIZE and len(pool) == len(fmnist_train) - VAL_SIZE
    assert torch.cat([pool, val]).unique().numel() == len(fmnist_train)
    pool2, val2 = validation_split(len(fmnist_train))
    assert torch.equal(val, val2) and torch.equal(pool, pool2)
    assert not torch.equal(validation_split(len(fmnist_train), seed=BOOK_SEED + 1)[1], val)


@pytest.mark.parametrize("kind", ["dirichlet", "iid", "shards"])
def test_book_partition_covers_the_pool_and_never_touches_validation(fmnist_train, kind):
    pool, val = validation_split(len(fmnist_train))
    parts = book_partition(fmnist_train.y, kind)
    assert len(parts) == NUM_CLIENTS
    everything = torch.cat(parts)
    assert everything.numel() == everything.unique().numel() == len(pool)      # a disjoint cover of the pool
    assert torch.equal(everything.sort().values, pool.sort().values)
    assert not bool(torch.isin(everything, val).any())
    # different seeds give different partitions, the same seed the same one
    again = book_partition(fmnist_train.y, kind)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = book_partition(fmnist_train.y, kind, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))


def test_book_partition_of_a_given_pool_and_alpha(fmnist_train):
    pool = torch.arange(0, 20000, 2)
    parts = book_partition(fmnist_train.y, "dirichlet", num_clients=4, pool=pool, alpha=100.0)
    assert torch.equal(torch.cat(parts).sort().values, pool)
    sizes = [len(p) for p in parts]
    assert max(sizes) < 1.5 * min(sizes)          # α = 100 is close to IID
    with pytest.raises(ValueError, match="partition kind"):
        book_partition(fmnist_train.y, "nope")


def test_book_config_defaults_and_overrides():
    cfg = book_config()
    assert (cfg.rounds, cfg.fraction, cfg.local_epochs, cfg.batch_size, cfg.momentum, cfg.seed) == (3, 1.0, 1, 32, 0.9, 0)
    assert cfg.lr == experiment.CNN_LR
    assert book_config(lr=experiment.MLP_LR, rounds=5).rounds == 5
    with pytest.raises(ValueError, match="lr"):
        book_config(lr=-1)


def test_chapter_setup_seeds_threads_and_data():
    threads = torch.get_num_threads()
    try:
        book = chapter_setup()
        assert torch.get_num_threads() == experiment.THREADS
        a = torch.rand(3)
        chapter_setup()
        assert torch.equal(torch.rand(3), a)                      # seeded
        assert len(book.val) == VAL_SIZE and torch.equal(book.val.y, book.train.y[book.val_idx])
        assert len(book.test) == 10_000
    finally:
        torch.set_num_threads(threads)


def test_paired_comparison_follows_the_book_rule():
    from helpers.experiment import paired_comparison

    c = paired_comparison([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])          # +10 pp on every seed, spread 2 pp
    assert c.conclusive and c.verdict == "a better"
    assert c.mean == pytest.approx(0.1) and c.min == pytest.approx(0.09) and c.max == pytest.approx(0.11)
    assert c.spread == pytest.approx(0.02)
    c = paired_comparison([0.80, 0.84, 0.81], [0.79, 0.83, 0.80])          # +1 pp every seed, but spread 4 pp
    assert not c.conclusive and c.verdict == "indistinguishable at this budget"
    c = paired_comparison([0.80, 0.70], [0.75, 0.75])                      # signs differ
    assert not c.conclusive
    assert paired_comparison([0.5, 0.5], [0.6, 0.6]).verdict == "b better"
    with pytest.raises(ValueError):
        paired_comparison([0.5], [0.6])


def test_a_firm_verdict_survives_every_drift_of_the_accuracies():
    """firm() promises that moving each accuracy by up to DRIFT cannot change the verdict: check it against
    brute force (every corner of the box and random points inside it) on many random comparisons."""
    import itertools

    from helpers.experiment import DRIFT, paired_comparison

    rng = np.random.default_rng(0)
    corners = np.array(list(itertools.product((-1.0, 1.0), repeat=6)))
    firm_seen = {True: 0, False: 0}
    for _ in range(400):
        a = 0.80 + rng.normal(0, 0.01, 3)
        b = a - rng.normal(rng.choice([0.0, 0.01, 0.02]), 0.006, 3)
        c = paired_comparison(a, b)
        firm_seen[c.firm()] += 1
        if not c.firm():
            continue
        moves = np.vstack([corners, rng.uniform(-1, 1, (200, 6))]) * DRIFT
        for m in moves:
            moved = paired_comparison(a + m[:3], b + m[3:])
            assert moved.conclusive == c.conclusive and (not c.conclusive or np.sign(moved.mean) == np.sign(c.mean))
    assert firm_seen[True] > 50 and firm_seen[False] > 50      # both kinds were exercised


def test_knife_edge_verdicts_are_not_firm_and_are_explained():
    from helpers.experiment import paired_comparison

    # Chapter 2's 2-bit rounding comparison as first measured: +1.34 pp on average against a 1.40 pp spread
    c = paired_comparison([0.8321, 0.8227, 0.8367], [0.8165, 0.8126, 0.8223])
    assert not c.conclusive and not c.firm()
    assert "every seed favours SR" in c.explain("SR", "det") and "+1.34 pp" in c.explain("SR", "det")
    clear = paired_comparison([0.80, 0.82, 0.81], [0.70, 0.71, 0.72])
    assert clear.firm() and clear.explain("A", "B").startswith("A is better than B")
    mixed = paired_comparison([0.80, 0.70, 0.75], [0.75, 0.75, 0.75])
    assert mixed.firm() and "change sign" in mixed.explain("A", "B")
    with pytest.raises(ValueError):
        clear.firm(-0.1)


def test_simplest_within_noise_ignores_ties_and_respects_clear_losses():
    from helpers.experiment import simplest_within_noise

    # T = 2 has the best mean, but T = 1 (listed first, the simplest) is within the seeds' noise of it
    tied = {1: [0.820, 0.815, 0.831], 2: [0.824, 0.818, 0.833], 4: [0.821, 0.812, 0.830]}
    assert simplest_within_noise(tied) == 1
    # a simpler setting that is worse on every seed, beyond the spread, is skipped
    clear = {1: [0.70, 0.71, 0.72], 2: [0.80, 0.82, 0.81], 4: [0.79, 0.815, 0.80]}
    assert simplest_within_noise(clear) == 2
    assert simplest_within_noise({"only": [0.5, 0.6]}) == "only"
    with pytest.raises(ValueError):
        simplest_within_noise({})
