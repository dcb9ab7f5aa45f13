"""Starts and stops rollout engines (SGLang or our CPU server) as subprocesses.

Usage::

    with EngineLauncher(cfg.rollout) as launcher:
        urls = launcher.start_all()                      # waits until every /health answers
        client = RolloutClient.from_config(cfg.rollout, urls, on_engine_failure=launcher.restart_if_dead)

Each engine gets its own port (``base_port + i``), log file and process
session; it is stopped through its own PID (SIGTERM to the session it leads,
SIGKILL after a grace period), never by name. SGLang engine ``i`` uses GPUs
``i*tp .. i*tp+tp-1`` of its node (``--base-gpu-id``) unless the options say otherwise.

An engine dies with the process that launched it: it is started with
``PR_SET_PDEATHSIG`` = SIGKILL (Linux), so a trainer killed by SIGTERM (torchrun,
scancel, Ctrl-C) or SIGKILL leaves no engine behind holding its port. An engine
is used only if the launcher started it and it serves ``model_path``: the port
must be free before the start (else one line names the port), and once healthy
the engine must report our process's pid (when it reports one), our
``model_path`` and, when it reports one, the fingerprint of that checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Sequence

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.rollout.config import RolloutConfig
from megatron_sdpg.rollout.fingerprint import checkpoint_fingerprint

_PR_SET_PDEATHSIG = 1
try:  # loaded before any fork: the child only calls the function
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGKILL this child when the thread that forked it exits (see ``_spawn``)."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_spawn_jobs: "queue.Queue[tuple[Callable[[], Any], queue.Queue]]" = queue.Queue()
_spawn_thread: threading.Thread | None = None
_spawn_lock = threading.Lock()


def _spawn(start: Callable[[], subprocess.Popen]) -> subprocess.Popen:
    """Runs ``start`` on one thread that lasts as long as the process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, so an
    engine (re)started from a short-lived thread (the client's failure hook runs in a
    worker thread) would die with that thread. Forking on a daemon thread that lives
    until the process exits ties the engine to the process.
    """
    global _spawn_thread
    with _spawn_lock:
        if _spawn_thread is None:
            def serve() -> None:
                while True:
                    fn, box = _spawn_jobs.get()
                    try:
                        box.put((fn(), None))
                    except BaseException as e:  # noqa: BLE001 - handed back to the caller
                        box.put((None, e))

            _spawn_thread = threading.Thread(target=serve, name="engine-spawner", daemon=True)
            _spawn_thread.start()
    box: queue.Queue = queue.Queue()
    _spawn_jobs.put((start, box))
    proc, err = box.get()
    if err is not None:
        raise err
    return proc


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on (or holds) ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _get_json(url: str, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The JSON object at ``url``, or ``None`` if it does not answer one."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            out = json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def verify_engine(url: str, model_path: str, pid: int | None = None) -> None:
    """Checks that the engine at ``url`` is ours and serves ``model_path``.

    Args:
        url: The engine's base URL.
        model_path: The checkpoint it must serve.
        pid: The engine process's pid, checked when the engine reports one (our CPU server).

    Raises:
        ConfigError: (``rollout.model_path``) another process, another model or other weights.
    """
    info = _get_json(url + "/model_info")
    if info is None:
        raise ConfigError("rollout.model_path", f"the engine at {url} does not answer /model_info")
    served = str(info.get("model_path"))
    same = served == model_path or (os.path.exists(served) and os.path.exists(model_path)
                                    and os.path.samefile(served, model_path))
    if not same:
        raise ConfigError("rollout.model_path", f"the engine at {url} serves {served}, not {model_path}")
    if pid is not None:
        server = _get_json(url + "/server_info") or {}
        if server.get("pid") is not None and server["pid"] != pid:
            raise ConfigError("rollout.base_port", f"the engine at {url} is pid {server['pid']}, not the engine "
                                                   f"this run started (pid {pid})")
    try:
        want = checkpoint_fingerprint(model_path) if "weight_fingerprint" in info else None
    except FileNotFoundError:  # not a safetensors directory (e.g. a hub id for SGLang): nothing to compare
        want = None
    if want is not None and info["weight_fingerprint"] != want:
        raise ConfigError("rollout.model_path", f"the engine at {url} serves other weights than {model_path} "
                                                f"(fingerprint {info['weight_fingerprint']}, the checkpoint's {want})")


def _options(extra: dict[str, Any]) -> list[str]:
    """``{"mem_fraction_static": 0.8, "enable_x": True}`` -> ``--mem-fraction-static 0.8 --enable-x``."""
    out: list[str] = []
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def sglang_command(model_path: str, host: str, port: int, tp_size: int, extra: dict[str, Any], base_gpu_id: int = 0,
                   python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server`` with our settings and every extra option passed through."""
    extra = {"base_gpu_id": base_gpu_id, **extra}
    return [python, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host, "--port", str(port),
            "--tp-size", str(tp_size), *_options(extra)]


def engine_options(cfg: RolloutConfig) -> dict[str, Any]:
    """The SGLang options ``cfg`` implies (memory saver when colocated, deterministic
    inference when asked for), then ``cfg.sglang_args`` (which may override them)."""
    implied: dict[str, Any] = {}
    if cfg.colocate:
        implied["enable_memory_saver"] = True
    if cfg.deterministic:
        implied["enable_deterministic_inference"] = True
    return {**implied, **cfg.sglang_args}


def engine_flag_problems(server_info: dict[str, Any], cfg: RolloutConfig) -> list[tuple[str, str]]:
    """What a running SGLang engine lacks for ``cfg``, read from its ``/server_info`` (SGLang's
    resolved server arguments): ``[(config field, message), ...]``, empty when it has all.

    Engines given by URL were started by someone else; without these flags SGLang
    silently ignores sampling seeds, or cannot release its memory.
    """
    needed = [("deterministic", "enable_deterministic_inference", "SGLang ignores sampling_seed without it"),
              ("colocate", "enable_memory_saver", "it cannot release its memory for the training passes")]
    return [(field, f"the engine runs without --{flag.replace('_', '-')}: {why}")
            for field, flag, why in needed if getattr(cfg, field) and server_info.get(flag) is not True]


def cpu_server_command(model_path: str, host: str, port: int, extra: dict[str, Any], python: str = sys.executable) -> list[str]:
    """``python -m megatron_sdpg.rollout.server`` (the CPU server; not for production)."""
    return [python, "-m", "megatron_sdpg.rollout.server", "--hf-dir", model_path, "--host", host, "--port", str(port),
            *_options(extra)]


def router_command(worker_urls: Sequence[str], host: str, port: int, extra: dict[str, Any] | None = None,
                   python: str = sys.executable) -> list[str]:
    """``sglang-router`` in front of running engines (the client then talks to its one URL)."""
    return [python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls, "--host", host,
            "--port", str(port), *_options(extra or {})]


class EngineProcess:
    """One engine subprocess.

    Args:
        command: The argv to run.
        url: Base URL it serves once healthy.
        log_path: Its stdout and stderr go here (appended across restarts).
        env: Extra environment variables.
    """

    def __init__(self, command: list[str], url: str, log_path: str, env: dict[str, str] | None = None):
        self.command = command
        self.url = url
        self.log_path = log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Starts the process in its own session (so its children stop with it), dying with this process.

        Raises:
            ConfigError: (``rollout.base_port``) the port is taken, e.g. by a stale engine.
        """
        if self.alive():
            raise RuntimeError(f"{self.url}: already running as pid {self.pid}")
        where = urllib.parse.urlsplit(self.url)
        if where.port is not None and port_in_use(where.hostname or "127.0.0.1", where.port):
            raise ConfigError("rollout.base_port", f"port {where.port} of {self.url} is already in use (a stale "
                                                   "engine of an earlier run?); stop that process or choose another port")
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = _spawn(lambda: subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
            ))

    def wait_healthy(self, timeout_s: float) -> None:
        """Polls ``/health`` until it answers 200.

        Raises:
            RuntimeError: The process exited first (the log's tail is in the message).
            TimeoutError: Not healthy within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.url}: engine exited with code {code} before becoming healthy; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2.0) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url}: not healthy after {timeout_s:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to the session this process leads (itself and its children)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; reaps the process."""
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        # Children left in the session after the leader exits.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class EngineLauncher:
    """Launches ``cfg.num_engines`` engines of ``cfg.engine`` kind and keeps them up.

    Args:
        cfg: The rollout section (engine kind, model path, host, ports, TP, logs, extra options).
        python: Interpreter for the engines.
    """

    def __init__(self, cfg: RolloutConfig, python: str = sys.executable):
        if not cfg.model_path:
            raise ValueError("rollout.model_path: no model to launch engines with (set it or model.hf_dir)")
        self.cfg = cfg
        self.engines: list[EngineProcess] = []
        for i in range(cfg.num_engines):
            port = cfg.base_port + i
            if cfg.engine == "sglang":
                cmd = sglang_command(cfg.model_path, cfg.host, port, cfg.tp_size, engine_options(cfg), i * cfg.tp_size,
                                     python)
            else:
                extra = dict(cfg.sglang_args)
                if cfg.off_policy_steps:  # generation overlaps the training ranks: spinning threads would steal
                    extra.setdefault("omp_wait", "passive")  # their cores (docs/rollout.md, CPU server)
                cmd = cpu_server_command(cfg.model_path, cfg.host, port, extra, python)
            host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
            log = os.path.join(cfg.log_dir, f"engine{i}_port{port}.log")
            self.engines.append(EngineProcess(cmd, f"http://{host}:{port}", log))

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def start_all(self) -> list[str]:
        """Starts every engine, then waits until all are healthy; returns their URLs."""
        try:
            for e in self.engines:
                e.start()
            for e in self.engines:
                e.wait_healthy(self.cfg.startup_timeout_s)
                verify_engine(e.url, self.cfg.model_path, e.pid)
        except BaseException:
            self.stop_all()
            raise
        return self.urls

    def restart_if_dead(self, url: str) -> bool:
        """Restarts the engine serving ``url`` if its process has exited (the client's failure hook).

        Returns:
            Whether it restarted one (it then serves ``model_path`` again).
        """
        for e in self.engines:
            if e.url == url.rstrip("/") and not e.alive():
                e.stop(grace_s=1.0)
                e.start()
                e.wait_healthy(self.cfg.startup_timeout_s)
                verify_engine(e.url, self.cfg.model_path, e.pid)
                return True
        return False

    def stop_all(self) -> None:
        for e in self.engines:
            e.stop()

    def __enter__(self) -> "EngineLauncher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all()
