r"""The book's FedAvg under Flower's **SecAgg+** secure aggregation (Chapter 8's section on it).

Each client trains as in Chapter 7, encodes its update with the book's uplink codec and decodes it again, so
the server aggregates the *book's quantized update* :math:`\hat\Delta_k`. Flower's ``secaggplus_mod`` on the
ClientApp then runs the SecAgg+ protocol of Bell et al. (2020) in four stages (set-up, key sharing, masked
vectors, unmasking). In the third, client :math:`k` sends

.. math::  y_k = \Big(Q\big(r_k \hat\Delta_k\big) + p_k + \sum_{j \in N(k),\, j < k} s_{kj}
           - \sum_{j \in N(k),\, j > k} s_{jk}\Big) \bmod 2^{32},

where :math:`Q` maps :math:`[-C, C]` onto the integers :math:`0..q` by stochastic rounding,
:math:`r_k \approx n_k / W` is the client's weight, :math:`p_k` a private mask and :math:`s_{kj}` masks it
shares with its neighbours: each :math:`y_k` alone is uniformly random. The pairwise masks cancel in the sum,
the private masks are removed with secret shares the clients reveal in the last stage, and the server (the
``SecAggPlusWorkflow`` inside a legacy ``DefaultWorkflow``) learns only
:math:`\sum_k r_k \hat\Delta_k / \sum_k r_k`, the weighted mean of the quantized updates, to within
:math:`N \cdot 2C/q` divided by :math:`\sum_k r_k`. :class:`SecAggFedAvg` adds it to the global model.

:class:`RecordingGrid` wraps the ServerApp's ``Grid``: it times each stage and counts the payload bytes of
every message, and keeps the masked vectors the server received, which is all the server ever sees of
an update. The ServerApp writes them to ``masked.npz`` in ``result-dir`` so a reader (and a test) can try
to recover an update from them.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from ..codecs import Float32Codec
from ..data import TensorDataset, load_dataset
from ..federated import Client
from ..training import evaluate, float_state
from .client_app import node_data, node_identity
from .task import AppSettings, initial_model, make_codec, test_subset

__all__ = ["SECAGG_APP_DIR", "default_run_config", "SECAGG_KEYS", "SecAggParams", "quantized_update", "BookNumPyClient", "SecAggFedAvg", "RecordingGrid",
           "payload_bytes", "aggregation_bound", "app_server", "app_client"]

#: The SecAgg+ app's folder (``flwr run`` takes it): its ``pyproject.toml`` names the ServerApp and ClientApp below.
SECAGG_APP_DIR = Path(__file__).resolve().parent / "secagg_app"


def default_run_config() -> dict[str, object]:
    """The SecAgg+ app's run configuration as declared in ``secagg_app/pyproject.toml``: Chapter 7's keys plus
    :data:`SECAGG_KEYS`."""
    with open(SECAGG_APP_DIR / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


#: The run-config keys the SecAgg+ app adds to the book app's (``secagg_app/pyproject.toml``).
SECAGG_KEYS = ("secagg-num-shares", "secagg-threshold", "secagg-clipping-range", "secagg-quantization-range",
               "secagg-max-weight")


class SecAggParams:
    """The protocol's parameters from the run config, checked: ``num_shares`` neighbours per client (including
    itself), ``threshold`` shares to reconstruct a secret, clipping range :math:`C`, quantization range
    :math:`q` and the weight :math:`W` that ``num_examples`` is divided by (:math:`r_k = n_k / W \\le 1`)."""

    def __init__(self, config: Mapping[str, object]) -> None:
        missing = [k for k in SECAGG_KEYS if k not in config]
        if missing:
            raise ValueError(f"run config lacks {missing}")
        self.num_shares = int(config["secagg-num-shares"])
        self.threshold = int(config["secagg-threshold"])
        self.clipping_range = float(config["secagg-clipping-range"])
        self.quantization_range = int(config["secagg-quantization-range"])
        self.max_weight = float(config["secagg-max-weight"])
        if not 2 <= self.threshold <= self.num_shares:
            raise ValueError(f"need 2 <= secagg-threshold <= secagg-num-shares, got {self.threshold}, {self.num_shares}")
        if not (self.clipping_range > 0 and self.quantization_range > 0 and self.max_weight > 0):
            raise ValueError("secagg-clipping-range, secagg-quantization-range and secagg-max-weight must be positive")

    @property
    def step(self) -> float:
        """One integer step of SecAgg+'s quantizer, :math:`2C/q`, in the units of the update."""
        return 2 * self.clipping_range / self.quantization_range


def aggregation_bound(params: SecAggParams, num_samples: Iterable[int]) -> float:
    r"""How far SecAgg+'s weighted mean may be from the exact one, per coordinate: each client's stochastic
    rounding is off by less than one step :math:`2C/q`, and the unmasked sum is divided by
    :math:`\sum_k r_k`, so :math:`|\text{secure} - \text{exact}| < N \cdot (2C/q) / \sum_k r_k`."""
    ratios = [round(n / params.max_weight * params.quantization_range) / params.quantization_range for n in num_samples]
    return len(ratios) * params.step / sum(ratios)


def quantized_update(settings: AppSettings, pid: int, global_arrays: list[np.ndarray], round_idx: int,
                     data_path: str | None = None) -> tuple[dict[str, torch.Tensor], int, float, int]:
    """Client ``pid``'s round from the global weights ``global_arrays`` (in ``float_state`` order): the
    simulator's local SGD, then the update through the uplink codec and back. Returns (decoded update
    :math:`\\hat\\Delta_k`, sample count, mean loss, bytes of the codec payload)."""
    torch.set_num_threads(settings.threads)
    data, rows = node_data(settings, pid, data_path)
    client = Client(pid, rows)
    model = initial_model(settings.fed.seed)
    keys = list(float_state(model))
    if len(global_arrays) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays of the global model, got {len(global_arrays)}")
    start = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, global_arrays)}
    update, loss = client.local_update(model, start, data, settings.fed, round_idx)
    codec = make_codec(settings.uplink)
    payload = codec.encode(update)
    return codec.decode(payload, reference=update), client.num_samples, loss, len(payload)


class BookNumPyClient(NumPyClient):
    """The client as Flower's (legacy) ``NumPyClient``, which ``secaggplus_mod`` wraps: ``fit`` returns the
    decoded quantized update (not the new weights) and the sample count; the mod masks it."""

    def __init__(self, settings: AppSettings, pid: int, data_path: str | None) -> None:
        self.settings, self.pid, self.data_path = settings, pid, data_path

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, object]):
        update, n, loss, nbytes = quantized_update(self.settings, self.pid, parameters, int(config["server-round"]),
                                                   self.data_path)
        return ([v.numpy() for v in update.values()], n,
                {"partition-id": self.pid, "train-loss": float(loss), "codec-bytes": nbytes})


def _client_fn(context: Context):
    settings = AppSettings.from_run_config(dict(context.run_config))
    SecAggParams(context.run_config)
    data_path = context.node_config.get("data-path")
    if data_path is not None and not isinstance(data_path, str):
        raise ValueError(f"node config data-path must be a string, got {data_path!r}")
    return BookNumPyClient(settings, node_identity(context, settings), data_path).to_client()


class SecAggFedAvg(LegacyFedAvg):
    """Flower's (legacy) ``FedAvg`` for the SecAgg+ workflow: every result it is handed carries the same
    unmasked weighted mean of the updates, which it adds to the global model; central test after each round."""

    def __init__(self, settings: AppSettings, test: TensorDataset, log=print) -> None:
        model = initial_model(settings.fed.seed)
        self.keys = list(float_state(model))
        self.weights = [v.numpy().copy() for v in float_state(model).values()]
        self.settings, self.test, self.log = settings, test, log
        self.rounds: list[dict] = []
        n = settings.num_nodes
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
                         min_available_clients=n, initial_parameters=ndarrays_to_parameters(self.weights),
                         on_fit_config_fn=lambda r: {"server-round": r}, evaluate_fn=self._central)

    def aggregate_fit(self, server_round, results, failures):
        if failures or not results:
            raise RuntimeError(f"round {server_round}: {len(results)} results, {len(failures)} failures")
        mean_update = parameters_to_ndarrays(results[0][1].parameters)
        self.weights = [(w + u).astype(np.float32) for w, u in zip(self.weights, mean_update)]
        self.rounds.append({"round": server_round, "clients": len(results),
                            "num-examples": sorted(int(r.num_examples) for _, r in results)})
        return ndarrays_to_parameters(self.weights), {}

    def _central(self, server_round, parameters, config):
        model = initial_model(self.settings.fed.seed)
        model.load_state_dict({k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(self.keys, parameters)},
                              strict=False)
        loss, acc = evaluate(model, self.test)
        if server_round > 0:
            self.rounds[-1]["test_acc"] = acc
            self.log(f"round {server_round}: test acc {acc:.4f} after secure aggregation")
        return loss, {"acc": acc}

    def state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(w) for k, w in zip(self.keys, self.weights)}


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's payload: array data, ``bytes`` config values (keys, shares, masked vectors) and 8
    bytes per number; Flower's protobuf framing is not counted."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in list(content.config_records.values()) + list(content.metric_records.values()):
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            for v in items:
                total += len(v) if isinstance(v, bytes) else len(v.encode()) if isinstance(v, str) else 8
    return total


class RecordingGrid:
    """The ServerApp's ``Grid`` with a log: each ``send_and_receive`` (one protocol stage) is timed, every
    message's :func:`payload_bytes` is counted per node, and the masked vectors of the collect stage are kept."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.stages: list[dict] = []
        self.masked: dict[int, list[np.ndarray]] = {}        # partition id -> masked vector (last round)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        seconds = time.perf_counter() - t0
        first = messages[0].content.config_records.get(RECORD_KEY_CONFIGS) if messages else None
        stage = str(first[Key.STAGE]) if first is not None and Key.STAGE in first else "other"
        row = {"stage": stage, "seconds": seconds, "down": {}, "up": {}}
        for m in messages:
            row["down"][str(m.metadata.dst_node_id)] = payload_bytes(m.content)
        for r in replies:
            if r.has_error():
                continue
            node = r.metadata.src_node_id
            row["up"][str(node)] = payload_bytes(r.content)
            if stage == Stage.COLLECT_MASKED_VECTORS:             # the reply also carries the FitRes metrics
                pid = int(compat.recorddict_to_fitres(r.content, keep_input=True).metrics["partition-id"])
                row.setdefault("partition", {})[str(node)] = pid
                cfg = r.content.config_records[RECORD_KEY_CONFIGS]
                self.masked[pid] = [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]
        self.stages.append(row)
        return replies


def server_main(grid: Grid, context: Context) -> None:
    """The SecAgg+ ServerApp: the legacy ``DefaultWorkflow`` with ``SecAggPlusWorkflow`` as its fit workflow and
    :class:`SecAggFedAvg` as its strategy, on a :class:`RecordingGrid`; writes ``result.json``, ``global.bin``
    and ``masked.npz`` (the last round's masked vectors, by partition id) into ``result-dir``."""
    config = dict(context.run_config)
    settings, params = AppSettings.from_run_config(config), SecAggParams(config)
    out = Path(settings.result_dir) if settings.result_dir else None

    def log(line: str) -> None:
        print(line, flush=True)
        if out is not None:
            with open(out / "progress.log", "a") as f:
                f.write(line + "\n")

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    test = test_subset(load_dataset("fashion_mnist", train=False), settings)
    strategy = SecAggFedAvg(settings, test, log)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.fed.rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=params.num_shares, reconstruction_threshold=params.threshold, max_weight=params.max_weight,
        clipping_range=params.clipping_range, quantization_range=params.quantization_range,
        timeout=settings.round_timeout))
    recording = RecordingGrid(grid)
    log(f"SecAgg+ on {settings.num_nodes} SuperNodes: {params.num_shares} shares, threshold {params.threshold}, "
        f"C = {params.clipping_range}, q = {params.quantization_range}")
    t0 = time.perf_counter()
    workflow(recording, legacy)
    seconds = time.perf_counter() - t0
    if out is None:
        return
    (out / "global.bin").write_bytes(Float32Codec().encode(strategy.state()))
    np.savez(out / "masked.npz", **{f"partition-{pid}-{i}": a for pid, arrays in recording.masked.items()
                                    for i, a in enumerate(arrays)})
    result = {"run-id": context.run_id, "settings": config, "rounds": strategy.rounds, "stages": recording.stages,
              "seconds": seconds, "step": params.step, "torch_threads": torch.get_num_threads()}
    tmp = out / "result.json.part"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")


app_server = ServerApp()
app_server.main()(server_main)
app_client = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
