r"""Run independent experiments (seeds, sweep points, methods) side by side, one torch thread each.

The book's models are small: two single-threaded processes do more than one process on two threads (and a
second thread stalls on a busy machine). :func:`run_parallel` is a thin wrapper over ``joblib.Parallel``
(loky processes; functions travel by cloudpickle, so one defined in a notebook cell works; workers are reused
between calls; ``joblib.parallel_config(backend="dask")`` sends the same sweep to a cluster). It adds the
book's guarantees, each checked by ``tests/test_parallel.py``:

* every task starts from one torch thread and the global RNGs at seed 0, whichever worker runs it, so the
  results are bit-identical to a 1-thread loop in one process (tasks seed themselves: pass the seed);
* ``FLBOOK_WORKERS=N`` caps the workers; ``FLBOOK_WORKERS=1`` runs here, on copies of the arguments, and
  restores the caller's threads and RNGs (Colab's free tier, Binder, debugging);
* one progress line per finished task; a failing task raises :class:`RunFailed` naming its label.

A dataset from :func:`helpers.data.load_dataset` pickles as "load it again", so passing it is free.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import time
import traceback
import warnings
from typing import Any, Callable, Mapping, Sequence

import joblib
import numpy as np
import torch
from joblib.externals.loky.process_executor import TerminatedWorkerError
from joblib.parallel import LokyBackend, get_active_backend

__all__ = ["run_parallel", "RunFailed", "available_cpus", "default_workers"]


class RunFailed(RuntimeError):
    """A task raised: ``label`` names it, ``exc_type``/``message`` the error (its ``__cause__`` when it could be
    sent back), ``remote_traceback`` where it was raised."""

    def __init__(self, label: str, exc_type: str, message: str, remote_traceback: str) -> None:
        self.label, self.exc_type, self.message, self.remote_traceback = label, exc_type, message, remote_traceback
        super().__init__(f"task {label!r} failed with {exc_type}: {message}\n\n--- traceback of the task ---\n"
                         f"{remote_traceback.rstrip()}")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _env_cap() -> int | None:
    raw = os.environ.get("FLBOOK_WORKERS", "").strip()
    if raw and (not raw.isdigit() or int(raw) < 1):
        raise ValueError(f"FLBOOK_WORKERS must be a positive integer, got {raw!r}")
    return int(raw) if raw else None


def default_workers(num_tasks: int) -> int:
    """``min(num_tasks, available CPUs)``, capped by ``$FLBOOK_WORKERS``; at least 1."""
    return max(1, min(num_tasks, available_cpus(), _env_cap() or num_tasks))


def _run_task(fn: Callable, task: Mapping[str, Any], index: int) -> tuple:
    """One task from the book's start state (1 thread, RNGs at 0): ``(index, "ok", result, s)`` or
    ``(index, "error", (exc_type, message, traceback, exception or None), s)``."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    try:
        return index, "ok", fn(**task), time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 -- it goes back to the caller, labelled
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 -- an exception that does not pickle still sends its type and text
            return index, "error", (kind, str(exc), traceback.format_exc(), None), time.perf_counter() - t0
        return index, "error", (kind, str(exc), traceback.format_exc(), exc), time.perf_counter() - t0


def _copy(obj: Any) -> Any:
    """What a worker would receive: a copy of the caller's own object through pickle, in this process (a
    dataset from ``load_dataset`` comes back as itself). Never bytes from outside: nothing here is a payload."""
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _in_process(fn: Callable, tasks: Sequence[Mapping[str, Any]]):
    """The tasks one after another here, on copies of their arguments; the caller's threads and RNGs kept."""
    threads, rngs = torch.get_num_threads(), (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        for i, task in enumerate(tasks):
            index, status, value, seconds = _run_task(fn, _copy(dict(task)), i)
            yield index, status, _copy(value) if status == "ok" else value, seconds
    finally:
        torch.set_num_threads(threads)
        random.setstate(rngs[0]), np.random.set_state(rngs[1]), torch.set_rng_state(rngs[2])


def _close(outcomes) -> None:
    """Stop the tasks still in flight (after a failure), without joblib's warning that it cancelled them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tasks which were still being processed", category=UserWarning)
        outcomes.close()


def run_parallel(fn: Callable[..., Any], tasks: Sequence[Mapping[str, Any]], *, workers: int | None = None,
                 labels: Sequence[str] | None = None, progress: bool = True) -> list:
    """``[fn(**task) for task in tasks]``, in parallel worker processes with one torch thread each.

    ``tasks``: one dict of keyword arguments per call (put the seed in it). ``workers``: how many processes
    (default one per available CPU, at most one per task, capped by ``$FLBOOK_WORKERS``; 1 runs here).
    ``labels`` name the tasks in the progress lines and errors. Results come back in task order.
    Raises :class:`RunFailed` naming the label of the task that raised.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a function, got {type(fn).__name__}")
    if isinstance(tasks, Mapping) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of keyword-argument dicts, got {type(tasks).__name__}")
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping) or not all(isinstance(k, str) for k in task):
            raise TypeError(f"tasks[{i}] must be a dict of keyword arguments, got {task!r:.80}")
    if labels is None:
        labels = [f"{getattr(fn, '__name__', 'task')} #{i}" for i in range(len(tasks))]
    elif isinstance(labels, str) or len(labels) != len(tasks):
        raise ValueError(f"labels must be a list with one label per task ({len(tasks)})")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    n = default_workers(len(tasks)) if workers is None else min(workers, len(tasks), _env_cap() or workers)
    if not tasks:
        return []
    results: list[Any] = [None] * len(tasks)
    pending = set(range(len(tasks)))
    with contextlib.ExitStack() as stack:
        if n == 1:
            outcomes = _in_process(fn, tasks)
        else:
            backend, _ = get_active_backend()
            if isinstance(backend, LokyBackend) and backend.inner_max_num_threads is None:
                stack.enter_context(joblib.parallel_config("loky", inner_max_num_threads=1))
            outcomes = joblib.Parallel(n_jobs=n, return_as="generator_unordered", batch_size=1)(
                joblib.delayed(_run_task)(fn, task, i) for i, task in enumerate(tasks))
        stack.callback(_close, outcomes)
        try:
            for index, status, value, seconds in outcomes:
                if status == "error":
                    kind, message, tb, original = value
                    raise RunFailed(str(labels[index]), kind, message, tb) from original
                results[index] = value
                pending.discard(index)
                if progress:
                    print(f"[{len(tasks) - len(pending)}/{len(tasks)}] {labels[index]}: {seconds:.1f} s", flush=True)
        except TerminatedWorkerError as exc:
            names = ", ".join(repr(str(labels[i])) for i in sorted(pending))
            raise RunFailed(names, "TerminatedWorkerError", "a worker process died while running one of these "
                            "tasks (out of memory?)", str(exc)) from exc
    return results
