"""The few figure styles the book reuses. Each function draws on an ``Axes`` and returns it."""

from __future__ import annotations

from typing import Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .history import History

__all__ = ["use_book_style", "plot_curves", "plot_accuracy_vs_bytes", "plot_label_histogram", "markdown_table"]


def use_book_style() -> None:
    """Small, legible, consistent figures (call once at the top of a chapter)."""
    plt.rcParams.update({
        "figure.figsize": (6.4, 3.6), "figure.dpi": 100, "savefig.dpi": 100,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "font.size": 10, "legend.frameon": False,
    })


def _ax(ax: plt.Axes | None) -> plt.Axes:
    return ax if ax is not None else plt.subplots()[1]


def plot_curves(histories: Iterable[History], y: str = "test_acc", x: str = "round",
                ax: plt.Axes | None = None, ylabel: str | None = None, xlabel: str | None = None) -> plt.Axes:
    """One line per run: ``y`` (a :class:`RoundRecord` field) against rounds (or cumulative ``bytes_up``)."""
    ax = _ax(ax)
    for h in histories:
        rows = h.evaluated() if y.startswith("test_") else h.rows
        xs = np.array([getattr(r, x) for r in rows], dtype=float)
        if x == "bytes_up":  # cumulative bytes make the x-axis a communication budget
            xs = np.cumsum([r.bytes_up for r in h.rows])[[r.round - 1 for r in rows]]
        ax.plot(xs, [getattr(r, y) for r in rows], marker="o", ms=3, label=h.label)
    ax.set_xlabel(xlabel or {"round": "round", "bytes_up": "cumulative uplink bytes"}.get(x, x))
    ax.set_ylabel(ylabel or {"test_acc": "test accuracy", "test_loss": "test loss"}.get(y, y))
    ax.legend()
    return ax


def plot_accuracy_vs_bytes(labels: Sequence[str], bytes_: Sequence[float], accuracies: Sequence[float],
                           ax: plt.Axes | None = None, xlabel: str = "uplink bytes per client per round") -> plt.Axes:
    """Scatter of final accuracy against measured bytes, log-scaled x, each point labelled."""
    ax = _ax(ax)
    ax.scatter(bytes_, accuracies, zorder=3)
    for lab, b, a in zip(labels, bytes_, accuracies):
        ax.annotate(lab, (b, a), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    return ax


def plot_label_histogram(hist: np.ndarray, classes: Sequence[str] | None = None, ax: plt.Axes | None = None,
                         title: str = "") -> plt.Axes:
    """Stacked bars: how many samples of each class every client holds."""
    ax = _ax(ax)
    hist = np.asarray(hist)
    bottom = np.zeros(hist.shape[0])
    cmap = plt.get_cmap("tab10")
    for c in range(hist.shape[1]):
        ax.bar(np.arange(hist.shape[0]), hist[:, c], bottom=bottom, color=cmap(c % 10),
               label=classes[c] if classes is not None else str(c), width=0.8)
        bottom += hist[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_xticks(np.arange(hist.shape[0]))
    if title:
        ax.set_title(title)
    return ax


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]):
    """A results table rendered as Markdown in the book (plain text elsewhere)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    try:
        from IPython.display import Markdown

        return Markdown(text)
    except ImportError:  # pragma: no cover
        return text
