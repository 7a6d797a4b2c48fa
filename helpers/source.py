"""Show the real source of a helper inside a notebook, so the code you read is the code that runs."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["show_source"]


def show_source(obj: Any) -> Any:
    """Display ``obj``'s source code with syntax highlighting (plain text outside IPython)."""
    code = inspect.getsource(obj)
    try:
        from IPython.display import Code

        return Code(code, language="python")
    except ImportError:  # pragma: no cover - plain Python
        print(code)
        return None
