"""The lab: each chapter's experiments (one file per chapter), built on the library below.

Nothing in the library (``helpers.quantization``, ``helpers.federated``, ...) imports this package;
it imports the library and the book's setting (:mod:`helpers.experiment`). A chapter whose experiment
is short defines it in the notebook instead, where the reader sees it.
"""

from . import ch2, ch3, ch4, ch6, ch8

__all__ = ["ch2", "ch3", "ch4", "ch6", "ch8"]
