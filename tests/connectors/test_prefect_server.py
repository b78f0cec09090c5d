"""The embedded Prefect server, as `ensure_prefect_server` starts it."""

from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from connectors.prefect_server import RECORDER_BATCHING, ensure_prefect_server
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
