"""The embedded Prefect server, as `ensure_prefect_server` starts it."""

import httpx

from connectors.prefect_server import RECORDER_BATCHING


def test_the_server_records_task_runs_in_batches(local_services):
    """One database transaction per task-run event was most of the server's CPU per request
    (issue 10's profile); the server the session started runs with the batching settings."""
    settings = httpx.get(f"{local_services}/admin/settings", timeout=10).raise_for_status().json()
    recorder = settings["server"]["services"]["task_run_recorder"]
    assert str(recorder["batch_size"]) == RECORDER_BATCHING["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"]
    assert recorder["batch_size"] > 1
    assert float(recorder["flush_interval"]) == float(
        RECORDER_BATCHING["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"]
    )
