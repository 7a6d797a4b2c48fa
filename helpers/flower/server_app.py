r"""The book's Flower **ServerApp**: FedAvg rounds driven by a Flower strategy over Flower's ``Grid``.

:class:`BookFedAvg` is Flower's own ``FedAvg`` (``flwr.serverapp.strategy``), run by its ``start`` loop
(train, federated evaluation, central evaluation, round after round), with the book's pieces in its
hooks: the same :class:`helpers.federated.Server` (broadcast, decode + validate, apply), the same
strategy object (:class:`helpers.aggregation.FedAvg`: sampling from ``np.random.default_rng(seed)``,
norm bound, weighted mean), the same initial model and evaluation as
:func:`helpers.federated.run_federated`. The codec runs in the client (encode) and in the strategy
(``configure_train`` encodes the downlink, ``aggregate_train`` decodes the uplink). Only the transport
differs: the downlink payload goes out in one ``train`` message per sampled node, the replies come back
in any order and are put back in client-id order before aggregating (floating-point sums depend on the
order):

.. math::  w_{t+1} = w_t + \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j}\, \Delta_k .

After each round (every ``evaluate-every`` rounds, and after the last) the nodes evaluate the global model
on their own test splits (``evaluate`` messages, ``fraction-evaluate`` of them; Flower's sample-weighted
mean of their metrics), next to the server's central test. A node that does not answer within ``round-timeout`` (or answers with an error) is left
out of the round and recorded in ``dropped``; a payload that does not decode is rejected as in the
simulator. With ``strategy = "flower-fedavg"`` the ServerApp runs Flower's built-in ``FedAvg`` unchanged,
on float32 weights (:func:`run_builtin_fedavg`). The ServerApp writes ``progress.log`` (one line per
round), ``global.bin`` (the final model, float32 codec) and ``result.json`` into ``result-dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flwr_strategy

from ..aggregation import FedAvg
from ..codecs import Float32Codec
from ..data import TensorDataset, load_dataset
from ..federated import RoundTally, Server
from ..history import History, RoundRecord
from ..training import evaluate, float_state
from .task import AppSettings, initial_model, make_codec, payload_record, record_payload, test_subset

__all__ = ["app", "make_app", "EngineRun", "BookFedAvg", "wait_for_nodes", "partition_map", "run_rounds",
           "run_builtin_fedavg"]


@dataclasses.dataclass
class EngineRun:
    """What :func:`run_rounds` returns: the global model, its history, the server, and what went missing."""

    model: torch.nn.Module
    history: History
    server: Server | None                       # None for Flower's built-in FedAvg
    nodes: dict[int, int]                       # partition id -> Flower node id
    dropped: list[tuple[int, int, str]]         # (round, partition id, reason): no usable reply
    client_seconds: list[dict]                  # per reply: round, partition id and the ClientApp's phases (s)
    federated_eval: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # round -> nodes' metrics


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


class BookFedAvg(flwr_strategy.FedAvg):
    """Flower's ``FedAvg`` strategy with the book's codecs, client sampling and aggregation.

    ``configure_train`` samples client ids as the simulator does and sends each sampled node the
    downlink payload; ``aggregate_train`` decodes and validates every uplink payload with the book's
    :class:`~helpers.federated.Server`, in client-id order, through the simulator's
    :class:`~helpers.federated.RoundTally`, evaluates on the central test set and returns the new global
    weights as an ``ArrayRecord``; ``configure_evaluate`` / ``aggregate_evaluate`` are Flower's federated
    evaluation on the nodes' own test splits (the payload again, Flower's weighted mean of the metrics).
    """

    def __init__(self, settings: AppSettings, server: Server, test: TensorDataset,
                 log: Callable[[str], None] = print) -> None:
        super().__init__(fraction_train=settings.fed.fraction, fraction_evaluate=settings.fraction_evaluate,
                         min_train_nodes=1, min_evaluate_nodes=1 if settings.fraction_evaluate > 0 else 0,
                         min_available_nodes=settings.num_nodes, arrayrecord_key="global")
        self.settings, self.server, self.test, self.log = settings, server, test, log
        self.rng = np.random.default_rng(settings.fed.seed)            # the simulator's sampling stream
        self.eval_rng = np.random.default_rng([settings.fed.seed, 1])  # which nodes evaluate (if not all)
        self.nodes: list[int] = []
        self.node_of: dict[int, int] = {}                              # partition id -> Flower node id
        self.history = History(label="flower")
        self.dropped: list[tuple[int, int, str]] = []
        self.client_seconds: list[dict] = []
        self.federated_eval: dict[int, dict[str, float]] = {}
        self._round: tuple[int, list[int], int, float] | None = None   # (round, chosen ids, downlink bytes, t0)

    def _connect(self, grid: Grid) -> None:
        if self.nodes:
            return
        s = self.settings
        self.nodes = wait_for_nodes(grid, s.num_nodes, s.node_timeout)
        if len(self.nodes) != s.num_nodes:
            raise ValueError(f"{len(self.nodes)} SuperNodes are connected but the run config says num-nodes={s.num_nodes}")
        self.log(f"{len(self.nodes)} SuperNodes connected; {s.fed.rounds} rounds, uplink {s.uplink}, "
                 f"downlink {s.downlink}")
        # With every node in every round the replies say who is who; sampling by id needs the map first.
        if s.fed.fraction < 1.0 or 0.0 < s.fraction_evaluate < 1.0:
            self.node_of = partition_map(grid, self.nodes, s.num_nodes, s.round_timeout)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._connect(grid)
        t0 = time.perf_counter()
        strategy, s = self.server.strategy, self.settings
        strategy.before_round(server_round, self.server)
        chosen = strategy.sample_clients(s.num_nodes, s.fed.fraction, self.rng)
        targets = self.nodes if s.fed.fraction == 1.0 else [self.node_of[c] for c in chosen]
        down = self.server.broadcast()                       # the downlink codec's payload of the global model
        self._round = (server_round, chosen, len(down), t0)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: payload_record(down), self.configrecord_key: config})
        return self._construct_messages(record, targets, MessageType.TRAIN)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._round is not None and self._round[0] == server_round
        _, chosen, down_bytes, t0 = self._round
        s, cfg = self.settings, self.settings.fed
        received: dict[int, tuple[bytes, int, float]] = {}
        owner: dict[int, int] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.log(f"round {server_round}: node {node} replied with an error: {reply.error.reason}")
                continue
            m = reply.content["metrics"]
            pid = _check_partition(m["partition-id"], s.num_nodes, owner, node)
            owner[pid] = node
            received[pid] = (record_payload(reply.content["update"]), int(m["num-examples"]), float(m["train-loss"]))
            self.client_seconds.append({"round": server_round, "partition-id": pid,
                                        **{k[len("seconds-"):]: float(v) for k, v in m.items()
                                           if k.startswith("seconds-")}})
        self.node_of.update(owner)
        # The simulator's bookkeeping (helpers.federated.RoundTally), in client-id order.
        tally = RoundTally()
        for cid in chosen:
            if cid not in received:
                self.dropped.append((server_round, cid, "no reply within round-timeout or an error reply"))
                continue
            payload, n, loss = received[cid]
            tally.receive(self.server, payload, server_round, cid, n, loss, cfg)
        record = tally.close(self.server, self.test, server_round, cfg, bytes_down=down_bytes * len(chosen),
                             clients=len(chosen), t0=t0)
        self.history.rows.append(record)
        acc = "  -   " if math.isnan(record.test_acc) else f"{record.test_acc:.4f}"
        self.log(f"round {server_round}/{cfg.rounds}: test acc {acc}, {len(received)}/{len(chosen)} replies, "
                 f"up {record.bytes_up:,} B, {record.seconds:.1f} s")
        metrics = MetricRecord({"train-loss": record.train_loss, "bytes-up": record.bytes_up,
                                "clients": len(received)})
        return ArrayRecord(self.server.state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        s = self.settings
        if s.fraction_evaluate == 0.0 or not (server_round % s.evaluate_every == 0 or server_round == s.fed.rounds):
            return []
        if s.fraction_evaluate == 1.0:
            targets = self.nodes
        else:
            ids = self.server.strategy.sample_clients(s.num_nodes, s.fraction_evaluate, self.eval_rng)
            targets = [self.node_of[c] for c in ids]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: payload_record(self.server.broadcast()),
                             self.configrecord_key: config})
        return self._construct_messages(record, targets, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)   # sample-weighted mean of the nodes' metrics
        if metrics is not None:
            n = [int(r.content["metrics"]["num-examples"]) for r in replies if not r.has_error()]
            self.federated_eval[server_round] = {"eval-acc": float(metrics["eval-acc"]),
                                                 "eval-loss": float(metrics["eval-loss"]),
                                                 "nodes": len(n), "images": sum(n)}
            self.log(f"round {server_round}: federated evaluation on {len(n)} nodes' own test splits "
                     f"({sum(n):,} images): acc {float(metrics['eval-acc']):.4f}")
        return metrics

    def central_evaluation(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` for ``start``: the central test of the round, as ``RoundTally.close`` measured it."""
        if server_round == 0 or not self.history.rows or math.isnan(self.history.rows[-1].test_acc):
            return None
        row = self.history.rows[-1]
        return MetricRecord({"test-acc": row.test_acc, "test-loss": row.test_loss})


def run_rounds(grid: Grid, settings: AppSettings, log: Callable[[str], None] = print) -> EngineRun:
    """``settings.fed.rounds`` rounds of :class:`BookFedAvg` over the grid, run by Flower's ``Strategy.start``."""
    torch.set_num_threads(settings.threads)
    cfg = settings.fed
    server = Server(initial_model(cfg.seed), make_codec(settings.uplink), make_codec(settings.downlink), FedAvg())
    test = test_subset(load_dataset("fashion_mnist", train=False), settings)
    strategy = BookFedAvg(settings, server, test, log)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(server.state), num_rounds=cfg.rounds,
                   timeout=settings.round_timeout, evaluate_fn=strategy.central_evaluation)
    return EngineRun(server.model, strategy.history, server, dict(sorted(strategy.node_of.items())),
                     strategy.dropped, strategy.client_seconds, strategy.federated_eval)


def run_builtin_fedavg(grid: Grid, settings: AppSettings, log: Callable[[str], None] = print) -> EngineRun:
    """Flower's built-in ``FedAvg``, unchanged, on float32 weights: ``w_{t+1} = sum_k n_k / n * w_t^k``.
    Every node trains in every round (the run's ``fraction`` must be 1); the server evaluates centrally. The
    history's byte columns are 0: the built-in strategy exchanges NumPy arrays, no codec payloads to count."""
    if settings.fed.fraction != 1.0:
        raise ValueError("run_builtin_fedavg samples every node: the run config's fraction must be 1.0, "
                         f"got {settings.fed.fraction}")
    torch.set_num_threads(settings.threads)
    model = initial_model(settings.fed.seed)
    test = test_subset(load_dataset("fashion_mnist", train=False), settings)
    wait_for_nodes(grid, settings.num_nodes, settings.node_timeout)
    rows: list[RoundRecord] = []
    t0 = [time.perf_counter()]

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        loss, acc = evaluate(model, test)
        rows.append(RoundRecord(round=server_round, test_acc=acc, test_loss=loss, train_loss=float("nan"),
                                bytes_up=0, bytes_down=0, clients=settings.num_nodes, rejected=0, samples=0,
                                seconds=time.perf_counter() - t0[0]))
        log(f"round {server_round}/{settings.fed.rounds}: test acc {acc:.4f} (Flower's FedAvg, float32)")
        t0[0] = time.perf_counter()
        return MetricRecord({"test-acc": acc, "test-loss": loss})

    strategy = flwr_strategy.FedAvg(fraction_train=1.0, fraction_evaluate=settings.fraction_evaluate,
                                    min_available_nodes=settings.num_nodes, min_train_nodes=settings.num_nodes)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(float_state(model)), num_rounds=settings.fed.rounds,
                            timeout=settings.round_timeout, evaluate_fn=central)
    model.load_state_dict(result.arrays.to_torch_state_dict(), strict=False)
    rows = [dataclasses.replace(r, train_loss=float(result.train_metrics_clientapp[r.round]["train-loss"]))
            if r.round in result.train_metrics_clientapp else r for r in rows]
    fed_eval = {r: {"eval-acc": float(m["eval-acc"]), "eval-loss": float(m["eval-loss"])}
                for r, m in result.evaluate_metrics_clientapp.items()}
    return EngineRun(model, History(rows=rows, label="flower-fedavg"), None, {}, [], [], fed_eval)


def make_app(run_config: Mapping[str, object] | None = None) -> ServerApp:
    """A ServerApp that runs :func:`run_rounds` (or :func:`run_builtin_fedavg` for ``strategy =
    "flower-fedavg"``) and writes its result into ``result-dir``. With ``run_config``, its keys override the
    context's run configuration (Flower's in-process ``run_simulation`` hands the app an empty one)."""
    fixed = None if run_config is None else dict(run_config)
    new = ServerApp()

    @new.main()
    def _main(grid: Grid, context: Context) -> None:
        main(grid, context, fixed)

    return new


def main(grid: Grid, context: Context, run_config: Mapping[str, object] | None = None) -> None:
    """The ServerApp's main: the run, then ``result.json``, ``global.bin`` and ``progress.log`` in ``result-dir``."""
    config = dict(context.run_config) if run_config is None else {**context.run_config, **run_config}
    settings = AppSettings.from_run_config(config)
    out = Path(settings.result_dir) if settings.result_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)                     # into the run's log (`flwr log`)
        if out is not None:
            with open(out / "progress.log", "a") as f:
                f.write(line + "\n")

    run = (run_builtin_fedavg if settings.strategy == "flower-fedavg" else run_rounds)(grid, settings, log)
    if out is None:
        return
    (out / "global.bin").write_bytes(Float32Codec().encode(float_state(run.model)))
    result = {
        "run-id": context.run_id,
        "settings": dict(config),
        "rounds": [dataclasses.asdict(r) for r in run.history.rows],
        "final_accuracy": run.history.final_accuracy,
        "bytes_up_per_client": run.history.bytes_up_per_client,
        "nodes": {str(k): v for k, v in run.nodes.items()},
        "dropped": run.dropped,
        "client_seconds": run.client_seconds,
        "rejected": run.server.rejected if run.server is not None else [],
        "federated_eval": {str(k): v for k, v in run.federated_eval.items()},
        "torch_threads": torch.get_num_threads(),
    }
    tmp = out / "result.json.part"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")                 # the launcher never reads a half-written file


app = make_app()
