"""Locust load on Homeskillet's real entry points: the MCP server over Streamable HTTP and over
WebSocket, the OpenAI-compatible API streaming `POST /v1/chat/completions`, and the fuse-request
deployment through Prefect's REST API.

    HOMESKILLET_LOAD_TOKENS=acme:hsk_…,globex:hsk_… \\
    HOMESKILLET_LOAD_MCP=http://127.0.0.1:8765 \\
    HOMESKILLET_LOAD_API=http://127.0.0.1:8000 \\
    HOMESKILLET_LOAD_PREFECT=http://127.0.0.1:4200/api \\
    locust -f deployments/locustfile.py --headless -u 16 -r 4 -t 2m

Each simulated user is one tenant's client (tokens from `homeskillet tokens create T`, taken in
turn). A user kind runs only when its server is named: HOMESKILLET_LOAD_MCP (the MCP users),
HOMESKILLET_LOAD_API (the streaming API user; `homeskillet serve` serves both on one port) and
HOMESKILLET_LOAD_PREFECT (deployments: HOMESKILLET_LOAD_DEPLOYMENT, default
fuse-request/fuse-request). HOMESKILLET_LOAD_CONSTRAINTS (JSON) is passed with every MCP and
deployment request (the API request carries its `max_tokens`); HOMESKILLET_LOAD_MODEL is the API
request's `model` (default homeskillet/auto). HOMESKILLET_LOAD_WEIGHTS=http:ws:deployment:api
sets the users' mix (default 3:3:1:3). A request is a failure when its answer is an error or
empty; Locust's own statistics give rps and percentiles, and the streaming user's time to first
token is its own request name, "api-stream first token".
"""

from __future__ import annotations

import itertools
import json
import os
import time

import requests
from locust import HttpUser, User, between, events, task

PROMPTS = [
    "What is the capital of France?",
    "1. Name three primary colors.\n2. What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Write a haiku about the sea.",
]
TOKENS = [pair.split(":", 1) for pair in os.environ.get("HOMESKILLET_LOAD_TOKENS", "").split(",") if ":" in pair]
MCP = os.environ.get("HOMESKILLET_LOAD_MCP", "").rstrip("/")
API = os.environ.get("HOMESKILLET_LOAD_API", "").rstrip("/")
API_MODEL = os.environ.get("HOMESKILLET_LOAD_MODEL", "homeskillet/auto")
PREFECT = os.environ.get("HOMESKILLET_LOAD_PREFECT", "").rstrip("/")
DEPLOYMENT = os.environ.get("HOMESKILLET_LOAD_DEPLOYMENT", "fuse-request/fuse-request")
CONSTRAINTS = json.loads(os.environ.get("HOMESKILLET_LOAD_CONSTRAINTS", "{}"))
_weights = [int(w) for w in os.environ.get("HOMESKILLET_LOAD_WEIGHTS", "3:3:1:3").split(":")]
WEIGHTS = _weights + [3, 3, 1, 3][len(_weights) :]  # the kinds a shorter mix leaves out: their defaults
_next_token = itertools.cycle(TOKENS or [("", "")])
_prompts = itertools.cycle(PROMPTS)
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "locust", "version": "1"}},
}


def fuse_call(call_id: int) -> dict:
    arguments = {"prompt": next(_prompts), "constraints": CONSTRAINTS}
    return {"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": {"name": "fuse", "arguments": arguments}}


def check_answer(message: dict) -> str | None:
    """Why a JSON-RPC answer to `fuse` is a failure, or None when it carries an answer."""
    if "error" in message:
        return f"JSON-RPC error {message['error'].get('code')}: {message['error'].get('message')}"
    result = message.get("result") or {}
    if result.get("isError"):
        return "tool error: " + " ".join(c.get("text", "") for c in result.get("content", []))[:300]
    text = " ".join(c.get("text", "") for c in result.get("content", []))
    return None if text.strip() else "empty answer"


def from_sse(body: str, call_id: int) -> dict:
    """The JSON-RPC message with this id in a Streamable HTTP answer (JSON, or server-sent events)."""
    body = body.strip()
    if body.startswith("{"):
        return json.loads(body)
    for line in body.splitlines():
        if line.startswith("data:"):
            message = json.loads(line[5:])
            if message.get("id") == call_id:
                return message
    raise ValueError("no JSON-RPC answer in the stream")


class McpHttpUser(HttpUser):
    """A tenant's MCP client over Streamable HTTP: one session, then fuse calls."""

    abstract = not MCP  # not spawned without an MCP server to load
    weight = WEIGHTS[0]
    host = MCP or "http://127.0.0.1"
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.tenant, token = next(_next_token)
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
        opened = self.client.post("/mcp", json=INITIALIZE, headers=self.headers, name="mcp-http initialize")
        self.headers["mcp-session-id"] = opened.headers.get("mcp-session-id", "")
        self.client.post(
            "/mcp",
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers=self.headers,
            name="mcp-http initialized",
        )
        self.calls = itertools.count(1)

    @task
    def fuse(self) -> None:
        call_id = next(self.calls)
        with self.client.post(
            "/mcp",
            json=fuse_call(call_id),
            headers=self.headers,
            name="mcp-http fuse",
            catch_response=True,
            timeout=600,
        ) as response:
            try:
                problem = check_answer(from_sse(response.text, call_id))
            except ValueError as exc:
                problem = f"unreadable answer: {exc}"
            if problem:
                response.failure(problem)


class McpWebSocketUser(User):
    """A tenant's MCP client over WebSocket (subprotocol "mcp"): one socket, then fuse calls."""

    abstract = not MCP
    weight = WEIGHTS[1]
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        from websockets.sync.client import connect

        self.tenant, token = next(_next_token)
        url = MCP.replace("http", "ws", 1) + "/ws"
        self.socket = connect(
            url,
            subprotocols=["mcp"],
            additional_headers={"Authorization": f"Bearer {token}"},
            max_size=1 << 24,
            open_timeout=30,
        )
        self._ask(INITIALIZE, 0)
        self.socket.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        self.calls = itertools.count(1)

    def on_stop(self) -> None:
        self.socket.close()

    def _ask(self, message: dict, call_id: int) -> dict:
        self.socket.send(json.dumps(message))
        while True:
            answer = json.loads(self.socket.recv(timeout=600))
            if answer.get("id") == call_id:
                return answer

    @task
    def fuse(self) -> None:
        call_id = next(self.calls)
        started = time.perf_counter()
        problem, length = None, 0
        try:
            answer = self._ask(fuse_call(call_id), call_id)
            length = len(json.dumps(answer))
            problem = check_answer(answer)
        except Exception as exc:  # a closed socket or a timeout is a failure of this request
            problem = f"{type(exc).__name__}: {exc}"
        events.request.fire(
            request_type="WS",
            name="mcp-ws fuse",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=RuntimeError(problem) if problem else None,
        )


class DeploymentUser(HttpUser):
    """An operator's program starting fuse-request runs through Prefect's REST API, waiting for each."""

    abstract = not PREFECT
    weight = WEIGHTS[2]
    host = PREFECT or "http://127.0.0.1"
    wait_time = between(0.5, 1.0)

    def on_start(self) -> None:
        found = self.client.get(f"/deployments/name/{DEPLOYMENT}", name="deployment lookup")
        self.deployment = found.json()["id"]
        self.tenant = next(_next_token)[0] or "demo"

    @task
    def fuse_request_run(self) -> None:
        started = time.perf_counter()
        parameters = {"prompt": next(_prompts), "tenant": self.tenant, "constraints": CONSTRAINTS}
        made = self.client.post(
            f"/deployments/{self.deployment}/create_flow_run",
            json={"parameters": parameters},
            name="deployment create_flow_run",
        )
        run_id, state = made.json()["id"], None
        while state not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            time.sleep(0.5)
            state = self.client.get(f"/flow_runs/{run_id}", name="deployment poll").json()["state"]["type"]
        events.request.fire(
            request_type="RUN",
            name="deployment fuse-request",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=None if state == "COMPLETED" else RuntimeError(f"flow run {state}"),
        )


def streamed_text(lines) -> tuple[float | None, str, str | None]:
    """Read a `chat.completion.chunk` stream to `data: [DONE]`: (seconds to its first content,
    from the first line read; the text; why it failed, or None)."""
    started, first, text = time.perf_counter(), None, ""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return first, text, None if text.strip() else "empty answer"
        chunk = json.loads(data)
        if "error" in chunk:
            return first, text, f"stream error {chunk['error'].get('type')}: {chunk['error'].get('message')}"
        piece = "".join(c.get("delta", {}).get("content") or "" for c in chunk.get("choices", []))
        if piece and first is None:
            first = time.perf_counter() - started
        text += piece
    return first, text, "the stream ended before [DONE]"


class ApiStreamUser(User):
    """A tenant's OpenAI-style client streaming `POST /v1/chat/completions` (`stream: true`) and
    reading it to `[DONE]`: "api-stream chat" is the whole answer, "api-stream first token" the
    time from sending the request to its first content token."""

    abstract = not API
    weight = WEIGHTS[3]
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.tenant, token = next(_next_token)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def on_stop(self) -> None:
        self.session.close()

    @task
    def chat_stream(self) -> None:
        body = {"model": API_MODEL, "messages": [{"role": "user", "content": next(_prompts)}], "stream": True}
        if "max_tokens" in CONSTRAINTS:
            body["max_tokens"] = CONSTRAINTS["max_tokens"]
        started = time.perf_counter()
        first, text, problem = None, "", None
        try:
            with self.session.post(f"{API}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
                if response.status_code != 200:
                    problem = f"HTTP {response.status_code}: {response.text[:300]}"
                else:
                    to_headers = time.perf_counter() - started
                    first, text, problem = streamed_text(response.iter_lines(decode_unicode=True))
                    first = None if first is None else to_headers + first
        except (requests.RequestException, ValueError) as exc:  # a dropped connection, a malformed event
            problem = f"{type(exc).__name__}: {exc}"
        if first is not None:
            events.request.fire(
                request_type="SSE",
                name="api-stream first token",
                response_time=first * 1000,
                response_length=0,
                exception=None,
            )
        events.request.fire(
            request_type="SSE",
            name="api-stream chat",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=len(text),
            exception=RuntimeError(problem) if problem else None,
        )
