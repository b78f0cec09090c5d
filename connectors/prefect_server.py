"""The local Prefect server on the embedded PostgreSQL, started on demand and stopped by command.

Prefect's own temporary server and its SQLite server stall on small machines (the temporary one
adds 10-15 s to a process's first flow; SQLite answers 503 `database is locked` under task load:
docs/architecture.md), so the embedded default is `prefect server start` on the
PostgreSQL of `connectors.postgres`. Both outlive the process that starts them: the pid file
in the state folder lets any later command reuse or stop them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from filelock import FileLock

from connectors import postgres
from connectors.processes import created, healthy, port_in_use, tail, terminate
from homeskillet.errors import ServiceError

PIDFILE = "prefect-server.json"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of deployment runs (prefect.yaml's job variables)
ZOMBIE_AUTOMATION = {  # Prefect's recipe for "zombie" flow runs: no heartbeat for 3 beats → Crashed
    "name": "homeskillet: crash flow runs whose heartbeats stopped",
    "description": "A flow run whose process died (killed worker, lost machine) stops sending heartbeats; "
    "mark it Crashed so that it is not left Running. Its ledger leases end by the holder check.",
    "enabled": True,
    "trigger": {
        "type": "event",
        "posture": "Proactive",
        "after": ["prefect.flow-run.heartbeat"],
        "expect": [
            "prefect.flow-run.heartbeat",
            "prefect.flow-run.Completed",
            "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled",
            "prefect.flow-run.Crashed",
        ],
        "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
        "for_each": ["prefect.resource.id"],
        "threshold": 1,
        "within": 3 * HEARTBEAT_S,
    },
    "actions": [
        {
            "type": "change-flow-run-state",
            "state": "CRASHED",
            "message": f"No heartbeat for {3 * HEARTBEAT_S}s: the flow run's process is gone.",
        }
    ],
}


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


# The server records each task run from its state events. One event per database transaction is
# Prefect's default; batching them costs the UI up to a second of delay and saves the server CPU
# that the model servers on the same cores need (py-spy: the recorder was the server's largest CPU share per request).
RECORDER_BATCHING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1.0",
}


def ensure_prefect_server(home: Path, port: int, timeout_s: float = 120.0) -> str:
    """Return the API URL of a healthy local Prefect server, starting one if none runs."""
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / "prefect-server.lock"):
        info = running_server(home)
        if info is not None and healthy(f"{info.api_url}/health"):
            return info.api_url
        if info is not None:  # alive but unhealthy: replace it
            terminate(info.pid, group=True)
        if port_in_use(port):  # another state folder's server would answer our health checks
            raise ServiceError(
                f"port {port} is taken by another process (another HOMESKILLET_HOME's Prefect server?): "
                "give this state folder its own with HOMESKILLET_PREFECT_PORT"
            )
        sock = postgres.ensure_postgres(home / "pgdata")
        log_path = home / "prefect-server.log"
        env = {
            **os.environ,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres:@/prefect?host={sock}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(port),
            **RECORDER_BATCHING,
        }
        env.pop("PREFECT_API_URL", None)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # outlives this command; stopped by stop_prefect_server
            )
        info = ServerInfo(pid=proc.pid, port=port)
        (home / PIDFILE).write_text(json.dumps({"pid": proc.pid, "port": port, "created": created(proc.pid)}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(
                    f"Prefect server exited with code {proc.returncode} at start-up (port {port} in use?); "
                    f"last log lines:\n{tail(log_path)}"
                )
            if healthy(f"{info.api_url}/health"):
                ensure_automations(info.api_url)
                return info.api_url
            time.sleep(0.5)
        terminate(proc.pid, group=True)
        raise ServiceError(f"Prefect server not healthy after {timeout_s:.0f}s; last log lines:\n{tail(log_path)}")


def ensure_automations(api_url: str) -> None:
    """Create the server-side automations Homeskillet relies on, unless they exist (by name)."""
    with httpx.Client(base_url=api_url, timeout=30) as api:
        existing = api.post("/automations/filter", json={}).raise_for_status().json()
        if not any(a["name"] == ZOMBIE_AUTOMATION["name"] for a in existing):
            api.post("/automations/", json=ZOMBIE_AUTOMATION).raise_for_status()


def running_server(home: Path) -> ServerInfo | None:
    """The server this state folder started, if its process still lives."""
    try:
        data = json.loads((home / PIDFILE).read_text())
    except (OSError, ValueError):
        return None
    if created(data["pid"]) != data.get("created"):
        return None  # gone, or the pid was reused by another process
    return ServerInfo(pid=data["pid"], port=data["port"])


def stop_prefect_server(home: Path) -> bool:
    """Stop the Prefect server, then PostgreSQL. True when a Prefect server was stopped."""
    with FileLock(home / "prefect-server.lock"):
        info = running_server(home)
        if info is not None:
            terminate(info.pid, group=True)
        (home / PIDFILE).unlink(missing_ok=True)
        postgres.stop_postgres(home / "pgdata")
    return info is not None
