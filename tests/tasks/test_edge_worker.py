"""The edge worker (edge/worker.mjs) forwards only to its configured endpoint: the served paths
and methods, the base URL and the path joined as strings without the query, an allow-list of
headers, no redirect followed, bodies capped. Run under Node with a recording fetch
(edge/probe.mjs): a refusal is a status and nothing fetched; a forward is the exact URL."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

EDGE = Path(__file__).resolve().parents[2] / "edge"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

ENDPOINTS = {"math": "https://math.example/pool", "default": "https://hs.example/base"}
CHAT = "https://hs.example/base/v1/chat/completions"
MiB = 1024 * 1024
CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "What is the capital of Peru?"}]})


def probe(cases: list[dict], options: dict | None = None, env: dict | None = None) -> list[dict] | str:
    """Each case's answer and what was forwarded; the error text when createWorker refuses the options."""
    spec = {"options": {"endpoints": ENDPOINTS} if options is None else options, "env": env or {}, "cases": cases}
    out = json.loads(
        subprocess.run(
            [NODE, EDGE / "probe.mjs"], input=json.dumps(spec), capture_output=True, text=True, check=True, timeout=120
        ).stdout
    )
    return out.get("error") or out["results"]


def chat(path: str = "/v1/chat/completions", **case) -> dict:
    return {"path": path, "method": "POST", "headers": {"content-type": "application/json"}, "body": CHAT_BODY, **case}


MALICIOUS = [
    "/http://127.0.0.1:4200/api/health",
    "///169.254.169.254/latest/meta-data/",
    "/file:///etc/passwd",
    "//admin/secret",
    "/v1/chat/completions/../../admin",
    "/%2e%2e/admin",
    "/v1/chat/completions/",
    "/V1/models",
    "/v1/models/../../mcp/x",
    "/v1%2fchat%2fcompletions",
    "/",
]


def test_a_path_not_served_is_404_and_nothing_is_fetched():
    cases = [chat(path) for path in MALICIOUS] + [{"path": path} for path in MALICIOUS]
    results = probe(cases)
    assert [(r["status"], r["forwarded"]) for r in results] == [(404, [])] * len(cases)


def test_a_method_not_served_is_405_with_allow_and_nothing_is_fetched():
    cases = [
        {"path": "/v1/chat/completions"},
        {"path": "/v1/completions", "method": "PUT", "body": "x"},
        {"path": "/v1/models", "method": "POST", "body": "x"},
        {"path": "/mcp", "method": "PATCH", "body": "x"},
        {"path": "/mcp", "method": "HEAD"},
        {"path": "/classify"},
    ]
    results = probe(cases)
    assert [(r["status"], r["headers"].get("allow"), r["forwarded"]) for r in results] == [
        (405, "POST", []),
        (405, "POST", []),
        (405, "GET", []),
        (405, "POST, GET, DELETE", []),
        (405, "POST, GET, DELETE", []),
        (405, "POST", []),
    ]


def test_served_requests_reach_the_configured_endpoint_intact():
    initialize = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    mcp = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    math = json.dumps({"prompt": "Solve 4x - 8 = 12 for x."})
    results = probe(
        [
            chat(),
            {
                "path": "/v1/completions",
                "method": "POST",
                "headers": {"content-type": "application/json"},
                "body": math,
            },
            {"path": "/v1/models"},
            {
                "path": "/mcp",
                "method": "POST",
                "headers": {**mcp, "mcp-protocol-version": "2025-06-18"},
                "body": initialize,
            },
            {"path": "/mcp", "headers": {"accept": "text/event-stream", "mcp-session-id": "s1", "last-event-id": "7"}},
            {"path": "/mcp", "method": "DELETE", "headers": {"mcp-session-id": "s1"}},
        ],
        options={"endpoints": {"default": "https://hs.example/base"}},  # routing by label: test_edge_classifier
    )
    assert [r["status"] for r in results] == [200] * 6
    assert [r["body"] for r in results] == ["from upstream"] * 6
    assert [[(f["method"], f["url"], f["redirect"]) for f in r["forwarded"]] for r in results] == [
        [("POST", CHAT, "manual")],
        [("POST", "https://hs.example/base/v1/completions", "manual")],
        [("GET", "https://hs.example/base/v1/models", "manual")],
        [("POST", "https://hs.example/base/mcp", "manual")],
        [("GET", "https://hs.example/base/mcp", "manual")],
        [("DELETE", "https://hs.example/base/mcp", "manual")],
    ]
    assert [r["forwarded"][0]["body"] for r in results] == [CHAT_BODY, math, None, initialize, None, ""]
    assert results[1]["forwarded"][0]["headers"]["x-homeskillet-task-type"] == "math"
    assert results[3]["forwarded"][0]["headers"] == {
        **mcp,
        "mcp-protocol-version": "2025-06-18",
        "x-homeskillet-task-type": results[3]["forwarded"][0]["headers"]["x-homeskillet-task-type"],
    }
    assert results[4]["forwarded"][0]["headers"]["mcp-session-id"] == "s1"
    assert results[4]["forwarded"][0]["headers"]["last-event-id"] == "7"


def test_the_query_string_is_dropped():
    results = probe([chat("/v1/chat/completions?x=http://evil"), {"path": "/v1/models?url=//169.254.169.254/#x"}])
    assert [[f["url"] for f in r["forwarded"]] for r in results] == [[CHAT], ["https://hs.example/base/v1/models"]]


def test_only_allow_listed_headers_are_forwarded():
    sent = {
        "content-type": "application/json",
        "accept": "application/json",
        "authorization": "Bearer tenant-token",
        "user-agent": "client/1.0",
        "cookie": "session=secret-cookie",
        "host": "127.0.0.1:4200",
        "x-forwarded-for": "10.0.0.1",
        "x-forwarded-host": "internal.example",
        "x-real-ip": "10.0.0.1",
        "cf-connecting-ip": "10.0.0.1",
        "proxy-authorization": "Basic cHJveHk6cHc=",
        "x-homeskillet-task-type": "math",  # the client cannot choose its own label
    }
    (result,) = probe([chat(headers=sent)])
    (forwarded,) = result["forwarded"]
    assert forwarded["url"] == CHAT
    assert forwarded["headers"] == {
        "content-type": "application/json",
        "accept": "application/json",
        "authorization": "Bearer tenant-token",
        "user-agent": "client/1.0",
        "x-homeskillet-task-type": "factual_qa",
    }


def test_an_upstream_redirect_comes_back_to_the_client_unfollowed():
    (result,) = probe([chat(upstream={"status": 302, "headers": {"location": "http://127.0.0.1:4200/api/health"}})])
    assert result["status"] == 302 and result["headers"]["location"] == "http://127.0.0.1:4200/api/health"
    assert [(f["url"], f["redirect"], f.get("followed")) for f in result["forwarded"]] == [(CHAT, "manual", None)]


# The same with the runtime's own fetch and real servers on loopback: the endpoint answers 302 to
# a second server that counts what reaches it.
REAL_REDIRECT = """
import http from "node:http";
const { createWorker } = await import(process.argv[1]);
const listen = (handler) => new Promise((ok) => { const s = http.createServer(handler).listen(0, "127.0.0.1", () => ok(s)); });
let reached = 0;
const prefect = await listen((req, res) => { reached += 1; res.end("prefect"); });
const upstream = await listen((req, res) => {
  res.writeHead(302, { location: `http://127.0.0.1:${prefect.address().port}/api/health` }); res.end();
});
const worker = createWorker({ endpoints: { default: `http://127.0.0.1:${upstream.address().port}/` } });
const r = await worker.fetch(new Request("https://edge.example/v1/chat/completions", { method: "POST", body: "hi" }));
console.log(JSON.stringify({ status: r.status, location: r.headers.get("location"), reached,
  prefect: prefect.address().port }));
upstream.close(); prefect.close();
"""


def test_a_real_fetch_does_not_follow_the_upstreams_redirect():
    out = json.loads(
        subprocess.run(
            [NODE, "--input-type=module", "-e", REAL_REDIRECT, (EDGE / "worker.mjs").as_uri()],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    assert out["status"] == 302 and out["location"] == f"http://127.0.0.1:{out['prefect']}/api/health"
    assert out["reached"] == 0


def test_bodies_over_the_cap_are_413_and_not_read_past_it():
    chunk = 64 * 1024
    results = probe(
        [
            chat(body=None, bodyBytes=MiB + 1, headers={"content-length": str(MiB + 1)}),
            # declared too large: refused before a byte is read
            chat(body=None, stream={"chunk": chunk, "chunks": 1024}, headers={"content-length": str(64 * MiB)}),
            # no Content-Length (chunked): 64 MiB offered, reading stops past the cap
            chat(body=None, stream={"chunk": chunk, "chunks": 1024}),
            {"path": "/mcp", "method": "POST", "bodyBytes": MiB + 1, "headers": {"content-length": str(MiB + 1)}},
            {"path": "/classify", "method": "POST", "stream": {"chunk": chunk, "chunks": 1024}},
            chat(body=None, bodyBytes=MiB),  # at the cap: forwarded whole
        ]
    )
    assert [(r["status"], r["forwarded"]) for r in results[:5]] == [(413, [])] * 5
    assert results[1]["pulled"] <= chunk
    assert MiB < results[2]["pulled"] <= MiB + 2 * chunk
    assert results[4]["pulled"] <= MiB + 2 * chunk
    assert results[5]["status"] == 200 and [f["bodyBytes"] for f in results[5]["forwarded"]] == [MiB]


def test_the_body_cap_is_configurable():
    cases = [
        chat(body=None, bodyBytes=1000),
        chat(body=None, bodyBytes=1001),
        chat(body=None, stream={"chunk": 600, "chunks": 2}),
    ]
    by_option = probe(cases, options={"endpoints": ENDPOINTS, "maxBodyBytes": 1000})
    by_env = probe(cases, env={"HOMESKILLET_EDGE_MAX_BODY_BYTES": "1000"})
    for results in (by_option, by_env):
        assert [r["status"] for r in results] == [200, 413, 413]
        assert [len(r["forwarded"]) for r in results] == [1, 0, 0]
    assert probe([], options={"maxBodyBytes": -1}) == "HOMESKILLET_EDGE_MAX_BODY_BYTES: must be a whole number of bytes"
    (bad_env,) = probe([chat()], env={"HOMESKILLET_EDGE_MAX_BODY_BYTES": "1 MiB"})
    assert bad_env["forwarded"] == [] and "HOMESKILLET_EDGE_MAX_BODY_BYTES" in bad_env["error"]


@pytest.mark.parametrize(
    ("base", "error"),
    [
        ("http://hs.example", 'endpoint "default": must be https (http only for a loopback host), not http:'),
        ("http://169.254.169.254", 'endpoint "default": must be https (http only for a loopback host), not http:'),
        ("file:///etc/passwd", 'endpoint "default": must be https (http only for a loopback host), not file:'),
        ("https://user:hunter2@hs.example", 'endpoint "default": must not hold credentials'),
        ("https://hs.example/?token=hunter2", 'endpoint "default": must have no query or fragment'),
        ("https://hs.example/?", 'endpoint "default": must have no query or fragment'),
        ("https://hs.example/#x", 'endpoint "default": must have no query or fragment'),
        ("hs.example", 'endpoint "default": not a URL'),
    ],
)
def test_a_bad_endpoint_is_an_error_that_names_it(base, error):
    assert probe([], options={"endpoints": {"default": base}}) == error
    (result,) = probe([chat()], options={}, env={"HOMESKILLET_ENDPOINTS": json.dumps({"default": base})})
    assert result["error"] == error and result["forwarded"] == []


def test_loopback_http_and_trailing_slashes_are_accepted():
    for base, path, url in [
        ("http://127.0.0.1:8000/api/", "/v1/models", "http://127.0.0.1:8000/api/v1/models"),
        ("http://localhost:9000", "/mcp", "http://localhost:9000/mcp"),
        ("http://[::1]:9000", "/mcp", "http://[::1]:9000/mcp"),
        ("https://hs.example/base//", "/v1/models", "https://hs.example/base/v1/models"),
    ]:
        (result,) = probe([{"path": path}], options={"endpoints": {"default": base}})
        assert [f["url"] for f in result["forwarded"]] == [url]
    assert probe([], options={"endpoints": "[1]"}) == "HOMESKILLET_ENDPOINTS: must be an object of task type → base URL"


def test_every_request_of_an_mcp_session_goes_to_the_default_endpoint():
    """An MCP session lives on one server: a prompt-like body must not send one of its requests to
    another task type's endpoint."""
    code = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "fuse", "arguments": {"prompt": "Write a Python function that sorts a list."}},
        }
    )
    endpoints = {"default": "https://hs.example/base", "code": "https://code.example"}
    results = probe(
        [
            {"path": "/mcp", "method": "POST", "headers": {"content-type": "application/json"}, "body": code},
            {"path": "/mcp", "headers": {"mcp-session-id": "s1"}},
            chat(
                body=json.dumps(
                    {"messages": [{"role": "user", "content": "Write a Python function that sorts a list."}]}
                )
            ),
        ],
        options={"endpoints": endpoints},
    )
    assert [r["forwarded"][0]["url"] for r in results] == [
        "https://hs.example/base/mcp",
        "https://hs.example/base/mcp",
        "https://code.example/v1/chat/completions",  # the control: a completion is routed by its task type
    ]
