"""``helpers``: the small library behind *Federated Learning with Model Compression*.

Each module has one job (the module map is in CONTRIBUTING.md): ``data``, ``models``, ``training``,
``history``, ``codecs`` (a package: the wire format, quantized and sparse codecs), ``error_feedback``,
``aggregation``, ``federated``, ``parallel``, ``experiment``, ``plots``, the compression families
``quantization``, ``pruning`` and ``distillation``, then ``deploy`` (ONNX Runtime), ``systems`` (device
profiles, the simulated clock, deadlines), ``heterogeneity`` (FedProx, personalization) and ``attacks``
(malicious clients). The Flower app lives in the subpackage ``helpers.flower``,
imported only where Flower is used.
"""

from . import (aggregation, attacks, codecs, data, deploy, distillation, error_feedback, experiment, federated,
               heterogeneity, history, models, parallel, plots, pruning, quantization, systems, training)
from .reproducibility import make_rng, seed_everything
from .source import show_source

__all__ = ["aggregation", "attacks", "codecs", "data", "deploy", "distillation", "error_feedback", "experiment", "federated",
           "heterogeneity", "history", "models", "parallel", "plots", "pruning", "quantization", "systems", "training", "make_rng",
           "seed_everything", "show_source"]
