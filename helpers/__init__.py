"""``helpers``: the small library behind *Federated Learning with Model Compression*.

Each module has one job (see DESIGN.md): ``data``, ``models``, ``codecs``, ``error_feedback``,
``federated``, ``plots``; later chapters add ``quantization``, ``pruning`` and ``distillation``.
"""

from . import codecs, data, error_feedback, experiment, federated, models, plots
from .reproducibility import make_rng, seed_everything
from .source import show_source

__all__ = ["codecs", "data", "error_feedback", "experiment", "federated", "models", "plots", "make_rng", "seed_everything", "show_source"]
