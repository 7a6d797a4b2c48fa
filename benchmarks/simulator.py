"""How fast is the federated simulator compared with plain centralized training of the same model?

Prints, for the same model and batch size, the training throughput (samples/s) of
``train_centralized`` and of ``run_federated`` (10 IID clients, every client every round,
float32 codec on both links, weighted FedAvg), and their ratio. The federated number includes
everything a round does: broadcast encode/decode, local training, upload encode, server decode,
validation and aggregation. Evaluation is excluded (a 10-image test set).

    python benchmarks/simulator.py [--rounds 2] [--models cnn mlp]
"""

from __future__ import annotations

import argparse
import time

import torch

import helpers
from helpers.data import load_dataset, partition_iid
from helpers.federated import FedConfig, run_federated, train_centralized
from helpers.models import MLP, SmallCNN

MODELS = {"cnn": SmallCNN, "mlp": lambda: MLP(hidden=(200,))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="epochs (centralized) = rounds (federated)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    train = load_dataset()
    tiny_test = load_dataset(train=False).subset(torch.arange(10))
    parts = partition_iid(train.y, 10, rng=0)
    print(f"{'model':6s} {'centralized samples/s':>22s} {'federated samples/s':>20s} {'ratio':>6s}")
    for name in args.models:
        helpers.seed_everything(0)
        model = MODELS[name]()
        t0 = time.perf_counter()
        train_centralized(model, train, tiny_test, epochs=args.rounds, batch_size=args.batch_size, lr=0.02,
                          momentum=0.9)
        central = args.rounds * len(train) / (time.perf_counter() - t0)
        cfg = FedConfig(rounds=args.rounds, fraction=1.0, local_epochs=1, batch_size=args.batch_size, lr=0.02,
                        momentum=0.9)
        t0 = time.perf_counter()
        run = run_federated(model, train, parts, tiny_test, cfg)
        federated = run.history.total_samples / (time.perf_counter() - t0)
        print(f"{name:6s} {central:22,.0f} {federated:20,.0f} {federated / central:6.2f}", flush=True)


if __name__ == "__main__":
    main()
