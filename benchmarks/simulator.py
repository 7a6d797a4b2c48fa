"""How fast is the federated simulator compared with plain centralized training of the same model?

Prints, for the same model and batch size, the training throughput (samples/s) of
``train_centralized`` and of ``run_federated`` (10 IID clients, every client every round,
float32 codec on both links, weighted FedAvg), and their ratio. The federated number includes
everything a round does: broadcast encode/decode, local training, upload encode, server decode,
validation and aggregation. Evaluation is excluded (a 10-image test set).

Throughput on a shared 2-core machine drifts by ±20% from minute to minute, so the two are measured
alternately (one centralized epoch, then one federated round over the same 60,000 samples), several
times, and the medians are compared.

    python benchmarks/simulator.py [--repeats 3] [--models cnn mlp]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import helpers
from helpers.data import load_dataset, partition_iid
from helpers.federated import FedConfig, run_federated, train_centralized
from helpers.models import MLP, SmallCNN

MODELS = {"cnn": SmallCNN, "mlp": lambda: MLP(hidden=(200,))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per model")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    train = load_dataset()
    tiny_test = load_dataset(train=False).subset(torch.arange(10))
    parts = partition_iid(train.y, 10, rng=0)
    print(f"{'model':6s} {'centralized samples/s':>22s} {'federated samples/s':>20s} {'ratio':>6s}  (medians of {args.repeats})")
    cfg = FedConfig(rounds=1, fraction=1.0, local_epochs=1, batch_size=args.batch_size, lr=0.02, momentum=0.9)
    for name in args.models:
        helpers.seed_everything(0)
        model = MODELS[name]()
        central, federated = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            train_centralized(model, train, tiny_test, epochs=1, batch_size=args.batch_size, lr=0.02, momentum=0.9)
            central.append(len(train) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            run = run_federated(model, train, parts, tiny_test, cfg)
            federated.append(run.history.total_samples / (time.perf_counter() - t0))
        c, f = statistics.median(central), statistics.median(federated)
        print(f"{name:6s} {c:22,.0f} {f:20,.0f} {f / c:6.2f}", flush=True)


if __name__ == "__main__":
    main()
