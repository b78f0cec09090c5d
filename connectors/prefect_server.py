"""The local Prefect server on the embedded PostgreSQL, started on demand and stopped by command.

Prefect's own temporary server and its SQLite server stall on small machines (the temporary one
adds 10-15 s to a process's first flow; SQLite answers 503 `database is locked` under task load:
docs/architecture.md), so the embedded default is `prefect server start` on the
PostgreSQL of `connectors.postgres`. Both outlive the process that starts them: the pid file
in the state folder lets any later command reuse or stop them.

The API has no users of its own, and whoever reaches it reads every Secret block (each tenant's
hosted·ai key) and runs commands through deployments' job variables. So it listens on 127.0.0.1,
and a server on any other address is refused unless it has an auth string (Prefect's basic auth:
`PREFECT_SERVER_API_AUTH_STRING` on the server, `PREFECT_API_AUTH_STRING` on its clients). No
origin is allowed by wildcard: cross-origin calls come from the UI's own origins only, so a web
page on another origin cannot drive the API from a browser on this machine.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
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


LOOPBACK_HOST = "127.0.0.1"
AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # the server's; its clients send PREFECT_API_AUTH_STRING


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    port: int
    host: str = LOOPBACK_HOST

    @property
    def api_url(self) -> str:
        reach = LOOPBACK_HOST if self.host in ("0.0.0.0", "::") else self.host  # noqa: S104 (a wildcard: reached on loopback)
        return f"http://{reach}:{self.port}/api"


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def cors_origins(host: str, port: int) -> str:
    """The origins the UI is served from (the server itself): the only ones allowed cross-origin."""
    hosts = [LOOPBACK_HOST, "localhost"]
    if host not in (*hosts, "0.0.0.0", "::"):  # noqa: S104
        hosts.append(host)
    return ",".join(f"http://{h}:{port}" for h in hosts)


def basic_auth(auth_string: str) -> dict[str, str]:
    """The header a Prefect client sends for an auth string (HTTP basic: base64 of the string)."""
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}


def _fingerprint(auth_string: str | None) -> str | None:
    """Tells the auth string a server was started with apart from another, without holding it."""
    return hashlib.sha256(auth_string.encode()).hexdigest()[:16] if auth_string else None


# The server records each task run from its state events. One event per database transaction is
# Prefect's default; batching them costs the UI up to a second of delay and saves the server CPU
# that the model servers on the same cores need (py-spy: the recorder was the server's largest CPU share per request).
RECORDER_BATCHING = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1.0",
}


def ensure_prefect_server(
    home: Path,
    port: int,
    timeout_s: float = 120.0,
    *,
    host: str = LOOPBACK_HOST,
    auth_string: str | None = None,
) -> str:
    """Return the API URL of a healthy local Prefect server, starting one if none runs.

    auth_string: the API's basic-auth string (default: PREFECT_SERVER_API_AUTH_STRING, if set).
    A host other than loopback without one is refused: the API would be open to the network."""
    auth = auth_string if auth_string is not None else os.environ.get(AUTH_ENV) or None
    if not is_loopback(host) and not auth:
        raise ServiceError(
            f"the Prefect server would listen on {host}, beyond this machine, without an auth string: "
            f"set {AUTH_ENV} (and PREFECT_API_AUTH_STRING, the same, on its clients), or listen on {LOOPBACK_HOST}"
        )
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / "prefect-server.lock"):
        info = running_server(home)
        same = info is not None and (info.host, _recorded_auth(home)) == (host, _fingerprint(auth))
        if info is not None and same and healthy(f"{info.api_url}/health"):
            return info.api_url
        if info is not None:  # alive but unhealthy, or started on another address or auth string: replace it
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
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": cors_origins(host, port),
            **RECORDER_BATCHING,
        }
        env.pop("PREFECT_API_URL", None)
        env.pop(AUTH_ENV, None)
        if auth:
            env[AUTH_ENV] = auth
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # outlives this command; stopped by stop_prefect_server
            )
        info = ServerInfo(pid=proc.pid, port=port, host=host)
        record = {"pid": proc.pid, "port": port, "host": host, "auth": _fingerprint(auth), "created": created(proc.pid)}
        (home / PIDFILE).write_text(json.dumps(record))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(
                    f"Prefect server exited with code {proc.returncode} at start-up (port {port} in use?); "
                    f"last log lines:\n{tail(log_path)}"
                )
            if healthy(f"{info.api_url}/health"):
                ensure_automations(info.api_url, auth)
                return info.api_url
            time.sleep(0.5)
        terminate(proc.pid, group=True)
        raise ServiceError(f"Prefect server not healthy after {timeout_s:.0f}s; last log lines:\n{tail(log_path)}")


def ensure_automations(api_url: str, auth_string: str | None = None) -> None:
    """Create the server-side automations Homeskillet relies on, unless they exist (by name)."""
    headers = basic_auth(auth_string) if auth_string else {}
    with httpx.Client(base_url=api_url, timeout=30, headers=headers) as api:
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
    return ServerInfo(pid=data["pid"], port=data["port"], host=data.get("host", LOOPBACK_HOST))


def _recorded_auth(home: Path) -> str | None:
    try:
        return json.loads((home / PIDFILE).read_text()).get("auth")
    except (OSError, ValueError):
        return None


def stop_prefect_server(home: Path) -> bool:
    """Stop the Prefect server, then PostgreSQL. True when a Prefect server was stopped."""
    with FileLock(home / "prefect-server.lock"):
        info = running_server(home)
        if info is not None:
            terminate(info.pid, group=True)
        (home / PIDFILE).unlink(missing_ok=True)
        postgres.stop_postgres(home / "pgdata")
    return info is not None
