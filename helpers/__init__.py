"""``helpers``: the small library behind *Federated Learning with Model Compression*.

Each module has one job (the module map is in CONTRIBUTING.md). The **library**: ``data``, ``models``,
``training``, ``history``, ``codecs`` (a package: the wire format, quantized and sparse codecs),
``error_feedback``, ``aggregation``, ``federated``, ``parallel``, ``stats`` (paired comparisons), ``plots``, the
compression families ``quantization``, ``pruning`` and ``distillation``, then ``deploy`` (ONNX Runtime),
``systems`` (device profiles, the simulated clock, deadlines), ``heterogeneity`` (FedProx, personalization)
and ``attacks`` (malicious clients). The **lab** above it, which the library never imports: ``experiment``
(the book's standard setting) and ``chapters`` (each chapter's experiments). The Flower app lives in the
subpackage ``helpers.flower``, imported only where Flower is used.
"""

from . import (aggregation, attacks, chapters, codecs, data, deploy, distillation, error_feedback, experiment, federated,
               heterogeneity, history, models, parallel, plots, pruning, quantization, stats, systems, training)
from .reproducibility import make_rng, seed_everything
from .source import show_source

__all__ = ["aggregation", "attacks", "chapters", "codecs", "data", "deploy", "distillation", "error_feedback", "experiment", "federated",
           "heterogeneity", "history", "models", "parallel", "plots", "pruning", "quantization", "stats", "systems", "training", "make_rng",
           "seed_everything", "show_source"]
