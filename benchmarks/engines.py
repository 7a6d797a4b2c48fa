"""How much does an engine cost? One FedAvg workload on the book's simulator and on Flower's two engines.

The workload is the Chapter 7 app's: ``--nodes`` clients holding ``--samples`` IID training images each,
``--rounds`` rounds of FedAvg with SmallCNN (one local epoch, batch 32, the 8-bit uplink codec, float32
downlink), every client in every round, the central test on ``--test-samples`` images, no federated
evaluation. The same seed, partition, clients and rounds run on

* the **simulator**: ``helpers.federated.run_federated`` in this process, one torch thread, the clients
  one after another;
* Flower's **Simulation Engine**: ``helpers.flower.simulation.run_on_simulation_engine`` (virtual
  SuperNodes, Ray started in this process with 2 CPUs, one ClientApp per CPU, long-lived workers);
* Flower's **deployment engine**: ``helpers.flower.launch.LoopbackDeployment`` (a SuperLink and one
  SuperNode process per client on 127.0.0.1, each reading its own data file; a fresh ClientApp process
  per message).

For each it prints the seconds per round (the median of the rounds the server timed, so Ray's start-up
and the first round's imports weigh once, not in every round) and end to end (start-up to clean-up
included), then the parity: the largest weight difference between each engine's final global model and
the simulator's (0.0 when they are bit-identical). The last line is

    engines: simulator Xx faster than simulation engine, Yx than deployment

(ratios of the seconds per round). Absolute times depend on the machine and its load; run it on a quiet
machine.

    python benchmarks/engines.py [--nodes 4] [--samples 1000] [--rounds 3] [--test-samples 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from helpers.codecs import Float32Codec
from helpers.data import load_dataset
from helpers.federated import run_federated
from helpers.flower import task
from helpers.flower.launch import APP_DIR, LoopbackDeployment, node_data_for
from helpers.flower.simulation import ray_available, run_on_simulation_engine
from helpers.training import float_state


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4, help="clients = SuperNodes (default 4)")
    parser.add_argument("--samples", type=int, default=1000, help="training images per client (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="FedAvg rounds (default 3)")
    parser.add_argument("--test-samples", type=int, default=2000, help="central test images (default 2000)")
    args = parser.parse_args()
    if not ray_available():
        raise SystemExit('benchmarks/engines.py needs Ray for the Simulation Engine: pip install "flwr[simulation]"')
    overrides = {"num-server-rounds": args.rounds, "num-nodes": args.nodes, "samples-per-node": args.samples,
                 "uplink": "q8", "downlink": "float32", "fraction": 1.0, "fraction-evaluate": 0.0,
                 "test-samples": args.test_samples}
    settings = task.AppSettings.from_run_config(task.make_run_config(**{k.replace("-", "_"): v
                                                                        for k, v in overrides.items()}))
    print(f"workload: {args.nodes} clients x {args.samples} images, {args.rounds} rounds, SmallCNN, q8 uplink, "
          f"seed {settings.fed.seed}")
    results: dict[str, tuple[float, float, dict[str, torch.Tensor], float]] = {}

    # 1. the simulator, in this process on one thread (as every app process runs)
    torch.set_num_threads(1)
    train, test = load_dataset("fashion_mnist", train=True), load_dataset("fashion_mnist", train=False)
    t0 = time.perf_counter()
    sim = run_federated(task.initial_model(settings.fed.seed), train, task.node_partition(train.y, settings),
                        task.test_subset(test, settings), settings.fed, uplink=task.make_codec(settings.uplink),
                        downlink=task.make_codec(settings.downlink), label="simulator")
    results["simulator"] = (statistics.median(sim.history.column("seconds")), time.perf_counter() - t0,
                            float_state(sim.model), sim.history.final_accuracy)

    # 2. Flower's Simulation Engine: virtual SuperNodes, Ray workers in this machine's 2 CPUs
    outcome = run_on_simulation_engine(overrides, args.nodes, num_cpus=2, client_cpus=1)
    results["simulation engine"] = (statistics.median(r["seconds"] for r in outcome.result["rounds"]),
                                    outcome.seconds, Float32Codec().decode(outcome.files["global.bin"]),
                                    outcome.result["final_accuracy"])

    # 3. Flower's deployment engine: a SuperLink and one SuperNode process per client on 127.0.0.1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flbook-node-data-") as data_dir:
        files = node_data_for(overrides, data_dir)
        with LoopbackDeployment(args.nodes, node_data=files, log=None) as dep:
            run = dep.run(APP_DIR, overrides, timeout=1800)
        left = dep.alive()
    if left:
        raise SystemExit(f"the deployment left {len(left)} process(es) running")
    results["deployment engine"] = (statistics.median(r["seconds"] for r in run.result["rounds"]),
                                    time.perf_counter() - t0, Float32Codec().decode(run.files["global.bin"]),
                                    run.result["final_accuracy"])

    reference = results["simulator"][2]
    print(f"{'':18s} {'s / round':>10s} {'end to end':>11s} {'final acc':>10s} {'max |w - w_sim|':>16s}")
    for name, (per_round, total, state, acc) in results.items():
        print(f"{name:18s} {per_round:10.2f} {total:10.1f}s {acc:10.4f} {max_diff(state, reference):16.1e}")
    parity = all(max_diff(state, reference) == 0.0 for _, _, state, _ in results.values())
    print(f"parity: {'bit-identical global models on all three' if parity else 'the global models differ'}")
    s, e, d = (results[k][0] for k in ("simulator", "simulation engine", "deployment engine"))
    print(f"engines: simulator {e / s:.1f}x faster than simulation engine, {d / s:.1f}x than deployment")


if __name__ == "__main__":
    main()
