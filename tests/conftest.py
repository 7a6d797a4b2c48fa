"""Shared fixtures: real Fashion-MNIST slices, loaded once per test session."""

import pytest
import torch

from helpers.data import load_dataset


@pytest.fixture(scope="session")
def fmnist_train():
    return load_dataset("fashion_mnist", train=True)


@pytest.fixture(scope="session")
def fmnist_test():
    return load_dataset("fashion_mnist", train=False)


@pytest.fixture(scope="session")
def small_train(fmnist_train):
    """The first 6,000 training images: a real slice, small enough for fast tests."""
    return fmnist_train.subset(torch.arange(6000))


@pytest.fixture(scope="session")
def small_test(fmnist_test):
    return fmnist_test.subset(torch.arange(2000))


# ---- hypothesis: a quick profile for `make test`, a long one for fuzzing by hand ---------------------
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=150, deadline=None, database=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FUZZ_STATS = {"payloads": 0, "seconds": 0.0, "peak_bytes": 0}


def pytest_terminal_summary(terminalreporter):
    if FUZZ_STATS["payloads"]:
        terminalreporter.write_line(
            f"codec fuzzing: {FUZZ_STATS['payloads']} mutated payloads decoded against the reference; "
            f"worst decode {FUZZ_STATS['seconds'] * 1e3:.2f} ms, worst peak memory {FUZZ_STATS['peak_bytes'] / 1024:.1f} KiB")
