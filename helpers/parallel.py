r"""Run independent experiments (seeds, sweep points, methods) side by side, one CPU core each.

The book's models are small: a second torch thread in one process buys little (and stalls on a busy
machine), while two single-threaded processes each run at full speed. So instead of one run on all cores,
:func:`run_parallel` runs *whole runs* in parallel worker processes with one torch thread each::

    # helpers/my_chapter_tasks.py (or any importable module; not a notebook cell)
    def one_seed(seed: int, lr: float) -> dict:
        helpers.seed_everything(seed)        # tasks seed themselves
        ...                                  # build the model, run_federated(...)
        return {"acc": run.history.final_accuracy}

    # in the notebook
    from helpers.parallel import run_parallel
    results = run_parallel(one_seed, [dict(seed=s, lr=0.04) for s in (0, 1, 2)],
                           labels=[f"seed {s}" for s in (0, 1, 2)])

``fn(**task)`` is called once per task; the results come back in task order.

Rules and guarantees

* ``fn`` must be importable by name (a module-level function in a ``.py`` module): spawned workers
  look it up by ``module.qualname``. Lambdas, nested functions and functions defined in a notebook
  raise ``TypeError``.
* Every task starts from the same state, whichever worker runs it: one torch thread, and the global
  RNGs (``random``, NumPy, torch) seeded with 0. Tasks must still seed themselves (pass the seed in
  the kwargs) -- that is what makes two seeds differ.
* Results are bit-identical to running the tasks one after another in one process with one torch
  thread (which is what ``workers=1`` does). A run on 2 threads may differ in the last bits.
* Arguments and results travel by pickle between the book's own processes (this is local IPC, not
  the simulated network, which never uses pickle). A dataset from :func:`helpers.data.load_dataset`
  pickles as "load it again" (a few bytes), so passing the full training set is free; a
  ``subset()`` pickles its tensors. Treat loaded datasets as read-only.
* Arguments and results are pickled even when the tasks run in-process, so every task gets its own
  copy and a notebook behaves the same with 1 or 2 workers. Results must be picklable.
* What a task prints in a worker goes to the terminal that runs Jupyter, not to the cell: return
  what you need (the History, the final state) instead of printing it.

Workers: ``workers=None`` uses one per available CPU (at most one per task). The environment
variable ``FLBOOK_WORKERS`` caps the number (``FLBOOK_WORKERS=1`` runs everything in-process: use it
on Colab's free tier or Binder, which have 1-2 CPUs, or when debugging). The worker pool is started
on first use (spawning a worker and importing torch takes seconds), reused by later calls, and shut
down when Python exits or by :func:`shutdown_pool`.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import functools
import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = ["run_parallel", "RunFailed", "available_cpus", "default_workers", "shutdown_pool", "example_task"]

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_TASK_SEED = 0
_FAILURE_GRACE_S = 2.0  # after a task fails, how long the others in flight may take before the workers are stopped


class RunFailed(RuntimeError):
    """A task raised in a worker (or in-process). Carries the task's ``label``, the original
    exception's type name ``exc_type`` and ``message``, and the worker's ``remote_traceback`` text;
    ``original`` is the exception object itself when it could be sent back (also the ``__cause__``)."""

    def __init__(self, label: str, exc_type: str, message: str, remote_traceback: str,
                 original: BaseException | None = None) -> None:
        self.label, self.exc_type, self.message = label, exc_type, message
        self.remote_traceback, self.original = remote_traceback, original
        super().__init__(f"task {label!r} failed with {exc_type}: {message}\n\n"
                         f"--- traceback in the worker ---\n{remote_traceback.rstrip()}")

    def __reduce__(self):
        return (RunFailed, (self.label, self.exc_type, self.message, self.remote_traceback, None))


# --------------------------------------------------------------------------- checks


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _env_cap() -> int | None:
    raw = os.environ.get("FLBOOK_WORKERS", "").strip()
    if not raw:
        return None
    try:
        cap = int(raw)
    except ValueError:
        cap = 0
    if cap < 1:
        raise ValueError(f"FLBOOK_WORKERS must be a positive integer, got {raw!r}")
    return cap


def default_workers(num_tasks: int) -> int:
    """``min(num_tasks, available CPUs)``, capped by ``$FLBOOK_WORKERS``; at least 1."""
    n = min(num_tasks, available_cpus())
    cap = _env_cap()
    return max(1, min(n, cap) if cap is not None else n)


def _check_importable(fn: Callable) -> None:
    """Spawned workers find ``fn`` by ``module.qualname``; refuse what they could not find."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not callable(target):
        raise TypeError(f"fn must be a function, got {type(fn).__name__}")
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    hint = ("define it at the top level of a .py module (e.g. a file next to the notebook, or in helpers/) "
            "and import it: worker processes look functions up by name")
    if qualname is None or module is None:
        raise TypeError(f"fn must be a module-level function, got {fn!r}; {hint}")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(f"fn must be a module-level function, got {module}.{qualname} "
                        f"(a lambda or a function defined inside another function); {hint}")
    if module == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if not main_file or not str(main_file).endswith(".py"):
            raise TypeError(f"fn {qualname!r} is defined in a notebook or an interactive session, which "
                            f"worker processes cannot import; {hint}")
    else:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is not target:
            raise TypeError(f"fn {module}.{qualname} cannot be found by that name (was it redefined or "
                            f"replaced?); {hint}")


def _default_label(fn: Callable, task: Mapping[str, Any], i: int) -> str:
    scalars = [f"{k}={v!r}" for k, v in task.items()
               if isinstance(v, (bool, int, float, str)) and len(repr(v)) <= 20]
    name = getattr(fn, "__name__", "task")
    return f"{name}({', '.join(scalars)})" if scalars else f"{name} #{i}"


# --------------------------------------------------------------------------- running one task


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread for the duration, then the caller's setting back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reset_task_state() -> None:
    """The state every task starts from, in a worker or in-process: 1 thread, global RNGs at seed 0."""
    import random

    import numpy as np
    import torch

    torch.set_num_threads(1)
    random.seed(_TASK_SEED)
    np.random.seed(_TASK_SEED)
    torch.manual_seed(_TASK_SEED)


@contextlib.contextmanager
def _saved_global_rngs() -> Iterator[None]:
    import random

    import numpy as np
    import torch

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def _execute(fn: Callable, payload: bytes) -> tuple:
    """Run one task. Returns ``("ok", result_bytes, seconds)`` or
    ``("error", exc_type, message, traceback_text, pickled_exception_or_None, seconds)``."""
    t0 = time.perf_counter()
    try:
        _reset_task_state()
        result = fn(**pickle.loads(payload))
        return "ok", pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), time.perf_counter() - t0
    except KeyboardInterrupt:  # Ctrl-C in the in-process mode stays a Ctrl-C (workers ignore SIGINT)
        raise
    except BaseException as exc:  # noqa: BLE001 -- everything else goes back to the caller, labelled
        try:
            original = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 -- an exception that does not pickle still has its text
            original = None
        return ("error", f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
                str(exc), traceback.format_exc(), original, time.perf_counter() - t0)


def _init_worker() -> None:
    # Ctrl-C / Jupyter's interrupt reaches the whole process group: the caller handles it (and stops
    # the workers); a worker that died of it would break the pool for the next call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in _THREAD_ENV:
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):  # only allowed before any inter-op work started
        torch.set_num_interop_threads(1)
    # The first optimizer in a process imports torch._dynamo (about a second): pay it at start-up,
    # not inside the first task's timing.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _worker_info() -> tuple[int, int, str | None]:
    import torch

    return os.getpid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


# --------------------------------------------------------------------------- the pool

_pool: cf.ProcessPoolExecutor | None = None
_pool_size = 0


@contextlib.contextmanager
def _single_thread_env() -> Iterator[None]:
    """Workers are spawned inside this: they inherit OMP/MKL_NUM_THREADS=1 before they import torch."""
    saved = {var: os.environ.get(var) for var in _THREAD_ENV}
    os.environ.update({var: "1" for var in _THREAD_ENV})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _get_pool(size: int) -> cf.ProcessPoolExecutor:
    """The persistent pool, (re)created when it is missing, broken or too small."""
    global _pool, _pool_size
    if _pool is not None and (_pool_size < size or getattr(_pool, "_broken", False)):
        shutdown_pool()
    if _pool is None:
        _pool = cf.ProcessPoolExecutor(max_workers=size, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker)
        _pool_size = size
        try:
            with _single_thread_env():  # start every worker now, with the single-thread environment
                for f in [_pool.submit(_worker_info) for _ in range(size)]:
                    f.result()
        except BrokenProcessPool as exc:
            _kill_pool()
            raise RuntimeError("the worker processes could not start (see the traceback printed above). "
                               "In a script, call run_parallel only under `if __name__ == '__main__':` "
                               "(workers import the script); or set FLBOOK_WORKERS=1 to run in-process") from exc
    return _pool


def _kill_pool() -> None:
    """Stop the workers now (an interrupted or failed call): their work is abandoned."""
    global _pool, _pool_size
    pool, _pool, _pool_size = _pool, None, 0
    if pool is None:
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def shutdown_pool() -> None:
    """Shut the worker pool down (it is restarted on the next call). Runs at exit by itself."""
    global _pool, _pool_size
    pool, _pool, _pool_size = _pool, None, 0
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pool)


# --------------------------------------------------------------------------- the public function


def _raise_failed(label: str, outcome: tuple) -> None:
    _, exc_type, message, tb, original, _ = outcome
    exc = None
    if original is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(original)
    raise RunFailed(label, exc_type, message, tb, exc) from exc


def _report(progress: bool, done: int, total: int, label: str, seconds: float) -> None:
    if progress:
        print(f"[{done}/{total}] {label}: {seconds:.1f} s", flush=True)


def run_parallel(fn: Callable[..., Any], tasks: Sequence[Mapping[str, Any]], *, workers: int | None = None,
                 labels: Sequence[str] | None = None, progress: bool = True) -> list:
    """``[fn(**task) for task in tasks]``, computed in parallel worker processes (one torch thread each).

    ``fn``: a module-level function (see the module docstring). ``tasks``: one dict of keyword
    arguments per call; put the seed in it. ``workers``: how many processes (default: one per available
    CPU, at most one per task, capped by ``$FLBOOK_WORKERS``); with 1 the tasks run here, one after
    another, with one torch thread (restored afterwards). ``labels`` name the tasks in the progress
    lines and in errors. ``progress`` prints one line per finished task (label and seconds).

    Raises :class:`RunFailed` naming the task's label when a task raises.
    """
    if isinstance(tasks, Mapping) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of keyword-argument dicts, got {type(tasks).__name__}")
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping) or not all(isinstance(k, str) for k in task):
            raise TypeError(f"tasks[{i}] must be a dict of keyword arguments, got {task!r:.80}")
    _check_importable(fn)
    if labels is None:
        labels = [_default_label(fn, task, i) for i, task in enumerate(tasks)]
    elif isinstance(labels, str) or len(labels) != len(tasks):
        raise ValueError(f"labels must be a list with one label per task ({len(tasks)})")
    labels = [str(label) for label in labels]
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    if not tasks:
        return []
    n = default_workers(len(tasks)) if workers is None else min(workers, len(tasks))
    cap = _env_cap()
    if cap is not None:
        n = min(n, cap)
    payloads = [pickle.dumps(dict(task), protocol=pickle.HIGHEST_PROTOCOL) for task in tasks]
    if n == 1:
        return _run_here(fn, payloads, labels, progress)
    return _run_pool(fn, payloads, labels, progress, n)


def _run_here(fn: Callable, payloads: list[bytes], labels: list[str], progress: bool) -> list:
    results = []
    with _one_thread(), _saved_global_rngs():
        for i, payload in enumerate(payloads):
            outcome = _execute(fn, payload)
            if outcome[0] == "error":
                _raise_failed(labels[i], outcome)
            results.append(pickle.loads(outcome[1]))
            _report(progress, i + 1, len(payloads), labels[i], outcome[2])
    return results


def _run_pool(fn: Callable, payloads: list[bytes], labels: list[str], progress: bool, n: int) -> list:
    pool = _get_pool(n)
    results: list[Any] = [None] * len(payloads)
    pending = iter(range(len(payloads)))
    running: dict[cf.Future, int] = {}
    done = 0

    def submit_next() -> None:
        i = next(pending, None)
        if i is not None:
            with _single_thread_env():  # in case the pool replaces a worker
                running[pool.submit(_execute, fn, payloads[i])] = i

    try:
        for _ in range(n):  # at most n tasks in flight, even if the pool is larger
            submit_next()
        while running:
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in sorted(finished, key=running.__getitem__):
                i = running.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool as exc:
                    _kill_pool()
                    raise RunFailed(labels[i], "BrokenProcessPool",
                                    "a worker process died while running this task (out of memory?)",
                                    "".join(traceback.format_exception(exc))) from exc
                if outcome[0] == "error":
                    _raise_failed(labels[i], outcome)
                results[i] = pickle.loads(outcome[1])
                done += 1
                _report(progress, done, len(payloads), labels[i], outcome[2])
                submit_next()
    except RunFailed:
        if running:  # tasks still in flight: give them a moment, then abandon them rather than let them run on
            cf.wait(running, timeout=_FAILURE_GRACE_S)
            if any(not f.done() for f in running):
                _kill_pool()
        raise
    except BaseException:  # Ctrl-C, a dead worker: stop the workers, the next call starts fresh ones
        _kill_pool()
        raise
    return results


# --------------------------------------------------------------------------- an example task


def example_task(*, seed: int, train, test, partition: Sequence, config, hidden: tuple[int, ...] = (200,),
                 model: str = "mlp") -> dict[str, Any]:
    """One seed of FedAvg, as a task for :func:`run_parallel` (the tests and the simulator benchmark
    use it): seed everything with ``seed`` (also ``config.seed``: client sampling and shuffling), build
    the model (``"mlp"`` with ``hidden`` units or ``"cnn"``), run ``config`` on ``partition`` and return
    the final global ``state`` (every tensor of the state dict), the test ``accuracy`` and the training
    ``samples`` processed."""
    import dataclasses

    from .federated import run_federated
    from .models import MLP, SmallCNN
    from .reproducibility import seed_everything

    if model not in ("mlp", "cnn"):
        raise ValueError(f"model must be 'mlp' or 'cnn', got {model!r}")
    seed_everything(seed)
    net = MLP(hidden=tuple(hidden)) if model == "mlp" else SmallCNN()
    run = run_federated(net, train, partition, test, dataclasses.replace(config, seed=seed))
    return {"state": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
            "accuracy": run.history.final_accuracy, "samples": run.history.total_samples}
