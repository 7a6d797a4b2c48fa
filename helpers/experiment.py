"""The book's standard federated setting, defined once so every chapter compares like with like.

Chapter 1 introduces it; later chapters import it, so "same seed, same partition, same rounds" is a
function call rather than a promise. :func:`chapter_setup` is every chapter's first code cell.

The training set is split once, with the book's seed, into a **validation** set of
:data:`VAL_SIZE` images and the **pool** the clients are drawn from; the two never overlap, and every
tuned value in the book (learning rates, thresholds, temperatures) is chosen on the validation set.
The test set only reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

import numpy as np
import torch

from IPython.display import Markdown

from . import plots
from .data import TensorDataset, load_dataset, partition_dirichlet, partition_iid, partition_shards, split_indices
from .glue import glue
from .federated import FedConfig, run_federated
from .models import MLP, SmallCNN
from .reproducibility import seed_everything
from .stats import Paired, paired, simplest_equivalent

__all__ = ["BOOK_SEED", "NUM_CLIENTS", "DIRICHLET_ALPHA", "SHARDS_PER_CLIENT", "VAL_SIZE", "THREADS", "CNN_LR",
           "MLP_LR", "SEEDS", "BookData", "book_data", "validation_split", "book_partition", "book_config",
           "chapter_setup", "DRIFT", "MARGIN_PP", "SEEDS_LONG", "compare", "is_firm", "choose_setting", "glue_comparison",
           "fedavg_seed"]

K = TypeVar("K")

BOOK_SEED = 0
SEEDS = (0, 1, 2, 3, 4, 5)
"""The seeds behind every comparison of runs that take a few seconds (the MLP's 3 rounds); a seed fixes the
partition, the initialisation and the sampling. With 6 pairs the exact sign-flip test can reach p = 2/64."""
SEEDS_LONG = (0, 1, 2)
"""The seeds of the longer runs (the CNN; Chapter 6's 8-10 round sweeps): at least 3, as the budget allows."""
NUM_CLIENTS = 10
DIRICHLET_ALPHA = 0.5
SHARDS_PER_CLIENT = 2
VAL_SIZE = 5000
THREADS = 1
"""torch threads per run. Measured (``benchmarks/simulator.py``, quiet 2-core machine): two 1-thread runs side
by side (:mod:`helpers.parallel`) do 1.5-1.6x the work of the same runs one after another on 2 threads, and
2 threads collapse on a busy machine. One thread also makes a run's result independent of where it ran."""

CNN_LR = 0.04
"""SmallCNN's local learning rate (SGD, momentum 0.9, batch 32), chosen on the validation split (Chapter 1)."""
MLP_LR = 0.02
"""The MLP's local learning rate (SGD, momentum 0.9, batch 32), chosen on the validation split (Chapter 2)."""


def book_data() -> tuple[TensorDataset, TensorDataset]:
    """(train, test) Fashion-MNIST as in-memory tensors."""
    return load_dataset("fashion_mnist", train=True), load_dataset("fashion_mnist", train=False)


def validation_split(num_train: int, size: int = VAL_SIZE, seed: int = BOOK_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, val): indices of the training set for the clients and for validation, disjoint, fixed by ``seed``."""
    return split_indices(num_train, size / num_train, seed)


def book_partition(labels: torch.Tensor, kind: str = "dirichlet", num_clients: int = NUM_CLIENTS,
                   seed: int = BOOK_SEED, pool: torch.Tensor | None = None,
                   alpha: float = DIRICHLET_ALPHA) -> list[torch.Tensor]:
    """The book's client split of ``pool`` (default: every index of ``labels`` outside the validation
    split) as indices into the full training set: ``"dirichlet"`` (α = 0.5 unless ``alpha`` is given),
    ``"iid"`` or ``"shards"`` (2 per client)."""
    if pool is None:
        pool = validation_split(len(labels))[0]
    pool = torch.as_tensor(pool, dtype=torch.long)
    y = labels[pool]
    if kind == "dirichlet":
        parts = partition_dirichlet(y, num_clients, alpha, seed=seed)
    elif kind == "iid":
        parts = partition_iid(y, num_clients, seed=seed)
    elif kind == "shards":
        parts = partition_shards(y, num_clients, SHARDS_PER_CLIENT, seed=seed)
    else:
        raise ValueError(f"unknown partition kind {kind!r}; choose 'dirichlet', 'iid' or 'shards'")
    return [pool[p] for p in parts]


def book_config(**overrides) -> FedConfig:
    """FedAvg as the book runs it: 3 rounds, every client each round, 1 local epoch of SGD
    (batch 32, lr :data:`CNN_LR`, momentum 0.9). Keyword arguments override single fields;
    the MLP chapters pass ``lr=MLP_LR``."""
    base = FedConfig(rounds=3, fraction=1.0, local_epochs=1, batch_size=32, lr=CNN_LR, momentum=0.9,
                     seed=BOOK_SEED)
    return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class BookData:
    """What :func:`chapter_setup` returns: the datasets and the fixed split of the training set."""

    train: TensorDataset   # all 60,000 training images (clients index into it)
    test: TensorDataset    # 10,000 test images: only for reporting
    pool: torch.Tensor     # training indices the clients are drawn from
    val_idx: torch.Tensor  # training indices held out for choosing hyper-parameters
    val: TensorDataset     # train.subset(val_idx)


def chapter_setup(seed: int = BOOK_SEED, threads: int = THREADS) -> BookData:
    """Every chapter's set-up cell: seed everything, fix the torch thread count, set the figure style,
    load Fashion-MNIST and split off the validation set."""
    seed_everything(seed, threads=threads)
    plots.use_book_style()
    train, test = book_data()
    pool, val_idx = validation_split(len(train))
    return BookData(train=train, test=test, pool=pool, val_idx=val_idx, val=train.subset(val_idx))


DRIFT = 0.005
"""How far one test accuracy may move when the same run executes on another CPU (0.5 pp). Measured twice. With
``ATEN_CPU_CAPABILITY=avx2`` instead of an Intel machine's AVX-512 kernels, the chapters' 3-round accuracies moved
by 0.1-0.4 pp. On an AMD EPYC machine (AVX-512 too, other BLAS code paths) against the same Intel machine, float32 runs
moved by 0.1-0.6 pp, and runs that amplify rounding (2-bit QAT, partial participation) by up to 2 pp: their
trajectories part after the first differing bit, and the final accuracy is a new draw of the seed's noise.
A verdict of :func:`compare` is *firm* when it survives every accuracy moving by this much
(:meth:`helpers.stats.Paired.firm`); chapters assert firm verdicts and word the others from their numbers."""

MARGIN_PP = 0.5
"""The equivalence margin of every accuracy comparison in the book, in percentage points, stated before any
run: two methods whose true mean accuracies differ by less than half a point are, for this book's
purposes, equally good (a reader choosing between them would decide on bytes or compute instead).
The chapters' learning-rate, threshold and temperature choices use the same margin."""


def compare(a: Sequence[float], b: Sequence[float], *, margin_pp: float = MARGIN_PP) -> Paired:
    """Method A's accuracies ``a`` against method B's ``b`` on the same seeds (fractions, seed by seed):
    :func:`helpers.stats.paired` with the book's margin (95% t-interval, sign-flip test, TOST)."""
    return paired(a, b, margin_pp=margin_pp)


def is_firm(c: Paired, drift: float = DRIFT) -> bool:
    """Whether ``c``'s verdict survives every accuracy moving by ``drift`` (a fraction, default :data:`DRIFT`)."""
    return c.firm(100 * drift)


def choose_setting(scores: Mapping[K, Sequence[float]], *, margin_pp: float = MARGIN_PP) -> K:
    """Choose a setting on validation: the simplest (first key) whose validation accuracies are equivalent
    to the best mean's within ``margin_pp`` (:func:`helpers.stats.simplest_equivalent`), the best if none is.

    Taking the plain maximum of the means picks among settings the seeds cannot tell apart, so the choice
    would flip with the last bits of the arithmetic (another CPU)."""
    return simplest_equivalent(scores, margin_pp=margin_pp)


def glue_comparison(name: str, c: Paired, a: str, b: str) -> None:
    """Glue comparison ``name`` under the book's convention: ``name_diff_pp``, ``name_ci_low_pp``,
    ``name_ci_high_pp``, ``name_n``, ``name_margin_pp``, ``name_verdict`` (the word), ``name_p`` (the sign-flip
    p-value) and ``name_explain`` (the verdict in words, Markdown; ``a`` and ``b`` name the methods)."""
    for key, value in c.glue_values(name).items():
        glue(key, value, display=False)
    glue(f"{name}_p", round(c.p_sign_flip, 3), display=False)
    glue(f"{name}_explain", Markdown(c.explain(a, b)), display=False)


def fedavg_seed(*, seed: int, train: TensorDataset, test: TensorDataset, partition: Sequence[torch.Tensor],
                config: FedConfig, hidden: tuple[int, ...] = (200,), model: str = "mlp") -> dict:
    """One seed of FedAvg, a small task for :func:`helpers.parallel.run_parallel` (the tests and the simulator
    benchmark use it): seed everything with ``seed`` (also ``config.seed``: client sampling and shuffling),
    build the model (``"mlp"`` with ``hidden`` units or ``"cnn"``), run ``config`` on ``partition`` and
    return the final global ``state`` (every tensor of the state dict), the test ``accuracy`` and the
    training ``samples`` processed."""
    if model not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    seed_everything(seed)
    net = MLP(hidden=tuple(hidden)) if model == "mlp" else SmallCNN()
    run = run_federated(net, train, partition, test, dataclasses.replace(config, seed=seed))
    return {"state": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
            "accuracy": run.history.final_accuracy, "samples": run.history.total_samples}
