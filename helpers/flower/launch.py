r"""Run a Flower app on Flower's deployment engine, on this machine's loopback interface.

:class:`LoopbackDeployment` starts one SuperLink and ``N`` SuperNodes as separate processes talking
HTTP over ``127.0.0.1`` (free ports), submits the app with ``flwr run``, waits for the run with a
timeout while printing the ServerApp's progress lines, reads the run's status (``flwr ls``) and the
result file the ServerApp writes, and always stops exactly the processes it started, children
included (Flower's SuperExec and app processes run in sessions of their own, so the whole process
tree is recorded while it lives and stopped by PID, never by name).

All Flower state (``FLWR_HOME``, logs, results) lives in a temporary folder of the deployment's
own, removed at the end. If the launching process is killed outright (``SIGKILL``), Linux sends the
SuperLink and SuperNodes ``SIGTERM`` (``PR_SET_PDEATHSIG``) and they stop their own children; only the
temporary folder stays. ``--insecure`` (no TLS) is only acceptable because nothing leaves 127.0.0.1.

``python -m helpers.flower.launch`` (``make flower``) runs the book's app (Chapter 7).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import psutil

from .task import APP_DIR, AppSettings, default_run_config, write_node_data

__all__ = ["DeploymentError", "RunOutcome", "LoopbackDeployment", "node_data_for", "free_port", "port_is_free",
           "APP_DIR", "main"]

HOST = "127.0.0.1"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CONNECTION = "loopback"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.log"


class DeploymentError(RuntimeError):
    """The deployment could not start, the run failed or timed out (the message says which and shows logs)."""


def port_is_free(port: int, host: str = HOST) -> bool:
    """True if nothing listens on ``host:port`` (we can bind it ourselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST, avoid: set[int] | None = None) -> int:
    """A port the OS reports free on ``host`` right now (another program may still take it before we do)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not avoid or port not in avoid:
            return port
    raise DeploymentError(f"could not find a free port on {host}")


def _listening(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _executable(name: str) -> str:
    """A Flower command from this Python's environment (``.venv/bin``), else from ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found next to {sys.executable} or on PATH: pip install flwr")
    return found


def _die_with_parent() -> None:
    """In the child, before it runs: ask Linux to send it SIGTERM if the launching process dies, so even a
    killed notebook kernel leaves no SuperLink or SuperNode behind (they then stop their own children)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _is_clientapp(p: psutil.Process) -> bool:
    try:
        return "flwr-clientapp" in p.name() or any("flwr-clientapp" in part for part in p.cmdline()[:2])
    except psutil.Error:
        return False


def _toml_value(value: object) -> str:
    """A run-config value as TOML (what ``flwr run --run-config`` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"run_config values must be bool, int, float or str, got {type(value).__name__}")


@dataclass
class RunOutcome:
    """What :meth:`LoopbackDeployment.run` returns."""

    run_id: int
    status: str                    # e.g. "finished:completed"
    result: dict                   # the JSON the ServerApp wrote
    files: dict[str, bytes]        # every file the ServerApp wrote, read before the clean-up removes them
    seconds: float                 # submission to finished, wall clock
    run_info: dict = field(default_factory=dict)   # the run's row from ``flwr ls --format json``


class LoopbackDeployment:
    """One SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1, used as a context manager::

        with LoopbackDeployment(2) as dep:
            outcome = dep.run(APP_DIR, {"num-server-rounds": 3}, timeout=300)

    SuperNode ``i`` gets the node config ``partition-id=i num-partitions=N`` (plus ``node_config``) and, if
    ``node_data`` is given, ``data-path=node_data[i]``: the file holding that node's data and nothing else
    (:func:`write_node_data`; :func:`node_data_for` writes them for a run configuration).
    ``superlink_port`` picks the SuperLink's port (default: a free one); a taken port is an error.
    ``log`` receives the progress lines (``print`` by default; ``None`` is silent).
    """

    def __init__(self, num_nodes: int, *, superlink_port: int | None = None,
                 node_config: Mapping[str, object] | None = None, workdir: str | Path | None = None,
                 startup_timeout: float = 120.0, log: Callable[[str], None] | None = print,
                 env: Mapping[str, str] | None = None, node_data: Sequence[str | Path] | None = None) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be an int ≥ 1, got {num_nodes!r}")
        if node_data is not None and len(node_data) != num_nodes:
            raise ValueError(f"node_data must name one file per node ({num_nodes}), got {len(node_data)}")
        if superlink_port is not None and not (isinstance(superlink_port, int) and 0 < superlink_port < 65536):
            raise ValueError(f"superlink_port must be a port number in 1..65535, got {superlink_port!r}")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout!r}")
        self.num_nodes = num_nodes
        self.superlink_port = superlink_port
        self.node_config = dict(node_config or {})
        self.node_data = [str(Path(p).resolve()) for p in node_data] if node_data is not None else None
        self.startup_timeout = float(startup_timeout)
        self._log = log
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="flbook-flower-")) if workdir is None else Path(workdir)
        self.flwr_home = self.workdir / "flwr_home"
        self.env = self._environment(env)
        self.roots: list[tuple[str, subprocess.Popen]] = []   # (role, process) we started
        self.node_ports: list[int] = []
        self.seen: dict[tuple[int, float], str] = {}            # (pid, create time) -> name, whole tree
        self._lock = threading.Lock()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._runs = 0
        self.killed: dict[str, int] = {}                         # role -> PID, stopped on purpose by kill_node

    # ---- set-up --------------------------------------------------------------------------------
    def _environment(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS", "TTY_COMPATIBLE")}  # Jupyter sets some
        env.update({
            "FLWR_HOME": str(self.flwr_home),                     # all Flower state in our temp folder
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # no `uv sync`: use this environment
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",                               # one thread per process (apps set torch too)
            "MKL_NUM_THREADS": "1",
            "COLUMNS": "200",
            "NO_COLOR": "1",                                      # plain JSON from `flwr ... --format json`
            "TERM": "dumb",
            # the SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` from PATH
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        })
        env.update(extra or {})
        return env

    def say(self, line: str) -> None:
        if self._log is not None:
            self._log(f"[flower] {line}")

    def _spawn(self, role: str, args: list[str]) -> subprocess.Popen:
        logfile = open(self.workdir / f"{role}.log", "wb")
        try:
            proc = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.workdir, preexec_fn=_die_with_parent)
        finally:
            logfile.close()
        with self._lock:
            self.roots.append((role, proc))
            try:
                p = psutil.Process(proc.pid)
                self.seen[(p.pid, p.create_time())] = role
            except psutil.NoSuchProcess:
                pass
        return proc

    def _watch(self) -> None:
        """Record every descendant of the processes we started, while it lives (they leave our session)."""
        while not self._stop_watch.is_set():
            self._record_tree()
            self._stop_watch.wait(0.2)

    def _record_tree(self) -> None:
        with self._lock:
            roots = [proc.pid for _, proc in self.roots]
        for pid in roots:
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for c in children:
                try:
                    key = (c.pid, c.create_time())
                    if key not in self.seen:
                        with self._lock:
                            self.seen[key] = c.name()
                except psutil.NoSuchProcess:
                    pass

    def _check_alive(self, what: str) -> None:
        for role, proc in self.roots:
            if proc.poll() is not None and role not in self.killed:
                raise DeploymentError(f"{role} exited with code {proc.returncode} {what}; its log "
                                      f"({self.workdir / (role + '.log')}) ends with:\n{_tail(self.workdir / (role + '.log'))}")

    def start(self) -> "LoopbackDeployment":
        """Start the SuperLink and the SuperNodes; return when all nodes are connected."""
        t0 = time.perf_counter()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        port = self.superlink_port
        if port is None:
            port = free_port()
        elif not port_is_free(port):
            raise DeploymentError(f"port {port} on {HOST} is taken: stop what listens there, or choose "
                                  f"another port (or none: a free one is picked)")
        self.superlink_port = port
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{port}"\ninsecure = true\n')
        self._watcher = threading.Thread(target=self._watch, name="flower-process-watch", daemon=True)
        self._watcher.start()
        sl = self._spawn("superlink", [_executable("flower-superlink"), "--insecure", "--host", HOST,
                                       "--port", str(port), "--disable-runtime-dependency-installation"])
        self.say(f"SuperLink on {HOST}:{port} (pid {sl.pid})")
        deadline = time.monotonic() + self.startup_timeout
        while not _listening(port):
            self._check_alive("during start-up (is the port taken?)")
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperLink did not listen on {HOST}:{port} within {self.startup_timeout:.0f} s; "
                                      f"log:\n{_tail(self.workdir / 'superlink.log')}")
            time.sleep(0.2)
        for i in range(self.num_nodes):
            node_port = free_port(avoid={port, *self.node_ports})
            self.node_ports.append(node_port)
            cfg = {"partition-id": i, "num-partitions": self.num_nodes, **self.node_config}
            if self.node_data is not None:
                cfg["data-path"] = self.node_data[i]
            node = self._spawn(f"supernode-{i}", [
                _executable("flower-supernode"), "--insecure", "--superlink", f"{HOST}:{port}",
                "--host", HOST, "--port", str(node_port),
                "--node-config", " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())])
            self.say(f"SuperNode {i} (partition {i} of {self.num_nodes}) on {HOST}:{node_port} (pid {node.pid})")
        self._wait_for_nodes(deadline)
        self.say(f"{self.num_nodes} SuperNode(s) connected after {time.perf_counter() - t0:.1f} s")
        return self

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this deployment (``FLWR_HOME`` points at our config)."""
        return subprocess.run([_executable("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def _json(self, *args: str) -> dict:
        res = self.flwr(*args, "--format", "json")
        try:
            return json.loads(_ANSI.sub("", res.stdout))
        except json.JSONDecodeError:
            raise DeploymentError(f"`flwr {' '.join(args)}` returned no JSON (exit {res.returncode}):\n"
                                  f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}") from None

    def _wait_for_nodes(self, deadline: float) -> None:
        online = -1
        while True:
            self._check_alive("during start-up")
            info = self._json("supernode", "list", CONNECTION)
            nodes = info.get("nodes", [])
            online = sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")
            if online >= self.num_nodes:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- supernode-{i}.log\n{_tail(self.workdir / f'supernode-{i}.log', 8)}"
                                 for i in range(self.num_nodes))
                raise DeploymentError(f"only {online} of {self.num_nodes} SuperNodes connected within "
                                      f"{self.startup_timeout:.0f} s:\n{logs}")
            time.sleep(2.0)

    # ---- a run ---------------------------------------------------------------------------------
    def run(self, app_dir: str | Path = APP_DIR, run_config: Mapping[str, object] | None = None, *,
            timeout: float = 600.0, poll: float = 0.5, status_every: float = 30.0) -> RunOutcome:
        """Submit ``app_dir`` with ``run_config`` overrides, wait up to ``timeout`` seconds, return the outcome.

        The app must accept a ``result-dir`` run-config key: its ServerApp writes ``result.json`` there
        (and may append human-readable lines to ``progress.log``, which are printed as they appear).
        The run's status is read with ``flwr ls`` (each call is a new process, so not too often): as soon
        as the result file appears or the ServerApp's process has exited, else every ``status_every`` s.
        Raises :class:`DeploymentError` if the run fails, times out or writes no result.
        """
        if not self.roots:
            raise DeploymentError("the deployment is not started: use it as a context manager or call start()")
        app_dir = Path(app_dir).resolve()
        if not (app_dir / "pyproject.toml").exists():
            raise ValueError(f"app_dir must be a Flower app folder with a pyproject.toml, got {app_dir}")
        self._runs += 1
        result_dir = self.workdir / f"run-{self._runs}"
        result_dir.mkdir()
        config = {**dict(run_config or {}), "result-dir": str(result_dir)}
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())
        before = set(self.seen)
        t0 = time.perf_counter()
        res = self.flwr("run", str(app_dir), CONNECTION, "--run-config", overrides, "--format", "json")
        try:
            run_id = int(json.loads(_ANSI.sub("", res.stdout))["run-id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DeploymentError(f"`flwr run` did not start a run (exit {res.returncode}):\n"
                                  f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}") from None
        self.say(f"run {run_id} submitted: {app_dir.name} with {len(config) - 1} run-config override(s)")
        progress, printed = result_dir / PROGRESS_FILE, 0
        status, info, next_status, finishing = "", {}, time.monotonic() + status_every, False
        while True:
            if progress.exists():
                lines = progress.read_text().splitlines()
                for line in lines[printed:]:
                    self.say(line)
                printed = len(lines)
            now = time.monotonic()
            if not finishing and ((result_dir / RESULT_FILE).exists() or self._serverapp_exited(before)):
                finishing, next_status = True, now
            if now >= next_status:
                info = self._run_info(run_id)
                status = str(info.get("status", ""))
                if status.startswith("finished"):
                    break
                next_status = time.monotonic() + (1.0 if finishing else status_every)
            self._check_alive(f"while run {run_id} was running")
            if time.perf_counter() - t0 > timeout:
                self.flwr("stop", str(run_id), CONNECTION)
                raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s (status {status or '?'}); "
                                      f"stopped it. ServerApp log:\n{self.run_log(run_id)}")
            time.sleep(poll)
        seconds = time.perf_counter() - t0
        if progress.exists():
            for line in progress.read_text().splitlines()[printed:]:
                self.say(line)
        if status != "finished:completed":
            raise DeploymentError(f"run {run_id} ended with status {status!r} "
                                  f"({info.get('status-details', '')}). ServerApp log:\n{self.run_log(run_id)}")
        try:
            result = json.loads((result_dir / RESULT_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DeploymentError(f"run {run_id} completed but wrote no readable {RESULT_FILE} in {result_dir}: {exc}. "
                                  f"ServerApp log:\n{self.run_log(run_id)}") from None
        files = {p.name: p.read_bytes() for p in sorted(result_dir.iterdir()) if p.is_file()}
        self.say(f"run {run_id} {status} after {seconds:.0f} s")
        return RunOutcome(run_id, status, result, files, seconds, info)

    def _serverapp_exited(self, before: set[tuple[int, float]]) -> bool:
        """True once a ServerApp process started after ``before`` was recorded and none of them runs."""
        with self._lock:
            new = [key for key, name in self.seen.items() if key not in before and name.startswith("flwr-serverapp")]
        alive = {(p.pid, p.create_time()) for p in self.alive()}
        return bool(new) and not any(key in alive for key in new)

    def _run_info(self, run_id: int) -> dict:
        runs = self._json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        return runs[0] if runs else {}

    def run_log(self, run_id: int, lines: int = 40) -> str:
        """The last ``lines`` lines of the run's logs as the SuperLink stored them."""
        try:
            res = self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60)
        except subprocess.TimeoutExpired:
            return "(flwr log timed out)"
        return "\n".join((res.stdout + res.stderr).splitlines()[-lines:])

    # ---- faults --------------------------------------------------------------------------------
    def kill_node(self, index: int, *, mid_round: bool = False, timeout: float = 120.0) -> int:
        """Fault injection: ``SIGKILL`` SuperNode ``index`` by its PID, then its children (SuperExec, ClientApp)
        by theirs, as a crashed machine would stop (no goodbye to the SuperLink, no half-finished reply). With
        ``mid_round``, first wait (up to ``timeout`` s) until the node is running a ClientApp, i.e. until it has
        pulled a message and is working on it. Returns the PID.

        The deployment treats that node's exit as intended from then on; any child still alive is recorded and
        stopped by :meth:`stop`. A ``TimeoutError`` if the node never ran a ClientApp."""
        roles = dict(self.roots)
        role = f"supernode-{index}"
        if role not in roles:
            raise ValueError(f"no SuperNode {index}: this deployment has {self.num_nodes} (0..{self.num_nodes - 1})")
        proc = roles[role]
        deadline = time.monotonic() + timeout
        while mid_round and not any(_is_clientapp(c) for c in _descendants(proc.pid)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperNode {index} ran no ClientApp within {timeout:.0f} s")
            time.sleep(0.05)
        self._record_tree()                                      # its children, so that stop() finds them
        children = _descendants(proc.pid)
        self.killed[role] = proc.pid
        proc.kill()                                              # the node first: it can no longer relay a reply
        for child in children:                                   # then its SuperExec and ClientApp, as a crash would
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=10)
        self.say(f"killed SuperNode {index} (pid {proc.pid}){' while it trained' if mid_round else ''}")
        return proc.pid

    # ---- clean-up ------------------------------------------------------------------------------
    def alive(self) -> list[psutil.Process]:
        """The processes of this deployment (recorded by PID and start time) that are still running."""
        found = []
        with self._lock:
            keys = list(self.seen)
        for pid, created in keys:
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self, grace: float = 10.0) -> int:
        """Stop every process this deployment started, children included; return how many were running."""
        self._record_tree()
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._record_tree()
        procs = self.alive()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, still = psutil.wait_procs(procs, timeout=grace)
        for p in still:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(still, timeout=5)
        for _, proc in self.roots:          # reap our direct children
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        left = self.alive()
        if left:
            raise DeploymentError("could not stop: " + ", ".join(f"{p.pid} ({p.name()})" for p in left))
        if self.roots:
            self.say(f"stopped {len(procs)} process(es) (SuperLink, {len(self.roots) - 1} SuperNode(s) and their "
                     f"children); none left")
        return len(procs)

    def __enter__(self) -> "LoopbackDeployment":
        try:
            return self.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)


def node_data_for(run_config: Mapping[str, object], directory: str | Path) -> list[Path]:
    """Write every node's own data file for a run with ``run_config`` (overrides of the app's defaults, as
    passed to :meth:`LoopbackDeployment.run`) into ``directory``; returns the paths, for ``node_data``."""
    settings = AppSettings.from_run_config({**default_run_config(), **dict(run_config)})
    return write_node_data(directory, settings)


def main(argv: list[str] | None = None) -> int:
    """``python -m helpers.flower.launch``: the book's app on a loopback deployment (``make flower``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m helpers.flower.launch")
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--samples", type=int, default=2000, help="training images per node (default 2000)")
    parser.add_argument("--partition", default="iid", choices=("iid", "dirichlet", "shards"),
                        help="how the nodes' data is split (default iid)")
    parser.add_argument("--uplink", default="q8", help="uplink codec: float32, float16 or qB, e.g. q8 (default)")
    parser.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the run (default 900)")
    parser.add_argument("--app", default=str(APP_DIR), help="Flower app folder (default: the book's app)")
    args = parser.parse_args(argv)
    # `kill <pid>` of the launcher must clean up as Ctrl-C does: turn SIGTERM into an exception.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    config = {"num-server-rounds": args.rounds, "num-nodes": args.nodes, "samples-per-node": args.samples,
              "partition": args.partition, "uplink": args.uplink}
    try:
        with tempfile.TemporaryDirectory(prefix="flbook-node-data-") as data_dir:
            paths = node_data_for(config, data_dir)      # each SuperNode gets a file with its own rows only
            with LoopbackDeployment(args.nodes, superlink_port=args.port, node_data=paths) as dep:
                outcome = dep.run(args.app, config, timeout=args.timeout)
    except (DeploymentError, ValueError) as exc:
        print(f"[flower] error: {exc}", file=sys.stderr)
        return 1
    rows = outcome.result.get("rounds", [])
    fed = outcome.result.get("federated_eval", {})
    for r in rows:
        nodes = fed.get(str(r["round"]))
        on_nodes = f", on the nodes' own test splits {nodes['eval-acc']:.4f}" if nodes else ""
        print(f"round {r['round']}: test accuracy {r['test_acc']:.4f}{on_nodes}, uplink {r['bytes_up']:,} bytes "
              f"({r['bytes_up'] // max(1, r['clients']):,} per client), downlink {r['bytes_down']:,} bytes")
    if rows:
        print(f"final test accuracy {rows[-1]['test_acc']:.4f} after {len(rows)} rounds on {args.nodes} SuperNodes "
              f"({outcome.seconds:.0f} s end to end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
