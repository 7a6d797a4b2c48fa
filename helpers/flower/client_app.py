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

A ``query`` message asks only for the partition id (the server needs it to sample clients by id).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data import TensorDataset, load_dataset
from ..federated import Client
from ..training import float_state
from .task import (AppSettings, initial_model, make_codec, node_partition, payload_record, read_node_data,
                   record_payload)

__all__ = ["app", "node_identity", "node_data", "LocalRound", "local_round"]

app = ClientApp()


def node_identity(context: Context, settings: AppSettings) -> int:
    """This node's partition id, checked against the run (``partition-id`` in ``--node-config``)."""
    pid, parts = context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < settings.num_nodes:
        raise ValueError(f"node config partition-id must be an int in [0, {settings.num_nodes}), got {pid!r}")
    if parts is not None and parts != settings.num_nodes:
        raise ValueError(f"node config says num-partitions={parts}, the run has num-nodes={settings.num_nodes}")
    return pid


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    handler_at = time.time()
    settings = AppSettings.from_run_config(context.run_config)
    pid = node_identity(context, settings)
    round_idx = int(msg.content["config"]["round"])
    data_path = context.node_config.get("data-path")
    if data_path is not None and not isinstance(data_path, str):
        raise ValueError(f"node config data-path must be a string, got {data_path!r}")
    done = local_round(settings, pid, round_idx, record_payload(msg.content["global"]), data_path)
    # On the deployment engine each message gets a fresh ClientApp process: before this handler runs, it
    # starts Python, imports Flower, PyTorch and helpers, and pulls the message from its SuperNode.
    seconds = {"start": handler_at - psutil.Process().create_time(), **done.seconds}
    return msg.create_reply(RecordDict({
        "update": payload_record(done.payload),
        "metrics": MetricRecord({"partition-id": pid, "num-examples": done.num_samples, "train-loss": done.loss,
                                 **{f"seconds-{k}": max(0.0, v) for k, v in seconds.items()}}),
    }))


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = node_identity(context, AppSettings.from_run_config(context.run_config))
    return msg.create_reply(RecordDict({"node": ConfigRecord({"partition-id": pid})}))
