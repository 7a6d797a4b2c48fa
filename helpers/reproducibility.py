"""Reproducibility: one call seeds every random number generator the book uses."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["seed_everything", "make_rng"]


def seed_everything(seed: int, threads: int | None = None) -> np.random.Generator:
    """Seed Python, NumPy and PyTorch.

    Returns a fresh ``np.random.Generator`` seeded with ``seed``; the helpers take such
    generators explicitly rather than relying on NumPy's global state.
    ``threads`` (optional) fixes ``torch.set_num_threads`` so timings are comparable.
    The CPU kernels the book uses are deterministic for a fixed thread count.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    return np.random.default_rng(seed)


def make_rng(seed_or_rng: int | np.random.Generator | None) -> np.random.Generator:
    """Turn a seed (or an existing generator) into a ``np.random.Generator``."""
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    if seed_or_rng is None:
        raise ValueError("pass a seed or a np.random.Generator: the book never uses hidden global randomness")
    return np.random.default_rng(seed_or_rng)
