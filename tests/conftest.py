"""Test session: real PostgreSQL, a real Prefect server and real model servers, all on loopback
under a temporary state folder, started once and stopped at the end.

Prefect reads its settings at import, so the environment is set here, before any test module
imports prefect.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STATE = Path(tempfile.mkdtemp(prefix="hs-test-"))
PORT = _free_port()
os.environ.update(
    HOMESKILLET_HOME=str(STATE),
    HOMESKILLET_PREFECT_PORT=str(PORT),
    HOMESKILLET_CAPACITY_WAIT_S="10",
    PREFECT_API_URL=f"http://127.0.0.1:{PORT}/api",
    PREFECT_HOME=str(STATE / "prefect"),
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
)
os.environ.pop("HOMESKILLET_CATALOG", None)

from connectors.prefect_server import ensure_prefect_server, stop_prefect_server  # noqa: E402
from homeskillet.settings import PACKAGED_CATALOG  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def local_services():
    """PostgreSQL + Prefect server for the whole session; stopped and removed afterwards."""
    url = ensure_prefect_server(STATE, PORT)
    yield url
    from prefect.logging.handlers import APILogHandler

    from tasks import runtime

    APILogHandler().flush()  # deliver the run logs while the server still listens

    for path in {runtime.catalog_path(), runtime.catalog_path(PACKAGED_CATALOG)}:
        runtime.backend(path).servers.stop_all()
    stop_prefect_server(STATE)
    shutil.rmtree(STATE, ignore_errors=True)


class _EchoHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that echoes, and fails on prompts containing FAIL.

    A FAIL prompt with a tag like #abc3 fails once 3 prompts with that tag have arrived.
    A test double for a remote model: real HTTP on loopback, no model behind it.
    """

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "text": text})
        if "FAIL" in text:
            # fail only once the request's other fragments (same #tag) are in flight too
            tag = re.search(r"#\w+", text)
            deadline = time.monotonic() + 5
            while tag and time.monotonic() < deadline:
                if sum(tag.group() in s["text"] for s in self.server.seen) >= int(tag.group()[-1]):
                    break
                time.sleep(0.05)
            self._send(500, {"error": {"message": "model crashed"}})
            return
        time.sleep(float(os.environ.get("ECHO_DELAY_S", "1.0")))
        reply = f"echo: {text}"
        choice = {"index": 0, "finish_reason": "stop"}
        choice.update({"message": {"role": "assistant", "content": reply}} if "messages" in body else {"text": reply})
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(reply.split())}
        self._send(200, {"choices": [choice], "usage": usage})

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up (a cancelled request) is expected here


@pytest.fixture(scope="session")
def echo_server():
    server = _EchoServer(("127.0.0.1", 0), _EchoHandler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def test_catalog(echo_server, tmp_path_factory) -> str:
    """The packaged catalog's SmolLM2, an echo model behind a loopback endpoint, and small pools."""
    packaged = yaml.safe_load(PACKAGED_CATALOG.read_text())
    smollm2 = next(m for m in packaged["models"] if m["name"] == "smollm2-135m")
    echo = {
        "name": "echo",
        "family": "loopback echo endpoint",
        "parameters_m": 1,
        "context_length": 4096,
        "prompt_style": "chat",
        "tflops": 1.0,
        "vram_gb": 0.5,
        "tokens_per_second": 100,
        "task_types": {"chat": 0.1, "factual_qa": 0.1, "math": 0.1, "summarize": 0.1, "reduce": 0.1},
        "serving": {
            "kind": "openai",
            "base_url": f"http://127.0.0.1:{echo_server.server_address[1]}/v1",
            "model": "echo-1",
            "api_key_env": "ECHO_API_KEY",
        },
    }
    catalog = {
        "models": [smollm2, echo],
        "pools": [
            {"id": "tiny", "tier": "dedicated", "tflops": 1.0, "vram_gb": 0.5, "price_per_hour": 0.5},
            {"id": "roomy", "tier": "preemptible", "tflops": 8.0, "vram_gb": 4.0, "price_per_hour": 0.4},
            {"id": "micro", "tier": "preemptible", "tflops": 0.1, "vram_gb": 0.1, "price_per_hour": 0.01},
        ],
        "tenants": [{"id": "acme"}, {"id": "globex"}],
    }
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return str(path)


@pytest.fixture
async def assert_no_leaks(test_catalog):
    """After the test: the ledger holds nothing, whatever happened."""
    from tasks import runtime

    yield
    for path in (test_catalog, str(PACKAGED_CATALOG)):
        held = await runtime.backend(path).held()
        assert held == [], f"allocations leaked: {[a.allocation_id for a in held]}"
