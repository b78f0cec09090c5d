"""The embedded Prefect server, as `ensure_prefect_server` starts it."""

import re
import secrets
import shutil
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest

from connectors.prefect_server import (
    AUTH_ENV,
    RECORDER_BATCHING,
    ZOMBIE_AUTOMATION,
    basic_auth,
    cors_origins,
    ensure_prefect_server,
    is_loopback,
    stop_prefect_server,
)
from connectors.processes import free_port
from homeskillet.errors import ServiceError


def test_the_server_records_task_runs_in_batches(local_services):
    """One database transaction per task-run event was most of the server's CPU per request
    (seen in py-spy profiles); the server the session started runs with the batching settings."""
    settings = httpx.get(f"{local_services}/admin/settings", timeout=10).raise_for_status().json()
    recorder = settings["server"]["services"]["task_run_recorder"]
    assert str(recorder["batch_size"]) == RECORDER_BATCHING["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"]
    assert recorder["batch_size"] > 1
    assert float(recorder["flush_interval"]) == float(
        RECORDER_BATCHING["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"]
    )


def test_a_port_another_server_holds_is_refused_not_shared(tmp_path, serve_http):
    """A second state folder on the first one's port must not take that server, whose health
    check answers, for its own: it says so, and starts nothing."""

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    _, port = serve_http(Healthy)
    with pytest.raises(ServiceError, match=rf"port {port} is taken .*HOMESKILLET_PREFECT_PORT"):
        ensure_prefect_server(tmp_path / "home", port)
    assert not (tmp_path / "home" / "pgdata").exists()  # nothing was started


def test_a_server_beyond_loopback_without_an_auth_string_is_refused(tmp_path, monkeypatch):
    """Whoever reaches the API reads every Secret block: it may leave loopback only behind an auth
    string. Refused before anything starts."""
    monkeypatch.delenv(AUTH_ENV, raising=False)
    for host in ("0.0.0.0", "192.0.2.10", "prefect.example"):
        with pytest.raises(ServiceError, match=rf"listen on {re.escape(host)}, beyond this machine, without an auth"):
            ensure_prefect_server(tmp_path / "home", free_port(), host=host)
    assert not (tmp_path / "home" / "pgdata").exists()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert "*" not in cors_origins("127.0.0.1", 4200).split(",")


@pytest.mark.services  # starts a PostgreSQL and a Prefect server of its own (~20 s)
def test_an_auth_string_closes_the_api_and_no_foreign_origin_is_allowed():
    """A server started with an auth string answers 401 to a call without it (or with a wrong one)
    and serves the call that sends it; only its health check stays open (for probes). A browser
    preflight from another origin is not allowed; the UI's own origin is."""
    home = Path(tempfile.mkdtemp(prefix="hs-auth-"))  # short: PostgreSQL's socket path has a length limit
    port = free_port()
    auth = "homeskillet:" + secrets.token_urlsafe(24)
    try:
        api = ensure_prefect_server(home, port, auth_string=auth)
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200
        assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
        wrong = basic_auth("homeskillet:not-the-string")
        assert httpx.post(f"{api}/flows/filter", json={}, headers=wrong, timeout=10).status_code == 401
        assert httpx.post(f"{api}/flows/filter", json={}, headers=basic_auth(auth), timeout=10).status_code == 200
        automations = httpx.post(f"{api}/automations/filter", json={}, headers=basic_auth(auth), timeout=10).json()
        assert ZOMBIE_AUTOMATION["name"] in [a["name"] for a in automations]  # set up through the auth string

        def preflight(origin: str) -> httpx.Response:
            headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
            return httpx.options(f"{api}/flows/filter", headers=headers, timeout=10)

        evil = preflight("http://evil.example")
        assert evil.headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
        ui = f"http://127.0.0.1:{port}"
        assert preflight(ui).headers.get("access-control-allow-origin") == ui
        assert auth not in (home / "prefect-server.json").read_text()  # the pid file holds a fingerprint only
    finally:
        stop_prefect_server(home)
        shutil.rmtree(home, ignore_errors=True)
