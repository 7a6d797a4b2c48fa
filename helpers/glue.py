"""``glue``: the book's way of putting a computed value into the prose.

Inside the book's environment this is :func:`myst_nb.glue` itself. Where myst-nb is not installed (a reader's
Colab session, which needs only the chapter's own packages), it is a stand-in with the same signature: the
chapter runs unchanged, ``glue(name, value)`` shows the value and ``glue(..., display=False)`` does nothing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["glue"]

try:
    from myst_nb import glue
except ImportError:  # no myst-nb: the chapter still runs; only the book build needs the real glue

    def glue(name: str, variable: Any, display: bool = True) -> None:
        """Stand-in for :func:`myst_nb.glue` (myst-nb is not installed): show ``variable`` if ``display``."""
        if display:
            from IPython.display import display as show

            show(variable)
