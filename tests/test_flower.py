"""Chapter 7: the book's helpers on Flower's deployment engine (a SuperLink and SuperNodes on 127.0.0.1).

The engine test is deliberately small (1 round, 2 nodes, 300 images each) because every Flower message
starts a fresh ClientApp process that imports torch; it still checks the three things that matter:
the run's status, parity with the simulator, and that no process is left behind.
"""

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from helpers.codecs import Float32Codec, QuantizedCodec
from helpers.federated import run_federated
from helpers.flower import client_app, task
from helpers.flower.launch import APP_DIR, DeploymentError, LoopbackDeployment, node_data_for
from helpers.flower import simulation
from helpers.training import float_state


needs_ray = pytest.mark.skipif(not simulation.ray_available(), reason='needs Ray: pip install "flwr[simulation]"')


def simulate(settings, train, test, nodes=None, uplink=None, downlink=None):
    """The simulator on the app's settings (only the partitions of ``nodes``, default all), one torch thread
    like every app process."""
    parts = task.node_partition(train.y, settings)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_federated(task.initial_model(settings.fed.seed), train,
                             parts if nodes is None else [parts[i] for i in nodes], task.test_subset(test, settings),
                             settings.fed, uplink=task.make_codec(uplink or settings.uplink),
                             downlink=task.make_codec(downlink or settings.downlink))
    finally:
        torch.set_num_threads(threads)


def assert_nothing_left(recorded, dep):
    """Every process of the deployment's tree (SuperLink, SuperNodes, SuperExecs, app processes) is gone."""
    for (pid, created), name in recorded.items():
        try:
            p = psutil.Process(pid)
            assert p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE, f"{name} ({pid}) still runs"
        except psutil.NoSuchProcess:
            pass
    assert not dep.workdir.exists()


def test_payload_crosses_flower_records_unchanged():
    payload = QuantizedCodec(8).encode(float_state(task.initial_model(0)))
    record = task.payload_record(payload)
    assert task.record_payload(record) == payload
    assert record.count_bytes() >= len(payload)
    with pytest.raises(TypeError):
        task.payload_record(bytearray(payload))


def test_run_config_is_checked():
    settings = task.AppSettings.from_run_config(task.make_run_config(num_server_rounds=2, uplink="q4"))
    assert settings.fed.rounds == 2 and settings.fed.lr == 0.04 and settings.fed.seed == 0
    assert isinstance(task.make_codec(settings.uplink), QuantizedCodec)
    with pytest.raises(ValueError, match="unknown run-config key"):
        task.make_run_config(rounds=3)
    with pytest.raises(ValueError, match="unknown codec"):
        task.AppSettings.from_run_config(task.make_run_config(uplink="zip"))
    with pytest.raises(ValueError, match="samples-per-node"):
        task.AppSettings.from_run_config(task.make_run_config(samples_per_node=-1))
    with pytest.raises(ValueError, match="strategy"):
        task.AppSettings.from_run_config(task.make_run_config(strategy="fedprox"))
    with pytest.raises(ValueError, match="fraction-evaluate"):
        task.AppSettings.from_run_config(task.make_run_config(fraction_evaluate=1.5))


def test_node_partitions_are_disjoint_and_sized(fmnist_train):
    settings = task.AppSettings.from_run_config(task.make_run_config(num_nodes=3, samples_per_node=400))
    parts = task.node_partition(fmnist_train.y, settings)
    assert [len(p) for p in parts] == [400, 400, 400]
    assert torch.cat(parts).unique().numel() == 1200
    again = task.node_partition(fmnist_train.y, settings)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_each_node_file_holds_its_own_rows_and_nothing_else(fmnist_train, tmp_path):
    settings = task.AppSettings.from_run_config(task.make_run_config(num_nodes=3, samples_per_node=400,
                                                                     partition="dirichlet"))
    parts = task.node_partition(fmnist_train.y, settings)
    paths = task.write_node_data(tmp_path, settings, fmnist_train)
    assert [p.name for p in paths] == ["node-0.npz", "node-1.npz", "node-2.npz"]
    for pid, (path, idx) in enumerate(zip(paths, parts)):
        own = task.read_node_data(path, pid, settings)
        assert torch.equal(own.x, fmnist_train.x[idx]) and torch.equal(own.y, fmnist_train.y[idx])
        assert own.classes == fmnist_train.classes
        # the file holds exactly this node's rows: no row of any other node, and none of the validation images
        others = torch.cat([p for j, p in enumerate(parts) if j != pid])
        assert len(own) == len(idx) and not set(idx.tolist()) & set(others.tolist())
    # each node also holds its own test split; the splits are disjoint and cover the test set
    tests = [task.read_node_test(path, pid, settings) for pid, path in enumerate(paths)]
    full = client_app.load_dataset("fashion_mnist", train=False)
    assert sum(len(t) for t in tests) == len(full)
    assert all(torch.equal(t.y, full.y[task.node_test_rows(len(full), settings, pid)]) for pid, t in enumerate(tests))
    # a file is checked against the node and the run it is read for
    with pytest.raises(ValueError, match="written for"):
        task.read_node_data(paths[0], 1, settings)
    other_run = task.AppSettings.from_run_config(task.make_run_config(num_nodes=3, samples_per_node=400,
                                                                      partition="dirichlet", seed=1))
    with pytest.raises(ValueError, match="written for"):
        task.read_node_data(paths[0], 0, other_run)
    # no code in a data file: an object array (which would need pickle) is refused
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.array([object()], dtype=object), y=np.zeros(1, dtype=np.int64),
             meta=np.zeros(6, dtype=np.int64), classes=np.array(["a"]))
    with pytest.raises(ValueError, match="allow_pickle"):
        task.read_node_data(bad, 0, settings)


def test_a_node_with_a_data_file_never_loads_the_shared_set(fmnist_train, tmp_path, monkeypatch):
    settings = task.AppSettings.from_run_config(task.make_run_config(num_nodes=2, samples_per_node=200))
    down = Float32Codec().encode(float_state(task.initial_model(settings.fed.seed)))
    shared = client_app.local_round(settings, 1, 1, down)                 # the simulation engine's way
    path = task.write_node_data(tmp_path, settings, fmnist_train)[1]

    def refuse(*args, **kwargs):
        raise AssertionError("the node tried to load the full training set")

    monkeypatch.setattr(client_app, "load_dataset", refuse)
    own = client_app.local_round(settings, 1, 1, down, data_path=str(path))
    # the same bytes: same rows, same minibatches, same update
    assert own.payload == shared.payload and own.num_samples == shared.num_samples == 200
    assert own.seconds["data"] >= 0 and own.seconds["train"] > 0


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        dep = LoopbackDeployment(1, superlink_port=port, log=None)
        with pytest.raises(DeploymentError, match=f"port {port} .* is taken"):
            dep.__enter__()
        assert dep.roots == [] and not dep.workdir.exists()   # nothing was started, nothing left


def test_engine_status_parity_and_cleanup(fmnist_train, fmnist_test, tmp_path):
    config = task.make_run_config(num_server_rounds=1, num_nodes=2, samples_per_node=300, uplink="q8",
                                  test_samples=500)
    overrides = {k: v for k, v in config.items() if k != "result-dir"}
    # each SuperNode reads only its own data file
    dep = LoopbackDeployment(2, log=None, node_data=node_data_for(overrides, tmp_path))
    with dep:
        # A ServerApp that crashes must be reported as a failure, although `flwr run` itself exits 0.
        with pytest.raises(DeploymentError, match="finished:failed"):
            dep.run(APP_DIR, {**overrides, "uplink": "zip"}, timeout=300)
        outcome = dep.run(APP_DIR, overrides, timeout=600)
        recorded = dict(dep.seen)
    assert outcome.status == "finished:completed"
    # Parity: the simulator with the same settings, one torch thread like the app processes.
    settings = task.AppSettings.from_run_config(config)
    sim = simulate(settings, fmnist_train, fmnist_test)
    engine = Float32Codec().decode(outcome.files["global.bin"])
    row, sim_row = outcome.result["rounds"][0], sim.history.rows[0]
    assert row["bytes_up"] == sim_row.bytes_up and row["clients"] == sim_row.clients == 2
    assert row["bytes_down"] == sim_row.bytes_down
    assert row["test_acc"] == sim_row.test_acc
    assert outcome.result["dropped"] == [] and outcome.result["rejected"] == []
    sim_state = float_state(sim.model)
    assert max(float((engine[k] - sim_state[k]).abs().max()) for k in sim_state) == 0.0
    # Federated evaluation: both nodes evaluated the global model on their own test splits (all 10,000 images)
    fed = outcome.result["federated_eval"]["1"]
    assert fed["nodes"] == 2 and fed["images"] == len(fmnist_test) and 0.0 < fed["eval-acc"] < 1.0
    # Clean-up: every process of the tree (SuperLink, SuperNodes, SuperExecs, app processes) is gone.
    assert len(recorded) >= 1 + 2 + 2       # at least SuperLink, 2 SuperNodes, their SuperExecs
    assert_nothing_left(recorded, dep)


def test_a_supernode_killed_mid_round(fmnist_train, fmnist_test, tmp_path):
    """A SuperNode SIGKILLed while it trains: each round ends at its timeout with the other nodes, the run
    finishes, the global model is the simulator's FedAvg of the surviving clients (bit for bit), and no
    process is left behind."""
    config = task.make_run_config(num_server_rounds=2, num_nodes=3, samples_per_node=300, uplink="q8",
                                  test_samples=500, round_timeout=20.0, fraction_evaluate=0.0)
    overrides = {k: v for k, v in config.items() if k != "result-dir"}
    dep = LoopbackDeployment(3, log=None, node_data=node_data_for(overrides, tmp_path))
    killer_error = []

    def kill_node_2():
        try:
            dep.kill_node(2, mid_round=True)
        except Exception as exc:      # reported by the assertion below, not lost in the thread
            killer_error.append(exc)

    with dep:
        killer = threading.Thread(target=kill_node_2, daemon=True)
        killer.start()
        outcome = dep.run(APP_DIR, overrides, timeout=600)
        killer.join(timeout=30)
        recorded = dict(dep.seen)
    assert not killer_error, killer_error
    assert outcome.status == "finished:completed"
    assert [(r, cid) for r, cid, _ in outcome.result["dropped"]] == [(1, 2), (2, 2)]
    assert [r["clients"] for r in outcome.result["rounds"]] == [3, 3]
    # Not corrupted: the simulator with only the two surviving clients ends in the same global model.
    settings = task.AppSettings.from_run_config(config)
    sim = simulate(settings, fmnist_train, fmnist_test, nodes=[0, 1])
    engine = Float32Codec().decode(outcome.files["global.bin"])
    sim_state = float_state(sim.model)
    assert max(float((engine[k] - sim_state[k]).abs().max()) for k in sim_state) == 0.0
    assert [r["test_acc"] for r in outcome.result["rounds"]] == sim.history.column("test_acc")
    assert_nothing_left(recorded, dep)


def test_the_chapter_real_machine_commands_use_existing_flags():
    """Chapter 7 prints, without running them, the commands for real machines (TLS, node authentication):
    every flag they use must be one the installed Flower's command-line help lists."""
    nb = Path(__file__).resolve().parents[1] / "book" / "07_flower.ipynb"
    text = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "markdown")
    block = re.search(r"```bash\n# on the server machine.*?```", text, flags=re.S).group(0).replace("\\\n", " ")
    checked = 0
    for line in block.splitlines():
        words = line.split()
        if not words or words[0] not in ("flower-superlink", "flower-supernode", "flwr"):
            continue
        exe = Path(sys.executable).with_name(words[0])          # the venv's Flower commands
        cmd = [str(exe) if exe.exists() else shutil.which(words[0]) or words[0]]
        if words[0] == "flwr":                                  # its sub-commands: `flwr run`, `flwr supernode register`
            cmd += [w for w in words[1:3] if re.fullmatch(r"[a-z]+", w)][: 2 if words[1] == "supernode" else 1]
        helptext = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60).stdout
        for flag in re.findall(r"(?<!\S)--[a-z-]+", line):
            assert flag in helptext, f"{' '.join(words[:3])}: {flag} is not in its --help"
            checked += 1
    assert checked >= 10, checked


def test_the_simulation_engine_needs_ray_and_says_so(monkeypatch):
    monkeypatch.setattr(simulation, "ray_available", lambda: False)
    with pytest.raises(ImportError, match="flwr\\[simulation\\]"):
        simulation.run_on_simulation_engine({}, 4)
    with pytest.raises(ValueError, match="num_supernodes"):
        simulation.run_on_simulation_engine({}, 0)


def ray_left():
    """Ray processes (raylet, GCS, workers) still running as children of this process."""
    return [p for p in psutil.Process().children(recursive=True)
            if any(n in p.name() for n in ("raylet", "gcs_server", "ray::", "default_worker"))]


@needs_ray
def test_simulation_engine_parity_federated_evaluation_and_ray_cleanup(fmnist_train, fmnist_test):
    """The same app on 10 virtual SuperNodes, 3 sampled per round (BookFedAvg samples client ids as the
    simulator does): bit-identical to the simulator; the nodes' own test splits cover the test set, so
    Flower's weighted mean of their accuracies is the central accuracy; Ray is shut down, nothing is left."""
    import ray

    overrides = dict(num_server_rounds=2, samples_per_node=300, fraction=0.3, test_samples=0)
    outcome = simulation.run_on_simulation_engine({k.replace("_", "-"): v for k, v in overrides.items()}, 10)
    assert not ray.is_initialized() and ray_left() == []
    settings = task.AppSettings.from_run_config(task.make_run_config(num_nodes=10, **overrides))
    sim = simulate(settings, fmnist_train, fmnist_test)
    engine = Float32Codec().decode(outcome.files["global.bin"])
    sim_state = float_state(sim.model)
    assert max(float((engine[k] - sim_state[k]).abs().max()) for k in sim_state) == 0.0
    rows = outcome.result["rounds"]
    assert [r["clients"] for r in rows] == [3, 3] and [r["test_acc"] for r in rows] == sim.history.column("test_acc")
    assert [r["bytes_up"] for r in rows] == sim.history.column("bytes_up")
    fed = outcome.result["federated_eval"]
    assert sorted(fed) == ["1", "2"] and all(f["nodes"] == 10 and f["images"] == 10_000 for f in fed.values())
    assert all(abs(fed[str(r["round"])]["eval-acc"] - r["test_acc"]) < 1e-9 for r in rows)


@needs_ray
def test_flower_builtin_fedavg_matches_the_book_on_float32(fmnist_train, fmnist_test):
    """Flower's own FedAvg (weights averaged, float32 arrays both ways) against the book's FedAvg (updates
    averaged, the float32 codec) on the same clients: the same global model up to float32 rounding."""
    overrides = {"num-server-rounds": 2, "samples-per-node": 300, "test-samples": 1000,
                 "strategy": "flower-fedavg", "fraction-evaluate": 0.0}
    outcome = simulation.run_on_simulation_engine(overrides, 3)
    assert ray_left() == []
    settings = task.AppSettings.from_run_config(task.make_run_config(
        num_nodes=3, **{k.replace("-", "_"): v for k, v in overrides.items()}))
    book = simulate(settings, fmnist_train, fmnist_test, uplink="float32", downlink="float32")
    flower = Float32Codec().decode(outcome.files["global.bin"])
    diff = max(float((flower[k] - v).abs().max()) for k, v in float_state(book.model).items())
    assert 0.0 <= diff < 1e-4, diff
    accs = [r["test_acc"] for r in outcome.result["rounds"]]
    assert len(accs) == 2 and abs(accs[-1] - book.history.final_accuracy) <= 0.005


# ---- SecAgg+ (Chapter 8's section 08_privacy_secagg) -------------------------------------------------------
from helpers.flower import secagg  # noqa: E402


def test_the_secagg_app_declares_every_key_of_the_book_app_and_checks_its_own():
    config = secagg.default_run_config()
    assert set(task.default_run_config()) <= set(config) and set(secagg.SECAGG_KEYS) <= set(config)
    task.AppSettings.from_run_config(config)
    params = secagg.SecAggParams(config)
    assert params.step == 2 * params.clipping_range / params.quantization_range
    with pytest.raises(ValueError, match="secagg-threshold"):
        secagg.SecAggParams({**config, "secagg-threshold": 4})
    with pytest.raises(ValueError, match="lacks"):
        secagg.SecAggParams({k: v for k, v in config.items() if k != "secagg-max-weight"})
    # three clients of weight 1: the mean may be off by at most 3 steps / 3
    assert secagg.aggregation_bound(params, [2000] * 3) == pytest.approx(params.step)


def test_secagg_server_learns_only_the_sum_and_the_sum_is_fedavg(fmnist_train, fmnist_test, tmp_path):
    """SecAgg+ on three loopback SuperNodes with 8-bit updates: the secure global model is plain FedAvg of the
    same quantized updates within the protocol's bound, no masked vector the server received correlates with its
    client's update (each is spread evenly over [0, 2^32)), and no process is left behind."""
    config = {"num-server-rounds": 1, "num-nodes": 3, "samples-per-node": 300, "uplink": "q8",
              "fraction-evaluate": 0.0, "test-samples": 500, "round-timeout": 300.0, "secagg-max-weight": 300.0}
    full = {**secagg.default_run_config(), **config}
    settings, params = task.AppSettings.from_run_config(full), secagg.SecAggParams(full)
    dep = LoopbackDeployment(3, log=None, node_data=node_data_for(config, tmp_path))
    with dep:
        outcome = dep.run(secagg.SECAGG_APP_DIR, config, timeout=600)
        recorded = dict(dep.seen)
    assert outcome.status == "finished:completed"
    assert [s["stage"] for s in outcome.result["stages"]] == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    # the plain FedAvg of the same decoded 8-bit updates, computed here
    w0 = float_state(task.initial_model(settings.fed.seed))
    updates = [secagg.quantized_update(settings, pid, [v.numpy() for v in w0.values()], 1) for pid in range(3)]
    total = sum(n for _, n, _, _ in updates)
    plain = {k: w0[k] + sum(n * u[k] for u, n, _, _ in updates) / total for k in w0}
    secure = Float32Codec().decode(outcome.files["global.bin"])
    bound = secagg.aggregation_bound(params, [n for _, n, _, _ in updates])
    assert max(float((secure[k] - plain[k]).abs().max()) for k in plain) <= bound + 1e-6
    # what the server received: one masked vector per client, none of which is its update
    import io
    with np.load(io.BytesIO(outcome.files["masked.npz"]), allow_pickle=False) as f:
        for pid, (update, n, _, _) in enumerate(updates):
            y = np.concatenate([f[f"partition-{pid}-{i}"].ravel() for i in range(1, 1 + len(w0))]).astype(np.float64)
            truth = torch.cat([v.ravel() for v in update.values()]).double().numpy()
            read = y * params.step - params.clipping_range
            assert abs(np.corrcoef(read, truth)[0, 1]) < 0.05
            assert np.all(np.abs(np.histogram(y / 2**32, bins=4, range=(0, 1))[0] / len(y) - 0.25) < 0.01)
            # and the weighted update fits SecAgg+'s clipping range: nothing was clipped
            assert np.abs(n / params.max_weight * truth).max() < params.clipping_range
    assert_nothing_left(recorded, dep)
