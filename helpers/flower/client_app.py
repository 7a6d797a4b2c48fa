r"""The book's Flower **ClientApp**: one federated client, run by a SuperNode for each message.

A ``train`` message carries the round number and the server's downlink payload. The client rebuilds
its partition from the run config and its node config (``partition-id``), decodes the global state,
and runs *the simulator's own* :meth:`helpers.federated.Client.local_update` (same SGD, same learning
rate for the round, same minibatch order from :func:`helpers.training.client_generator`). It replies
with the update encoded by the uplink codec, plus its partition id and sample count:

.. math::  \Delta_k = w_t^k - w_t \;\longrightarrow\; \texttt{uplink.encode}(\Delta_k) \text{ (bytes)}.

A ``query`` message asks only for the partition id (the server needs it to sample clients by id).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data import load_dataset
from ..federated import Client
from ..training import float_state
from .task import AppSettings, initial_model, make_codec, node_partition, payload_record, record_payload

__all__ = ["app", "node_identity", "local_round"]

app = ClientApp()


def node_identity(context: Context, settings: AppSettings) -> int:
    """This node's partition id, checked against the run (``partition-id`` in ``--node-config``)."""
    pid, parts = context.node_config.get("partition-id"), context.node_config.get("num-partitions")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < settings.num_nodes:
        raise ValueError(f"node config partition-id must be an int in [0, {settings.num_nodes}), got {pid!r}")
    if parts is not None and parts != settings.num_nodes:
        raise ValueError(f"node config says num-partitions={parts}, the run has num-nodes={settings.num_nodes}")
    return pid


def local_round(settings: AppSettings, pid: int, round_idx: int, down: bytes) -> tuple[bytes, int, float]:
    """One client's round: decode the global state, train on partition ``pid`` exactly as the simulator
    does, return (uplink payload, number of samples, mean training loss)."""
    torch.set_num_threads(settings.threads)
    train = load_dataset("fashion_mnist", train=True)
    client = Client(pid, node_partition(train.y, settings)[pid])
    model = initial_model(settings.fed.seed)          # its weights are all replaced by the server's
    start = make_codec(settings.downlink).decode(down, reference=float_state(model))
    update, loss = client.local_update(model, start, train, settings.fed, round_idx)
    return make_codec(settings.uplink).encode(update), client.num_samples, loss


@app.train()
def train(msg: Message, context: Context) -> Message:
    settings = AppSettings.from_run_config(context.run_config)
    pid = node_identity(context, settings)
    round_idx = int(msg.content["config"]["round"])
    payload, n, loss = local_round(settings, pid, round_idx, record_payload(msg.content["global"]))
    return msg.create_reply(RecordDict({
        "update": payload_record(payload),
        "metrics": MetricRecord({"partition-id": pid, "num-examples": n, "train-loss": loss}),
    }))


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = node_identity(context, AppSettings.from_run_config(context.run_config))
    return msg.create_reply(RecordDict({"node": ConfigRecord({"partition-id": pid})}))
