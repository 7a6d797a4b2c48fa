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


def test_compare_is_the_paired_statistic_with_the_books_margin():
    from helpers.experiment import MARGIN_PP, compare, is_firm
    from helpers.stats import paired

    a, b = [0.80, 0.82, 0.81, 0.83, 0.80, 0.82], [0.70, 0.71, 0.72, 0.73, 0.71, 0.70]
    c = compare(a, b)
    assert c == paired(a, b, margin_pp=MARGIN_PP) and c.verdict == "better" and c.margin_pp == 0.5
    assert is_firm(c)                                     # +10 pp on every seed survives any 0.5 pp drift
    close = compare([0.800, 0.810, 0.805, 0.812, 0.808, 0.803], [0.801, 0.809, 0.806, 0.811, 0.807, 0.804])
    assert close.verdict == "equivalent" and not is_firm(close)   # a 1 pp move per difference leaves the margin
    # Chapter 2's 2-bit rounding comparison as first measured (3 seeds): the old rule said "indistinguishable";
    # the t-interval excludes 0, but not firmly
    knife = compare([0.8321, 0.8227, 0.8367], [0.8165, 0.8126, 0.8223])
    assert knife.verdict == "better" and not is_firm(knife)


def test_choose_setting_takes_the_simplest_equivalent_to_the_best():
    from helpers.experiment import choose_setting

    tied = {1: [0.820, 0.815, 0.831, 0.825], 2: [0.821, 0.816, 0.832, 0.826], 4: [0.819, 0.812, 0.830, 0.826]}
    assert choose_setting(tied) == 1                     # 0.1 pp below the best on every seed: equivalent
    clear = {1: [0.70, 0.71, 0.72, 0.70], 2: [0.80, 0.82, 0.81, 0.80], 4: [0.79, 0.815, 0.80, 0.81]}
    assert choose_setting(clear) == 2
    assert choose_setting({"only": [0.5, 0.6]}) == "only"
    with pytest.raises(ValueError):
        choose_setting({})

