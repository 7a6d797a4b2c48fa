"""``helpers``: the small library behind *Federated Learning with Model Compression*.

Each module has one job (see CONTRIBUTING.md): ``data``, ``models``, ``training``, ``history``,
``codecs`` (a package: the wire format, quantized and sparse codecs), ``error_feedback``,
``aggregation``, ``federated``, ``experiment``, ``plots``, and the compression families
``quantization``, ``pruning`` and ``distillation``.
"""

from . import (aggregation, codecs, data, distillation, error_feedback, experiment, federated, history, models,
               plots, pruning, quantization, training)
from .reproducibility import make_rng, seed_everything
from .source import show_source

__all__ = ["aggregation", "codecs", "data", "distillation", "error_feedback", "experiment", "federated", "history",
           "models", "plots", "pruning", "quantization", "training", "make_rng", "seed_everything", "show_source"]
