"""Helpers for the long-lived local services (`connectors.processes`): whether a port is taken,
a log's tail, and stopping a process, by SIGTERM or, when it ignores that, by SIGKILL."""

import socket
import subprocess
import sys
import time

import psutil

from connectors.processes import port_in_use, tail, terminate

SLEEPER = "import signal, time; {ignore}print('ready', flush=True); time.sleep(60)"


def start(ignore_sigterm: bool) -> subprocess.Popen:
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if ignore_sigterm else ""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER.format(ignore=ignore)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_port_is_in_use_while_something_listens_on_it():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(port)


def test_a_logs_tail_is_its_last_lines(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    assert tail(log, 3) == "line 27\nline 28\nline 29"
    assert tail(tmp_path / "missing.log") == "(no log)"


def test_terminate_stops_a_child_and_reaps_it():
    proc = start(ignore_sigterm=False)
    terminate(proc.pid, grace_s=10)
    assert not psutil.pid_exists(proc.pid)  # gone, and no zombie left


def test_terminate_kills_a_process_that_ignores_sigterm_after_the_grace_period():
    proc = start(ignore_sigterm=True)
    started = time.monotonic()
    terminate(proc.pid, grace_s=0.5)
    assert time.monotonic() - started >= 0.5
    assert not psutil.pid_exists(proc.pid)  # killed and reaped by the time terminate returns
