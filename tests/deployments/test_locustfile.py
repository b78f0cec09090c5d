"""Locust (headless, bounded) against a real MCP and API server on loopback: both MCP transports,
and the OpenAI-compatible API streamed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from connectors.processes import serve_in_thread
from connectors.tokens import TokenStore
from homeskillet.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


@pytest.fixture
def mcp_server(test_catalog):
    from apps.mcp_server import create_app

    with serve_in_thread(create_app(test_catalog), "MCP server") as url:
        yield url


def locust(env: dict) -> tuple[dict, str]:
    """A short headless Locust run: (its statistics by request name, its stderr)."""
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("locust")),
            "-f",
            "deployments/locustfile.py",
            "--headless",
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "12s",
            "--stop-timeout",
            "30",
            "--json",
            "--only-summary",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {s["name"]: s for s in json.loads(done.stdout)}, done.stderr


async def test_locust_loads_both_mcp_transports_without_a_failure(mcp_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0.2")
    store = await TokenStore.open(get_settings().pgdata)
    made = [(tenant, *(await store.create(tenant))) for tenant in ("acme", "globex")]
    env = os.environ | {
        "HOMESKILLET_LOAD_TOKENS": ",".join(f"{tenant}:{token}" for tenant, _, token in made),
        "HOMESKILLET_LOAD_MCP": mcp_server,
        "HOMESKILLET_LOAD_CONSTRAINTS": json.dumps({"allowed_models": ["echo"], "pool": "roomy", "max_tokens": 8}),
    }
    env.pop("HOMESKILLET_LOAD_PREFECT", None)
    env.pop("HOMESKILLET_LOAD_API", None)
    try:
        stats, stderr = locust(env)
    finally:
        for _, token_id, _ in made:
            await store.revoke(token_id)
    for name in ("mcp-http fuse", "mcp-ws fuse"):
        assert stats[name]["num_requests"] > 0, stats.keys()
        assert stats[name]["num_failures"] == 0, stderr[-3000:]
    assert "api-stream chat" not in stats  # no API named: its user does not run


async def test_locust_streams_the_api_to_done_and_reports_the_time_to_first_token(mcp_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0.2")
    store = await TokenStore.open(get_settings().pgdata)
    made = [(tenant, *(await store.create(tenant))) for tenant in ("acme", "globex")]
    env = os.environ | {
        "HOMESKILLET_LOAD_TOKENS": ",".join(f"{tenant}:{token}" for tenant, _, token in made),
        "HOMESKILLET_LOAD_API": mcp_server,  # the same server serves /v1
        "HOMESKILLET_LOAD_MODEL": "echo",
        "HOMESKILLET_LOAD_CONSTRAINTS": json.dumps({"max_tokens": 8}),
    }
    for name in ("HOMESKILLET_LOAD_PREFECT", "HOMESKILLET_LOAD_MCP"):
        env.pop(name, None)
    try:
        stats, stderr = locust(env)
    finally:
        for _, token_id, _ in made:
            await store.revoke(token_id)
    chat, first = stats["api-stream chat"], stats["api-stream first token"]
    assert chat["num_requests"] > 0 and chat["num_failures"] == 0, stderr[-3000:]
    assert first["num_requests"] == chat["num_requests"]  # every answer streamed text before [DONE]
    assert "mcp-http fuse" not in stats and "mcp-ws fuse" not in stats
