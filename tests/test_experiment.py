"""The book's standard setting: one validation split disjoint from every client, partitions of the pool,
and a config that matches what the chapters say."""

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
