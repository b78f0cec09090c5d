"""Local llama.cpp model servers on loopback: started on first use, reused while warm, stopped when
idle and when this process exits.

Each server is `connectors.model_server_main` (llama-cpp-python's OpenAI-compatible app) in its
own process, serving one GGUF from a PyPI package. It watches its parent and exits with it, so a
crashed parent leaves no server behind.
"""

from __future__ import annotations

import atexit
import fnmatch
import importlib
import importlib.resources
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from homeskillet.errors import ServiceError
from homeskillet.schemas import LlamaCppServing, ModelSpec


def gguf_path(serving: LlamaCppServing, cache_dir: Path) -> Path:
    """Where the model's GGUF lies: inside its package, or assembled from its parts into cache_dir."""
    try:
        module = importlib.import_module(serving.package)
    except ImportError:
        raise ServiceError(f"model package {serving.package!r} is not installed") from None
    if serving.assemble:
        name = getattr(module, "MODEL_NAME", f"{serving.package}.gguf")
        return Path(module.assemble(cache_dir / name))
    root = importlib.resources.files(serving.package)
    matches = sorted(p for p in root.iterdir() if fnmatch.fnmatch(p.name, serving.file or "*.gguf"))
    if not matches:
        raise ServiceError(f"package {serving.package!r} holds no file matching {serving.file!r}")
    return Path(str(matches[0]))


@dataclass
class _Server:
    model: str
    port: int
    proc: subprocess.Popen
    last_used: float = field(default_factory=time.monotonic)
    users: set[str] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class ModelServers:
    """The process's model servers, one per model; thread-safe."""

    def __init__(self, cache_dir: Path, log_dir: Path, idle_s: float, threads: int | None = None):
        self._cache_dir = cache_dir
        self._log_dir = log_dir
        self._idle_s = idle_s
        self._threads = threads
        self._servers: dict[str, _Server] = {}
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._reaper: threading.Thread | None = None
        atexit.register(self.stop_all)

    def acquire(self, spec: ModelSpec, user: str, start_timeout_s: float = 120.0) -> str:
        """The endpoint of a warm server for this model, started if needed; pair with done(user)."""
        assert isinstance(spec.serving, LlamaCppServing)
        with self._lock:
            model_lock = self._model_locks.setdefault(spec.name, threading.Lock())
        with model_lock:
            with self._lock:
                server = self._servers.get(spec.name)
                if server is not None and server.proc.poll() is None:
                    server.users.add(user)
                    return server.endpoint
            server = self._start(spec, start_timeout_s)
            with self._lock:
                server.users.add(user)
                self._servers[spec.name] = server
                self._ensure_reaper()
            return server.endpoint

    def done(self, user: str) -> None:
        """The user (an allocation) no longer needs its server; idempotent."""
        with self._lock:
            for server in self._servers.values():
                if user in server.users:
                    server.users.discard(user)
                    server.last_used = time.monotonic()

    def running(self) -> dict[str, str]:
        with self._lock:
            return {m: s.endpoint for m, s in self._servers.items() if s.proc.poll() is None}

    def stop(self, model: str) -> None:
        with self._lock:
            server = self._servers.pop(model, None)
        if server is not None:
            _stop(server.proc)

    def stop_all(self) -> None:
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            _stop(server.proc)

    def _start(self, spec: ModelSpec, timeout_s: float) -> _Server:
        path = gguf_path(spec.serving, self._cache_dir)
        port = _free_port()
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"model-{spec.name}.log"
        cmd = [
            sys.executable, "-m", "connectors.model_server_main",
            "--model", str(path), "--alias", spec.name, "--port", str(port),
            "--n-ctx", str(spec.context_length), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self._threads:
            cmd += ["--threads", str(self._threads)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = _Server(spec.name, port, proc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(f"model server for {spec.name} exited with code {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"{server.endpoint}/models", timeout=1.0).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        _stop(proc)
        raise ServiceError(f"model server for {spec.name} did not answer within {timeout_s:g}s; see {log_path}")

    def _ensure_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._reap, name="model-server-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        while True:
            time.sleep(min(5.0, self._idle_s / 2))
            now = time.monotonic()
            with self._lock:
                idle = [
                    m for m, s in self._servers.items()
                    if not s.users and now - s.last_used > self._idle_s
                ]  # fmt: skip
                stopping = [self._servers.pop(m) for m in idle]
            for server in stopping:
                _stop(server.proc)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
