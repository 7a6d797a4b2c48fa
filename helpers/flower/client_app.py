r"""The book's Flower **ClientApp**: one federated client, run by a SuperNode for each message.

A ``train`` message carries the round number and the server's downlink payload. The client reads its
own data: the file named by ``data-path`` in its node config (written by
:func:`~helpers.flower.task.write_node_data`: that node's rows and nothing else), or, on a node started
without one (Flower's simulation engine), it carves its partition (``partition-id``) out of the shared
training set. It decodes the global state and runs *the simulator's own*
:meth:`helpers.federated.Client.local_update` (same SGD, same learning rate for the round, same minibatch
order from :func:`helpers.training.client_generator`). It replies with the update encoded by the uplink
codec, plus its partition id and sample count:

.. math::  \Delta_k = w_t^k - w_t \;\longrightarrow\; \texttt{uplink.encode}(\Delta_k) \text{ (bytes)}.

An ``evaluate`` message carries the global model the same way; the client evaluates it on *its own*
test split (:func:`~helpers.flower.task.node_test_rows`, in its data file on a deployment node) and replies
with its accuracy, loss and number of test images: Flower's federated evaluation, next to the server's
central test. A ``query`` message asks only for the partition id (the server needs it to sample clients
by id).

With ``strategy = "flower-fedavg"`` in the run config the server is Flower's built-in ``FedAvg``: a
``train`` message then carries the global weights as float32 arrays (``arrays``) and the client replies
with its new weights the same way, Flower's usual exchange, no codec.

:func:`make_app` builds the ClientApp; ``app`` (the one ``app/pyproject.toml`` names) reads the run
configuration from each message's context, ``make_app(run_config)`` fixes it (Flower's in-process
``run_simulation`` hands the apps an empty run configuration).
"""

from __future__ import annotations

import time
from typing import Mapping, NamedTuple

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data import TensorDataset, load_dataset
from ..federated import Client
from ..training import evaluate as evaluate_model
from ..training import float_state
from .task import (AppSettings, initial_model, make_codec, node_partition, node_test_rows, payload_record,
                   read_node_data, read_node_test, record_payload)

__all__ = ["app", "make_app", "node_identity", "node_data", "node_test_data", "LocalRound", "local_round",
           "local_evaluation", "train", "evaluate", "query"]


def node_identity(context: Context, settings: AppSettings) -> int:
    """This node's partition id, checked against the run (``partition-id`` in ``--node-config``)."""
    pid, parts = context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < settings.num_nodes:
        raise ValueError(f"node config partition-id must be an int in [0, {settings.num_nodes}), got {pid!r}")
    if parts is not None and parts != settings.num_nodes:
        raise ValueError(f"node config says num-partitions={parts}, the run has num-nodes={settings.num_nodes}")
    return pid


def node_test_data(settings: AppSettings, pid: int, data_path: str | None = None) -> TensorDataset:
    """This node's own test split: from its data file on a deployment node, else rows
    :func:`~helpers.flower.task.node_test_rows` of the shared test set (the simulation engine)."""
    if data_path:
        return read_node_test(data_path, pid, settings)
    test = load_dataset("fashion_mnist", train=False)
    return test.subset(node_test_rows(len(test), settings, pid))


def node_data(settings: AppSettings, pid: int, data_path: str | None = None) -> tuple[TensorDataset, torch.Tensor]:
    """(dataset, this client's row indices in it). With ``data_path`` (a deployment node): the node's own
    file, all of whose rows are its own; without (the simulation engine): the shared training set and
    partition ``pid`` of it."""
    if data_path:
        own = read_node_data(data_path, pid, settings)
        return own, torch.arange(len(own))
    train = load_dataset("fashion_mnist", train=True)
    return train, node_partition(train.y, settings)[pid]


class LocalRound(NamedTuple):
    """What :func:`local_round` returns."""
    payload: bytes                 # the update, encoded by the uplink codec
    num_samples: int
    loss: float                    # mean training loss
    seconds: dict[str, float]      # wall-clock seconds of its phases: "data", "train" (decode, SGD, encode)


def local_round(settings: AppSettings, pid: int, round_idx: int, down: bytes,
                data_path: str | None = None) -> LocalRound:
    """One client's round: decode the global state, train on partition ``pid`` (read by :func:`node_data`)
    exactly as the simulator does, return the encoded update, the sample count, the loss and the timings."""
    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    data, rows = node_data(settings, pid, data_path)
    t1 = time.perf_counter()
    client = Client(pid, rows)
    model = initial_model(settings.fed.seed)          # its weights are all replaced by the server's
    start = make_codec(settings.downlink).decode(down, reference=float_state(model))
    update, loss = client.local_update(model, start, data, settings.fed, round_idx)
    payload = make_codec(settings.uplink).encode(update)
    return LocalRound(payload, client.num_samples, loss, {"data": t1 - t0, "train": time.perf_counter() - t1})


def local_evaluation(settings: AppSettings, pid: int, down: bytes, data_path: str | None = None) -> tuple[float, float, int]:
    """(loss, accuracy, number of test images) of the global model in ``down`` on node ``pid``'s own test split."""
    torch.set_num_threads(settings.threads)
    test = node_test_data(settings, pid, data_path)
    model = initial_model(settings.fed.seed)
    model.load_state_dict(make_codec(settings.downlink).decode(down, reference=float_state(model)), strict=False)
    loss, acc = evaluate_model(model, test)
    return loss, acc, len(test)


def _settings(context: Context, run_config: Mapping[str, object] | None) -> AppSettings:
    return AppSettings.from_run_config(context.run_config if run_config is None else {**context.run_config, **run_config})


def _data_path(context: Context) -> str | None:
    data_path = context.node_config.get("data-path")
    if data_path is not None and not isinstance(data_path, str):
        raise ValueError(f"node config data-path must be a string, got {data_path!r}")
    return data_path


def train(msg: Message, context: Context, run_config: Mapping[str, object] | None = None) -> Message:
    """The ``train`` handler: one client's round (:func:`local_round`), its update as a codec payload."""
    handler_at = time.time()
    settings = _settings(context, run_config)
    pid = node_identity(context, settings)
    round_idx = int(msg.content["config"]["server-round"])
    if settings.strategy == "flower-fedavg":               # Flower's built-in FedAvg: float32 weights both ways
        return _train_float32(msg, context, settings, pid, round_idx)
    done = local_round(settings, pid, round_idx, record_payload(msg.content["global"]), _data_path(context))
    # On the deployment engine each message gets a fresh ClientApp process: before this handler runs, it
    # starts Python, imports Flower, PyTorch and helpers, and pulls the message from its SuperNode.
    seconds = {"start": handler_at - psutil.Process().create_time(), **done.seconds}
    return msg.create_reply(RecordDict({
        "update": payload_record(done.payload),
        "metrics": MetricRecord({"partition-id": pid, "num-examples": done.num_samples, "train-loss": done.loss,
                                 **{f"seconds-{k}": max(0.0, v) for k, v in seconds.items()}}),
    }))


def _train_float32(msg: Message, context: Context, settings: AppSettings, pid: int, round_idx: int) -> Message:
    """Flower's usual exchange: the global weights arrive as an ``ArrayRecord`` of float32 arrays, the same
    local SGD runs on them, and the client's new weights go back the same way."""
    torch.set_num_threads(settings.threads)
    data, rows = node_data(settings, pid, _data_path(context))
    client = Client(pid, rows)
    model = initial_model(settings.fed.seed)
    start = {k: v.float() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    update, loss = client.local_update(model, start, data, settings.fed, round_idx)
    local = {k: start[k] + update[k] for k in start}              # w_t^k = w_t + Delta_k
    return msg.create_reply(RecordDict({
        "arrays": ArrayRecord(local),
        "metrics": MetricRecord({"num-examples": client.num_samples, "train-loss": loss}),
    }))


def evaluate(msg: Message, context: Context, run_config: Mapping[str, object] | None = None) -> Message:
    """The ``evaluate`` handler: the global model on this node's own test split (federated evaluation)."""
    settings = _settings(context, run_config)
    pid = node_identity(context, settings)
    if "arrays" in msg.content.array_records:                      # Flower's built-in FedAvg: float32 weights
        torch.set_num_threads(settings.threads)
        model = initial_model(settings.fed.seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        test = node_test_data(settings, pid, _data_path(context))
        (loss, acc), n = evaluate_model(model, test), len(test)
    else:
        loss, acc, n = local_evaluation(settings, pid, record_payload(msg.content["global"]), _data_path(context))
    return msg.create_reply(RecordDict({
        "metrics": MetricRecord({"num-examples": n, "eval-acc": acc, "eval-loss": loss}),
    }))


def query(msg: Message, context: Context, run_config: Mapping[str, object] | None = None) -> Message:
    """The ``query`` handler: which partition this node holds."""
    pid = node_identity(context, _settings(context, run_config))
    return msg.create_reply(RecordDict({"node": ConfigRecord({"partition-id": pid})}))


def make_app(run_config: Mapping[str, object] | None = None) -> ClientApp:
    """A ClientApp with the ``train``, ``evaluate`` and ``query`` handlers above. With ``run_config``, its
    keys override each message's ``context.run_config`` (which Flower's in-process simulation leaves empty)."""
    fixed = None if run_config is None else dict(run_config)
    new = ClientApp()

    @new.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, fixed)

    @new.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, fixed)

    @new.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, context, fixed)

    return new


app = make_app()
