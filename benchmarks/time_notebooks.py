"""Execute every chapter notebook (or the ones named) and print its wall time against the budget.

    python benchmarks/time_notebooks.py [book/02_quantization.ipynb ...] [--budget 150]

Runs each notebook in a fresh kernel with the working directory set to book/, exactly as nbval
does; the notebooks on disk are not modified.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds allowed per chapter")
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
    over = 0
    print(f"{'notebook':34s} {'seconds':>8s}  budget {args.budget:.0f} s")
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(path.resolve().parent)}})
        t0 = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - t0
        flag = "ok" if seconds <= args.budget else "OVER BUDGET"
        over += seconds > args.budget
        print(f"{path.name:34s} {seconds:8.1f}  {flag}", flush=True)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
