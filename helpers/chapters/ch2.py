r"""Chapter 2's experiments: FedAvg of the MLP with quantized uploads, and federated QAT.

Each function is one run in the book's setting for one seed, a task for
:func:`helpers.parallel.run_parallel`; the chapter shows them with ``show_source``.
"""

from __future__ import annotations

import torch

from ..aggregation import FedAvg
from ..codecs import QuantizedCodec
from ..codecs.quantized import QATUploadCodec
from ..experiment import book_config, book_data, book_partition, validation_split
from ..federated import run_federated
from ..models import MLP
from ..quantization import QATFedAvg, swap_to_lsq
from ..reproducibility import seed_everything
from ..training import evaluate, float_state

__all__ = ["fedavg_task", "qat_task"]


class _KeepState(FedAvg):
    """FedAvg that keeps a copy of the global float state after round ``keep_after``."""

    def __init__(self, keep_after: int | None) -> None:
        super().__init__()
        self.keep_after, self.kept = keep_after, None

    def before_round(self, round_idx: int, server) -> None:
        if self.keep_after is not None and round_idx == self.keep_after + 1:
            self.kept = server.state


def _book_run_inputs(seed: int):
    """(train, test, val, partition) of the book's setting for ``seed`` (the partition depends on it)."""
    train, test = book_data()
    _, val_idx = validation_split(len(train))
    return train, test, train.subset(val_idx), book_partition(train.y, "dirichlet", seed=seed)


def fedavg_task(*, seed: int, lr: float, rounds: int = 3, fraction: float = 1.0, bits: int | None = None,
                stochastic: bool = False, error_feedback: bool = False, keep_after: int | None = None,
                hidden: tuple[int, ...] = (200,)) -> dict:
    """One FedAvg run of the MLP in the book's setting for ``seed`` (partition, initialisation, sampling and
    the codec's draws), scored on the validation split *and* the test set after the last round.

    ``bits=None`` uploads float32, else ``QuantizedCodec(bits, stochastic=stochastic, seed=seed)``.
    Returns ``val_acc``, ``test_acc``, ``bytes_up`` (mean per client per round), ``curve`` (after each round:
    the cumulative uplink bytes of all clients and the validation accuracy), ``state`` (the final global float
    state) and ``kept`` (the global state after round ``keep_after``, or None)."""
    train, test, val, parts = _book_run_inputs(seed)
    seed_everything(seed)
    model = MLP(hidden=tuple(hidden))
    cfg = book_config(seed=seed, lr=lr, rounds=rounds, fraction=fraction)
    uplink = None if bits is None else QuantizedCodec(bits, stochastic=stochastic, seed=seed)
    keep = _KeepState(keep_after)
    run = run_federated(model, train, parts, val, cfg, uplink=uplink, error_feedback=error_feedback, strategy=keep)
    sent = torch.cumsum(torch.tensor([r.bytes_up for r in run.history.rows], dtype=torch.float64), 0)
    return {"val_acc": run.history.final_accuracy, "test_acc": evaluate(run.model, test)[1],
            "bytes_up": run.history.bytes_up_per_client, "state": float_state(run.model), "kept": keep.kept,
            "curve": [(float(b), r.test_acc) for b, r in zip(sent, run.history.rows)]}


def qat_task(*, seed: int, lr: float, start: dict[str, torch.Tensor], bits: int, learn_step: bool = True,
             rounds: int = 2, packed_upload: bool = True, hidden: tuple[int, ...] = (200,),
             per_channel: bool = True, init: str = "lsq", step_lr: float | None = None) -> dict:
    """Federated QAT of the MLP for ``rounds`` rounds from the float state ``start``, LSQ steps per channel
    (``per_channel=False``: one per tensor) starting at the rule ``init`` (LSQ's initial value, or ``"maxabs"``,
    ``"mse"``), learned (with the weights' SGD, or their own plain SGD at ``step_lr``) or frozen with
    ``learn_step=False``; clients upload their quantized weights with ``QATUploadCodec(bits)`` (or float32
    updates with ``packed_upload=False``).

    Returns ``val_acc``, ``test_acc``, ``bytes_up`` (mean per client per round), ``state`` (the final LSQ
    model's state dict), ``steps`` (the global steps at rounds 0..R), ``rejected`` uploads and
    ``floor_hits`` (steps :class:`QATFedAvg` kept at its minimum step)."""
    train, test, val, parts = _book_run_inputs(seed)
    net = MLP(hidden=tuple(hidden))
    net.load_state_dict(start)
    lsq = swap_to_lsq(net, bits, per_channel=per_channel, learn_step=learn_step, step_lr=step_lr, init=init)
    strategy = QATFedAvg()
    cfg = book_config(seed=seed, lr=lr, rounds=rounds, eval_every=rounds)
    run = run_federated(lsq, train, parts, val, cfg, uplink=QATUploadCodec(bits) if packed_upload else None,
                        strategy=strategy)
    return {"val_acc": run.history.final_accuracy, "test_acc": evaluate(run.model, test)[1],
            "bytes_up": run.history.bytes_up_per_client, "state": dict(run.model.state_dict()),
            "steps": strategy.finish(run.model), "rejected": len(run.server.rejected),
            "floor_hits": strategy.floor_hits}
