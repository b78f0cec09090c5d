"""Helpers for the long-lived local services (Prefect server, model servers): process identity,
health, ports, logs and stopping."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil


def created(pid: int) -> float | None:
    """The start time of a live process (not a zombie), which tells it from a later one with its pid."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def healthy(url: str) -> bool:
    """Whether GET url answers 200 within 2 s."""
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (a bind there fails; connections of a server
    that stopped, still in TIME_WAIT, do not count, as they do not for the next server's bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_in_thread(app, name: str, timeout_s: float = 30.0, log_level: str = "warning") -> Iterator[str]:
    """An ASGI app on a free loopback port, served by uvicorn in a daemon thread of this process;
    yields its base URL (http://127.0.0.1:PORT) and stops it on the way out."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the {name} did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def terminate(pid: int, grace_s: float = 15.0, group: bool = False) -> None:
    """SIGTERM the process (or its whole process group), then SIGKILL after the grace period.
    Reaps it when it is our own child, so it leaves no zombie."""
    try:
        target = os.getpgid(pid) if group else pid
        kill = os.killpg if group else os.kill
        kill(target, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _gone(pid, target, kill, group, time.monotonic() + grace_s):
        return
    try:
        kill(target, signal.SIGKILL)
    except ProcessLookupError:
        return
    _gone(pid, target, kill, group, time.monotonic() + KILL_WAIT_S)  # SIGKILL lands within moments


KILL_WAIT_S = 5.0


def _gone(pid: int, target: int, kill, group: bool, deadline: float) -> bool:
    """Whether the process (or its group) is gone by the deadline, reaping our own child."""
    while True:
        _reap(pid)
        try:
            kill(target, 0)
        except ProcessLookupError:
            return True
        if not group and created(pid) is None:  # a zombie: reaped if it is our child (it may have
            _reap(pid)  # exited just after the reap above), else its parent's to reap
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
