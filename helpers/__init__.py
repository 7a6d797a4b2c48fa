"""``helpers``: the small library behind *Federated Learning with Model Compression*.

Each module has one job (see DESIGN.md): ``data``, ``models``, ``codecs``, ``error_feedback``,
``federated``, ``experiment``, ``plots``, and the compression families ``quantization``, ``pruning``
(with ``sparse_codecs``) and ``distillation``.
"""

from . import (codecs, data, distillation, error_feedback, experiment, federated, models, plots, pruning,
               quantization, sparse_codecs)
from .reproducibility import make_rng, seed_everything
from .source import show_source

__all__ = ["codecs", "data", "distillation", "error_feedback", "experiment", "federated", "models", "plots",
           "pruning", "quantization", "sparse_codecs", "make_rng", "seed_everything", "show_source"]
