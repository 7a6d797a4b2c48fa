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

from . import plots
from .data import TensorDataset, load_dataset, partition_dirichlet, partition_iid, partition_shards, split_indices
from .federated import FedConfig, run_federated
from .models import MLP, SmallCNN
from .reproducibility import seed_everything

__all__ = ["BOOK_SEED", "NUM_CLIENTS", "DIRICHLET_ALPHA", "SHARDS_PER_CLIENT", "VAL_SIZE", "THREADS", "CNN_LR",
           "MLP_LR", "SEEDS", "BookData", "book_data", "validation_split", "book_partition", "book_config",
           "chapter_setup", "DRIFT", "PairedComparison", "paired_comparison",
           "simplest_within_noise", "fedavg_seed"]

K = TypeVar("K")

BOOK_SEED = 0
SEEDS = (0, 1, 2)          # the seeds behind every comparison (seed = partition + initialisation + sampling)
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
by 0.1-0.4 pp. On an AMD EPYC machine (AVX2, other BLAS code paths) against the same Intel machine, float32 runs
moved by 0.1-0.6 pp, and runs that amplify rounding (2-bit QAT, partial participation) by up to 2 pp: their
trajectories part after the first differing bit, and the final accuracy is a new draw of the seed's noise.
Moving every accuracy by 0.5 pp moves a paired difference, and the spread, by up to 1 pp each. A verdict is
*firm* when it survives that (:meth:`PairedComparison.firm`); the chaotic ones rarely are, and the chapters word
them from the numbers instead of pinning them."""


@dataclass(frozen=True)
class PairedComparison:
    """Method a against method b on the same seeds (see :func:`paired_comparison`); accuracies as fractions."""

    diffs: tuple[float, ...]   # a - b, seed by seed
    mean: float                # mean paired difference
    min: float
    max: float
    spread: float              # the larger min..max range of the two methods' own accuracies
    conclusive: bool           # the book's rule: same sign on every seed and |mean| > spread

    @property
    def verdict(self) -> str:
        if not self.conclusive:
            return "indistinguishable at this budget"
        return "a better" if self.mean > 0 else "b better"

    def firm(self, drift: float = DRIFT) -> bool:
        r"""Whether the verdict survives moving every accuracy by up to ``drift`` in either direction.

        Each :math:`d_i` and the mean then move by at most :math:`2\,\mathrm{drift}`, and so does the spread.
        A conclusion is firm when :math:`\min_i |d_i| > 2\,\mathrm{drift}` and
        :math:`|\bar d| - \mathrm{spread} > 4\,\mathrm{drift}`; "indistinguishable" is firm when some
        :math:`d_i` lie beyond :math:`\pm 2\,\mathrm{drift}` on both sides, or when
        :math:`\mathrm{spread} - |\bar d| > 4\,\mathrm{drift}`. Chapters assert firm verdicts and compute
        (glue) the words of the others, which may read differently on another machine."""
        if drift < 0:
            raise ValueError(f"drift must be >= 0, got {drift}")
        if self.conclusive:
            return min(abs(d) for d in self.diffs) > 2 * drift and abs(self.mean) - self.spread > 4 * drift
        both_signs = self.min < -2 * drift and self.max > 2 * drift
        return both_signs or self.spread - abs(self.mean) > 4 * drift

    def explain(self, a: str, b: str) -> str:
        """The verdict in words, with its numbers (pp), for the prose: ``a`` and ``b`` name the two methods."""
        rng = f"{100 * self.min:+.2f} to {100 * self.max:+.2f} pp"
        mean, spread = f"{100 * self.mean:+.2f} pp", f"{100 * self.spread:.2f} pp"
        if self.conclusive:
            winner, loser = (a, b) if self.mean > 0 else (b, a)
            return (f"{winner} is better than {loser}: every seed favours it ({rng}) and the mean difference, "
                    f"{mean}, exceeds the {spread} spread of the accuracies")
        if self.min > 0 or self.max < 0:
            favoured = a if self.mean > 0 else b
            return (f"{a} and {b} are indistinguishable at this budget: every seed favours {favoured} ({rng}), "
                    f"but the mean difference, {mean}, does not exceed the {spread} spread of the accuracies")
        return (f"{a} and {b} are indistinguishable at this budget: the paired differences change sign "
                f"({rng}; mean {mean}, spread of the accuracies {spread})")


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    r"""The book's one rule for comparisons. ``a[i]`` and ``b[i]`` are the two methods' accuracies on seed i
    (same partition, initialisation and sampling). With paired differences :math:`d_i = a_i - b_i`, a
    conclusion is drawn only when every :math:`d_i` has the same sign and
    :math:`|\bar d| > \max(\mathrm{range}(a), \mathrm{range}(b))`, the spread of the accuracies themselves."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape or len(a_arr) < 2:
        raise ValueError(f"a and b must be equally long sequences of ≥ 2 paired results, got {len(a)} and {len(b)}")
    d = a_arr - b_arr
    spread = max(float(np.ptp(a_arr)), float(np.ptp(b_arr)))
    same_sign = bool(np.all(d > 0) or np.all(d < 0))
    return PairedComparison(diffs=tuple(float(x) for x in d), mean=float(d.mean()), min=float(d.min()),
                            max=float(d.max()), spread=spread, conclusive=same_sign and abs(float(d.mean())) > spread)


def simplest_within_noise(scores: Mapping[K, Sequence[float]]) -> K:
    """Choose a setting on validation: the first key of ``scores`` (list them simplest first) that is not
    worse than the best mean by the book's rule, i.e. whose :func:`paired_comparison` with the best setting
    is not a conclusion against it. ``scores[k]`` holds setting k's validation accuracies, one per seed.

    Taking the plain maximum of the means picks among settings that the seeds cannot tell apart, so the
    choice flips with the last bits of the arithmetic (another CPU); this choice only moves when a simpler
    setting becomes *measurably* worse."""
    if not scores:
        raise ValueError("scores is empty: nothing to choose from")
    best = max(scores, key=lambda k: float(np.mean(scores[k])))
    for key, accs in scores.items():
        against_best = paired_comparison(scores[best], accs)
        if key == best or not (against_best.conclusive and against_best.mean > 0):
            return key
    return best


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
