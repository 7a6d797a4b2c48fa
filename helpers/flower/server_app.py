r"""The book's Flower **ServerApp**: FedAvg rounds driven over Flower's ``Grid``.

It is :func:`helpers.federated.run_federated`'s round with the network made real: the same
:class:`helpers.federated.Server` (broadcast, decode + validate, apply), the same strategy object
(:class:`helpers.aggregation.FedAvg`: sampling from ``np.random.default_rng(seed)``, norm bound,
weighted mean), the same initial model and evaluation. Only the transport differs: the downlink
payload goes out in one ``train`` message per sampled node, the replies come back in any order and
are put back in client-id order before aggregating (floating-point sums depend on the order):

.. math::  w_{t+1} = w_t + \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j}\, \Delta_k .

A node that does not answer within ``round-timeout`` (or answers with an error) is left out of the
round and recorded in ``dropped``; a payload that does not decode is rejected as in the simulator.
The ServerApp writes ``progress.log`` (one line per round), ``global.bin`` (the final model, float32
codec) and ``result.json`` into ``result-dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..aggregation import FedAvg
from ..codecs import Float32Codec
from ..data import load_dataset
from ..federated import RoundTally, Server
from ..history import History
from .task import AppSettings, initial_model, make_codec, payload_record, record_payload, test_subset

__all__ = ["app", "EngineRun", "wait_for_nodes", "partition_map", "run_rounds"]

app = ServerApp()


@dataclasses.dataclass
class EngineRun:
    """What :func:`run_rounds` returns: the global model, its history, the server, and what went missing."""

    model: torch.nn.Module
    history: History
    server: Server
    nodes: dict[int, int]                       # partition id -> Flower node id
    dropped: list[tuple[int, int, str]]         # (round, partition id, reason): no usable reply
    client_seconds: list[dict]                  # per reply: round, partition id and the ClientApp's phases (s)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """The ids of the connected SuperNodes once there are ``count`` (a ``TimeoutError`` after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.5)


def _check_partition(pid: object, num_nodes: int, seen: dict[int, int], node: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, (int, float)) or pid != int(pid) or not 0 <= pid < num_nodes:
        raise ValueError(f"node {node} reports partition-id {pid!r}, outside [0, {num_nodes})")
    pid = int(pid)
    if pid in seen and seen[pid] != node:
        raise ValueError(f"nodes {seen[pid]} and {node} both report partition-id {pid}: "
                         f"give each SuperNode its own --node-config partition-id")
    return pid


def partition_map(grid: Grid, nodes: list[int], num_nodes: int, timeout: float) -> dict[int, int]:
    """Ask every node which partition it holds (one ``query`` message each): partition id -> node id."""
    msgs = [Message(RecordDict({"node": ConfigRecord({})}), dst_node_id=n, message_type="query") for n in nodes]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed the query: {reply.error.reason}")
        node = reply.metadata.src_node_id
        found[_check_partition(reply.content["node"]["partition-id"], num_nodes, found, node)] = node
    if len(found) != num_nodes:
        raise RuntimeError(f"{len(found)} of {num_nodes} partitions answered: {sorted(found)}")
    return found


def run_rounds(grid: Grid, settings: AppSettings, log: Callable[[str], None] = print) -> EngineRun:
    """``settings.fed.rounds`` rounds of FedAvg over the grid; the simulator's round, message by message."""
    torch.set_num_threads(settings.threads)
    cfg = settings.fed
    server = Server(initial_model(cfg.seed), make_codec(settings.uplink), make_codec(settings.downlink), FedAvg())
    strategy = server.strategy
    test = test_subset(load_dataset("fashion_mnist", train=False), settings)
    nodes = wait_for_nodes(grid, settings.num_nodes, settings.node_timeout)
    if len(nodes) != settings.num_nodes:
        raise ValueError(f"{len(nodes)} SuperNodes are connected but the run config says num-nodes={settings.num_nodes}")
    log(f"{len(nodes)} SuperNodes connected; {cfg.rounds} rounds, uplink {settings.uplink}, "
        f"downlink {settings.downlink}")
    # With every node in every round the replies say who is who; sampling by id needs the map first.
    node_of = {} if cfg.fraction == 1.0 else partition_map(grid, nodes, settings.num_nodes, settings.round_timeout)
    rng = np.random.default_rng(cfg.seed)
    history, dropped, client_seconds = History(label="flower"), [], []
    for round_idx in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        strategy.before_round(round_idx, server)
        chosen = strategy.sample_clients(settings.num_nodes, cfg.fraction, rng)
        targets = nodes if cfg.fraction == 1.0 else [node_of[c] for c in chosen]
        down = server.broadcast()
        msgs = [Message(RecordDict({"global": payload_record(down), "config": ConfigRecord({"round": round_idx})}),
                        dst_node_id=n, message_type="train") for n in targets]
        replies: dict[int, tuple[bytes, int, float]] = {}
        owner: dict[int, int] = {}
        for reply in grid.send_and_receive(msgs, timeout=settings.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(f"round {round_idx}: node {node} replied with an error: {reply.error.reason}")
                continue
            m = reply.content["metrics"]
            pid = _check_partition(m["partition-id"], settings.num_nodes, owner, node)
            owner[pid] = node
            replies[pid] = (record_payload(reply.content["update"]), int(m["num-examples"]), float(m["train-loss"]))
            client_seconds.append({"round": round_idx, "partition-id": pid,
                                   **{k[len("seconds-"):]: float(v) for k, v in m.items() if k.startswith("seconds-")}})
        node_of.update(owner)
        # The simulator's bookkeeping (helpers.federated.RoundTally), in client-id order.
        tally = RoundTally()
        for cid in chosen:
            if cid not in replies:
                dropped.append((round_idx, cid, "no reply within round-timeout or an error reply"))
                continue
            payload, n, loss = replies[cid]
            tally.receive(server, payload, round_idx, cid, n, loss, cfg)
        record = tally.close(server, test, round_idx, cfg, bytes_down=len(down) * len(chosen), clients=len(chosen),
                             t0=t0)
        history.rows.append(record)
        acc = "  -   " if math.isnan(record.test_acc) else f"{record.test_acc:.4f}"
        log(f"round {round_idx}/{cfg.rounds}: test acc {acc}, {len(replies)}/{len(chosen)} replies, "
            f"up {record.bytes_up:,} B, {record.seconds:.1f} s")
    return EngineRun(server.model, history, server, dict(sorted(node_of.items())), dropped, client_seconds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = AppSettings.from_run_config(context.run_config)
    out = Path(settings.result_dir) if settings.result_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)                     # into the run's log (`flwr log`)
        if out is not None:
            with open(out / "progress.log", "a") as f:
                f.write(line + "\n")

    run = run_rounds(grid, settings, log)
    if out is None:
        return
    (out / "global.bin").write_bytes(Float32Codec().encode(run.server.state))
    result = {
        "run-id": context.run_id,
        "settings": {k: v for k, v in context.run_config.items()},
        "rounds": [dataclasses.asdict(r) for r in run.history.rows],
        "final_accuracy": run.history.final_accuracy,
        "bytes_up_per_client": run.history.bytes_up_per_client,
        "nodes": {str(k): v for k, v in run.nodes.items()},
        "dropped": run.dropped,
        "client_seconds": run.client_seconds,
        "rejected": run.server.rejected,
        "torch_threads": torch.get_num_threads(),
    }
    tmp = out / "result.json.part"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")                 # the launcher never reads a half-written file
