r"""Run the book's Flower app on Flower's **Simulation Engine**: many virtual SuperNodes in one process.

:func:`run_on_simulation_engine` runs *the same* ServerApp and ClientApp as the deployment engine
(:mod:`~helpers.flower.server_app`, :mod:`~helpers.flower.client_app`) with ``flwr.simulation.run_simulation``:
``num_supernodes`` virtual SuperNodes (node ``i`` gets ``partition-id=i``, as a SuperNode started with
``--node-config`` does), whose messages a small pool of long-lived Ray workers executes, so no process is
started per message. Ray (``pip install "flwr[simulation]"``; no wheels for Windows with Python 3.13) is
imported only here, started in this process with ``num_cpus`` CPUs (each ClientApp asks for
``client_cpus``) and shut down at the end; every process it started is checked to be gone.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Mapping

import psutil
from flwr.simulation import run_simulation

from .client_app import make_app as make_client_app
from .server_app import make_app as make_server_app
from .task import default_run_config

__all__ = ["SimulationOutcome", "ray_available", "run_on_simulation_engine"]


def ray_available() -> bool:
    """True if Ray, the Simulation Engine's backend, can be imported here."""
    return importlib.util.find_spec("ray") is not None


@dataclasses.dataclass
class SimulationOutcome:
    """What :func:`run_on_simulation_engine` returns."""

    result: dict                 # the JSON the ServerApp wrote (as on the deployment engine)
    files: dict[str, bytes]      # every file the ServerApp wrote (``global.bin``, ``progress.log``, ...)
    seconds: float               # the whole call: Ray's start, the run, Ray's shutdown
    ray_processes: int           # processes started during the run (Ray's GCS, raylet, workers), all gone


def _children() -> set[tuple[int, float]]:
    found = set()
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            found.add((p.pid, p.create_time()))
        except psutil.NoSuchProcess:
            pass
    return found


def run_on_simulation_engine(run_config: Mapping[str, object], num_supernodes: int, *, num_cpus: int = 2,
                             client_cpus: float = 1.0, quiet: bool = True, grace: float = 30.0) -> SimulationOutcome:
    """Run the book's app with ``run_config`` (overrides of ``app/pyproject.toml``'s defaults) on
    ``num_supernodes`` virtual SuperNodes; return the ServerApp's result.

    ``num-nodes`` is set to ``num_supernodes``; ``result-dir`` to a temporary folder, removed at the end.
    Ray gets ``num_cpus`` CPUs and runs ``num_cpus / client_cpus`` ClientApps at a time. ``quiet`` keeps
    Flower's and Ray's logs to warnings (the ServerApp's round lines are still printed). Raises
    ``ImportError`` without Ray, and ``RuntimeError`` if a process Ray started outlives ``grace`` seconds.
    """
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int) or num_supernodes < 1:
        raise ValueError(f"num_supernodes must be an int ≥ 1, got {num_supernodes!r}")
    if not (isinstance(num_cpus, int) and num_cpus >= 1) or not 0 < client_cpus <= num_cpus:
        raise ValueError(f"need num_cpus ≥ 1 and 0 < client_cpus ≤ num_cpus, got {num_cpus!r}, {client_cpus!r}")
    if not ray_available():
        raise ImportError('the Simulation Engine needs Ray: pip install "flwr[simulation]" (Ray has no wheels '
                          'for Windows with Python 3.13; use Linux, macOS or WSL2 there)')
    import ray   # not a helpers module: only this code path needs Ray

    unknown = set(run_config) - set(default_run_config())
    if unknown:
        raise ValueError(f"unknown run-config keys {sorted(unknown)}")
    out = Path(tempfile.mkdtemp(prefix="flbook-simulation-"))
    config = {**default_run_config(), **dict(run_config), "num-nodes": num_supernodes, "result-dir": str(out)}
    backend = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": num_cpus, "num_gpus": 0, "include_dashboard": False,
                             "logging_level": "error" if quiet else "info", "log_to_driver": not quiet}}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    before = _children()
    seen: set[tuple[int, float]] = set()
    stop = threading.Event()

    def watch() -> None:          # Ray's processes (GCS, raylet, workers) come and go: record each one
        while not stop.is_set():
            seen.update(_children() - before)
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, name="ray-process-watch", daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        if quiet:
            flwr_logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            if quiet:       # Ray's notice about accelerator variables (no GPU is used here)
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
            run_simulation(server_app=make_server_app(config), client_app=make_client_app(config),
                           num_supernodes=num_supernodes, backend_config=backend)
    finally:
        flwr_logger.setLevel(level)
        if ray.is_initialized():            # Flower shuts Ray down itself; this covers an error on the way
            ray.shutdown()
        stop.set()
        watcher.join(timeout=5)
        seen.update(_children() - before)
        procs = []
        for pid, created in seen:
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    procs.append(p)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        seconds = time.perf_counter() - t0
        try:
            files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
        finally:
            shutil.rmtree(out, ignore_errors=True)
    if alive:
        raise RuntimeError("Ray left processes running: " + ", ".join(f"{p.pid} ({p.name()})" for p in alive))
    if "result.json" not in files:
        raise RuntimeError("the simulation ended without a result.json from the ServerApp")
    return SimulationOutcome(json.loads(files["result.json"]), files, seconds, len(seen))
