"""Chapter 7: the book's helpers on Flower's deployment engine (a SuperLink and SuperNodes on 127.0.0.1).

The engine test is deliberately small (1 round, 2 nodes, 300 images each) because every Flower message
starts a fresh ClientApp process that imports torch; it still checks the three things that matter:
the run's status, parity with the simulator, and that no process is left behind.
"""

import socket

import psutil
import pytest
import torch

from helpers.codecs import Float32Codec, QuantizedCodec
from helpers.federated import run_federated
from helpers.flower import task
from helpers.flower.launch import APP_DIR, DeploymentError, LoopbackDeployment
from helpers.training import float_state


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


def test_node_partitions_are_disjoint_and_sized(fmnist_train):
    settings = task.AppSettings.from_run_config(task.make_run_config(num_nodes=3, samples_per_node=400))
    parts = task.node_partition(fmnist_train.y, settings)
    assert [len(p) for p in parts] == [400, 400, 400]
    assert torch.cat(parts).unique().numel() == 1200
    again = task.node_partition(fmnist_train.y, settings)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        dep = LoopbackDeployment(1, superlink_port=port, log=None)
        with pytest.raises(DeploymentError, match=f"port {port} .* is taken"):
            dep.__enter__()
        assert dep.roots == [] and not dep.workdir.exists()   # nothing was started, nothing left


def test_engine_status_parity_and_cleanup(fmnist_train, fmnist_test):
    config = task.make_run_config(num_server_rounds=1, num_nodes=2, samples_per_node=300, uplink="q8",
                                  test_samples=500)
    overrides = {k: v for k, v in config.items() if k != "result-dir"}
    dep = LoopbackDeployment(2, log=None)
    with dep:
        # A ServerApp that crashes must be reported as a failure, although `flwr run` itself exits 0.
        with pytest.raises(DeploymentError, match="finished:failed"):
            dep.run(APP_DIR, {**overrides, "uplink": "zip"}, timeout=300)
        outcome = dep.run(APP_DIR, overrides, timeout=600)
        recorded = dict(dep.seen)
    assert outcome.status == "finished:completed"
    # Parity: the simulator with the same settings, one torch thread like the app processes.
    settings = task.AppSettings.from_run_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sim = run_federated(task.initial_model(settings.fed.seed), fmnist_train,
                            task.node_partition(fmnist_train.y, settings), task.test_subset(fmnist_test, settings),
                            settings.fed, uplink=task.make_codec(settings.uplink),
                            downlink=task.make_codec(settings.downlink))
    finally:
        torch.set_num_threads(threads)
    engine = Float32Codec().decode(outcome.files["global.bin"])
    row, sim_row = outcome.result["rounds"][0], sim.history.rows[0]
    assert row["bytes_up"] == sim_row.bytes_up and row["clients"] == sim_row.clients == 2
    assert row["bytes_down"] == sim_row.bytes_down
    assert row["test_acc"] == sim_row.test_acc
    assert outcome.result["dropped"] == [] and outcome.result["rejected"] == []
    sim_state = float_state(sim.model)
    assert max(float((engine[k] - sim_state[k]).abs().max()) for k in sim_state) == 0.0
    # Clean-up: every process of the tree (SuperLink, SuperNodes, SuperExecs, app processes) is gone.
    assert len(recorded) >= 1 + 2 + 2       # at least SuperLink, 2 SuperNodes, their SuperExecs
    for (pid, created), name in recorded.items():
        try:
            p = psutil.Process(pid)
            assert p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE, f"{name} ({pid}) still runs"
        except psutil.NoSuchProcess:
            pass
    assert not dep.workdir.exists()
