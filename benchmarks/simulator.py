"""How fast is the federated simulator, on 1 or 2 threads, and with independent runs in parallel processes?

For each model (MLP with 200 hidden units, SmallCNN) at batch size 32, prints the training throughput
(samples/s) of

* centralized training (``train_centralized``, one epoch) on 2 torch threads and on 1;
* the federated simulator (``run_federated``: 10 IID clients, every client in the round, one local
  epoch, float32 codec both ways, weighted FedAvg) on 2 threads and on 1 -- measured as K independent
  runs (seeds 0..K-1, one round each) in today's sequential loop in this process;
* the same K runs with :func:`helpers.parallel.run_parallel` (one worker process per CPU, one torch
  thread each).

The federated numbers include everything a round does (broadcast encode/decode, local training,
upload encode, server decode and validation, aggregation); evaluation is excluded (a 10-image test
set). It then checks that the parallel runs end in exactly the same global models as the sequential
1-thread runs (``torch.equal`` on every tensor), and reports how far the 2-thread runs are from them
(a different thread count may change the last bits of a sum).

Throughput on a shared machine drifts from minute to minute, so the five measurements alternate
(their order rotates every repeat) and the medians are compared. The last line is
``parallel speedup: mlp X.XX, cnn Y.YY``: K runs with run_parallel over K runs in the sequential
2-thread loop.

    python benchmarks/simulator.py [--repeats 3] [--models mlp cnn] [--runs 4] [--samples 60000] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

from helpers.data import load_dataset, partition_iid
from helpers.federated import FedConfig
from helpers.models import MLP, SmallCNN
from helpers.experiment import fedavg_seed
from helpers.parallel import available_cpus, run_parallel
from helpers.training import train_centralized

MODELS = ("mlp", "cnn")
NUM_CLIENTS = 10


def build(name: str) -> torch.nn.Module:
    return MLP(hidden=(200,)) if name == "mlp" else SmallCNN()


def timed(fn, samples_of) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return samples_of(out) / (time.perf_counter() - t0), out


def max_state_diff(a: list[dict], b: list[dict]) -> float:
    return max(float((ra["state"][k].double() - rb["state"][k].double()).abs().max())
               for ra, rb in zip(a, b) for k in ra["state"])


def states_equal(a: list[dict], b: list[dict]) -> bool:
    return all(ra["state"].keys() == rb["state"].keys()
               and all(torch.equal(ra["state"][k], rb["state"][k]) for k in ra["state"]) for ra, rb in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="alternating measurements per model (default 3; 1 with --quick)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--runs", type=int, default=None, help="independent federated runs K (default 4; 2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="run_parallel workers (default: one per CPU)")
    parser.add_argument("--samples", type=int, default=None,
                        help="training samples per epoch/run (default all 60,000; 12,000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="12,000 samples per run, K=2, 1 repeat: a smoke test")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    runs = args.runs or (2 if args.quick else 4)
    if repeats < 1 or runs < 1:
        parser.error("--repeats and --runs must be >= 1")

    train = load_dataset()  # the full set in every task: it pickles as "load it again"
    tiny_test = load_dataset(train=False).subset(torch.arange(10))
    n = args.samples or (12_000 if args.quick else len(train))
    if not NUM_CLIENTS <= n <= len(train):
        parser.error(f"--samples must be in [{NUM_CLIENTS}, {len(train)}]")
    idx = torch.arange(n)
    partition = partition_iid(train.y[:n], NUM_CLIENTS, 0)
    config = FedConfig(rounds=1, fraction=1.0, local_epochs=1, batch_size=args.batch_size, lr=0.02, momentum=0.9)
    workers = args.workers or min(runs, available_cpus())

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"simulator benchmark, {stamp}: {available_cpus()} CPUs, load average {load:.1f}, torch {torch.__version__}")
    print(f"batch {args.batch_size}, {n:,} samples per epoch/run, K={runs} runs of 1 round over {NUM_CLIENTS} IID "
          f"clients, run_parallel with {workers} workers x 1 thread; medians of {repeats} alternating repeats")

    # Start the pool (spawn, import torch, each worker loads Fashion-MNIST once) and warm this process up:
    # one-off costs a chapter pays once per kernel, kept out of the throughput numbers.
    tiny = dict(train=train, test=tiny_test, partition=[idx[:64]], config=config)
    t0 = time.perf_counter()
    run_parallel(fedavg_seed, [dict(tiny, seed=s) for s in range(workers)], workers=workers, progress=False)
    print(f"worker pool start-up (spawn, import torch, load the data): {time.perf_counter() - t0:.1f} s, "
          f"paid once per process, not in the numbers below")

    header = (f"{'model':5s} {'central 2thr':>13s} {'central 1thr':>13s} {'fed seq 2thr':>13s} "
              f"{'fed seq 1thr':>13s} {'fed parallel':>13s}   samples/s")
    print(header)
    speedups: dict[str, float] = {}
    checks: list[str] = []
    ok = True
    for name in args.models:
        tasks = [dict(seed=s, train=train, test=tiny_test, partition=partition, config=config, model=name)
                 for s in range(runs)]
        fedavg_seed(**dict(tiny, seed=0, model=name))  # warm-up in this process
        init = build(name)
        samples = lambda results: sum(r["samples"] for r in results)  # noqa: E731

        def central(threads: int):
            torch.set_num_threads(threads)
            run = train_centralized(init, train, tiny_test, epochs=1, batch_size=args.batch_size, lr=0.02,
                                    momentum=0.9, indices=idx)
            return run.history.total_samples

        def sequential(threads: int):
            torch.set_num_threads(threads)
            return [fedavg_seed(**t) for t in tasks]

        def parallel():
            return run_parallel(fedavg_seed, tasks, workers=workers, progress=False)

        measures = {
            "central2": lambda: timed(lambda: central(2), int),
            "central1": lambda: timed(lambda: central(1), int),
            "seq2": lambda: timed(lambda: sequential(2), samples),
            "seq1": lambda: timed(lambda: sequential(1), samples),
            "par": lambda: timed(parallel, samples),
        }
        order = list(measures)
        speed: dict[str, list[float]] = {k: [] for k in order}
        outputs: dict[str, list] = {k: [] for k in order}
        for r in range(repeats):
            for key in order[r % len(order):] + order[:r % len(order)]:
                s, out = measures[key]()
                speed[key].append(s)
                outputs[key].append(out)
        torch.set_num_threads(2)
        med = {k: statistics.median(v) for k, v in speed.items()}
        speedups[name] = med["par"] / med["seq2"]
        print(f"{name:5s} {med['central2']:13,.0f} {med['central1']:13,.0f} {med['seq2']:13,.0f} "
              f"{med['seq1']:13,.0f} {med['par']:13,.0f}   (parallel / 1-thread sequential "
              f"{med['par'] / med['seq1']:.2f}, 1 thread / 2 threads sequential {med['seq1'] / med['seq2']:.2f})",
              flush=True)

        same = all(states_equal(p, s) for p in outputs["par"] for s in outputs["seq1"])
        ok &= same
        diff = max(max_state_diff(a, outputs["seq1"][0]) for a in outputs["seq2"])
        checks.append(f"{name}: parallel == sequential 1-thread final states (torch.equal, {runs} runs x {repeats} "
                      f"repeats): {'yes' if same else 'NO'}; sequential 2-thread vs 1-thread: "
                      + ("identical" if diff == 0 else f"max |difference| {diff:.1e} (last bits of float sums)"))
    if hasattr(os, "getloadavg"):
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine slow the "
              f"2-thread runs most: a descheduled thread stalls its partner at every barrier)")
    for line in checks:
        print(line)
    if not ok:
        raise SystemExit("parallel results differ from the sequential 1-thread results: a determinism bug")
    print("parallel speedup: " + ", ".join(f"{name} {s:.2f}" for name, s in speedups.items()))


if __name__ == "__main__":
    main()
