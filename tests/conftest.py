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
