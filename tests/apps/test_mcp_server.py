"""The MCP server over Streamable HTTP (the SDK's own client) and WebSocket (ours), on a real
uvicorn on loopback, the session's PostgreSQL and Prefect server, and the echo model double."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
import websockets
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from apps.isolation.mcp import INITIALIZE
from connectors.tokens import TokenStore, token_hash
from connectors.ws_transport import WebSocketTransport
from homeskillet.settings import get_settings
from tasks import runtime
from tests.support import HOMESKILLET, free_port

SERVED = pytest.mark.usefixtures("local_services")  # flows, tasks or the Prefect API

THREE_PARTS = "What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea."

THREE = "1. Say one.\n2. Say two.\n3. Say three."
ECHO = {"allowed_models": ["echo"], "pool": "roomy", "max_tokens": 16}


APP: dict = {}


@contextmanager
def serving(app):
    """The app on a real uvicorn in a thread, on a free loopback port: yields host:port."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws_max_size=1 << 24))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(test_catalog):
    from apps.mcp_server import create_app

    app = create_app(test_catalog)
    APP["app"] = app
    with serving(app) as where:
        yield where


@pytest.fixture(scope="module")
async def tokens():
    store = await TokenStore.open(get_settings().pgdata)
    acme = (await store.create("acme"))[1]
    globex = (await store.create("globex"))[1]
    revoked_id, revoked = await store.create("acme")
    assert await store.revoke(revoked_id)
    return {"acme": acme, "globex": globex, "revoked": revoked, "store": store}


def http_client(server: str, token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(streamable_http_client(f"http://{server}/mcp", http_client=create_mcp_http_client(headers=headers)))


def ws_client(server: str, token: str | None, **kw) -> Client:
    return Client(WebSocketTransport(f"ws://{server}/ws", token=token, **kw))


CLIENTS = {"http": http_client, "ws": ws_client}


@SERVED
@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_five_tools_and_two_resources_are_listed(server, tokens, transport):
    async with CLIENTS[transport](server, tokens["acme"]) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {"fuse", "plan", "classify", "allocations", "feedback"}
        for tool in (await client.list_tools()).tools:
            assert "tenant" not in json.dumps(tool.input_schema)  # the token is the tenant
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert "homeskillet://catalog" in resources and "homeskillet://requests/{request_id}" in templates
        catalog = json.loads((await client.read_resource("homeskillet://catalog")).contents[0].text)
        assert {p["id"] for p in catalog["pools"]} >= {"tiny", "roomy"} and "price_per_hour" in catalog["pools"][0]
        assert catalog["tenant"] == "acme" and "tenants" not in catalog  # no other tenant is named


@SERVED
@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_fuse_sends_progress_before_its_result_and_only_its_tenant_reads_it(
    server, tokens, transport, assert_no_leaks
):
    seen: list[tuple[float, str]] = []

    async def on_progress(progress, total, message):
        seen.append((progress, message))

    async with CLIENTS[transport](server, tokens["acme"]) as client:
        result = await client.call_tool("fuse", {"prompt": THREE, "constraints": ECHO}, progress_callback=on_progress)
        assert not result.is_error, result.content
        fused = result.structured_content
        assert [f["fragment_id"] for f in fused["fragments"]] == ["f1", "f2", "f3"]
        ids = {f["allocation_id"] for f in fused["fragments"]}
        assert len(ids) == 3 and fused["tenant"] == "acme"
        assert result.content[0].text == fused["answer"]
        messages = [m for _, m in seen]
        for f in fused["fragments"]:  # one allocated and one completed message per fragment, with its details
            for event in ("allocated", "completed"):
                assert any(
                    m.startswith(f"{f['fragment_id']} {event}")
                    and f["allocation_id"] in m
                    and f["model"] in m
                    and f["pool"] in m
                    for m in messages
                ), (event, f, messages)
        again = await client.read_resource(f"homeskillet://requests/{fused['request_id']}")
        assert json.loads(again.contents[0].text) == fused
    async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"]) as api:  # a real flow run, tagged
        runs = await api.post(
            "/flow_runs/filter", json={"flow_runs": {"tags": {"all_": ["tenant:acme", "mcp"]}}, "limit": 200}
        )
        mine = [r for r in runs.raise_for_status().json() if r["parameters"].get("request_id") == fused["request_id"]]
        assert len(mine) == 1 and mine[0]["state_type"] == "COMPLETED"
    async with CLIENTS[transport](server, tokens["globex"]) as other:
        with pytest.raises(MCPError) as theirs:
            await other.read_resource(f"homeskillet://requests/{fused['request_id']}")
        with pytest.raises(MCPError) as unknown:
            await other.read_resource("homeskillet://requests/mcp-doesnotexist")
        # another tenant's id reads exactly like an unknown one (but for the id itself)
        assert theirs.value.error.code == unknown.value.error.code
        assert theirs.value.error.message.replace(fused["request_id"], "X") == unknown.value.error.message.replace(
            "mcp-doesnotexist", "X"
        )


@SERVED
async def test_a_tenant_sees_only_its_own_allocations(server, tokens, monkeypatch, assert_no_leaks):
    monkeypatch.setenv("ECHO_DELAY_S", "3")
    backend = runtime.backend(runtime.catalog_path())  # noqa: F841 (warm)
    async with ws_client(server, tokens["acme"]) as acme, http_client(server, tokens["globex"]) as globex:
        call = asyncio.create_task(acme.call_tool("fuse", {"prompt": "1. Say one.\n2. Say two.", "constraints": ECHO}))
        for _ in range(100):
            mine = (await acme.call_tool("allocations", {})).structured_content
            if len(mine["allocations"]) == 2:
                break
            await asyncio.sleep(0.05)
        assert mine["tenant"] == "acme" and len(mine["allocations"]) == 2
        theirs = (await globex.call_tool("allocations", {})).structured_content
        assert theirs == {"tenant": "globex", "allocations": []}
        assert not (await call).is_error


@SERVED
async def test_bad_missing_and_revoked_tokens_are_refused_on_both_transports(server, tokens):
    async with httpx.AsyncClient() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        for token in (None, "hs_wrong", tokens["revoked"]):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = await http.post(f"http://{server}/mcp", json=body, headers=headers)
            assert response.status_code == 401 and "Bearer" in response.headers["www-authenticate"]
    for token in (None, "hs_wrong", tokens["revoked"]):
        for in_subprotocol in (False, True):
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                async with ws_client(server, token, token_in_subprotocol=in_subprotocol):
                    pass
            assert refused.value.response.status_code == 403
    # a Streamable HTTP session belongs to its tenant: another tenant's token cannot use its id
    async with httpx.AsyncClient() as http:
        init = INITIALIZE
        accept = {"Accept": "application/json, text/event-stream"}
        opened = await http.post(
            f"http://{server}/mcp", json=init, headers={**accept, "Authorization": f"Bearer {tokens['acme']}"}
        )
        session = opened.headers["mcp-session-id"]
        hijack = await http.post(
            f"http://{server}/mcp",
            json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            headers={**accept, "Authorization": f"Bearer {tokens['globex']}", "mcp-session-id": session},
        )
        assert hijack.status_code == 404
    # a browser's way: the token as a second subprotocol
    async with ws_client(server, tokens["acme"], token_in_subprotocol=True) as client:
        assert (await client.call_tool("allocations", {})).structured_content["tenant"] == "acme"
    # the store holds hashes only
    rows = await tokens["store"].list("acme")
    assert rows and all(tokens["acme"] not in json.dumps(r, default=str) for r in rows)
    assert await tokens["store"].tenant_of(tokens["acme"]) == "acme"
    assert len(token_hash(tokens["acme"])) == 64


@SERVED
async def test_a_socket_closed_mid_call_releases_everything(server, tokens, monkeypatch, assert_no_leaks):
    monkeypatch.setenv("ECHO_DELAY_S", "10")  # released well before the answers would come: cancelled
    backend = runtime.backend(runtime.catalog_path())
    transport = WebSocketTransport(f"ws://{server}/ws", token=tokens["acme"])
    async with Client(transport) as client:
        call = asyncio.create_task(client.call_tool("fuse", {"prompt": THREE, "constraints": ECHO}))
        for _ in range(200):
            if len(await backend.held("acme")) == 3:
                break
            await asyncio.sleep(0.05)
        assert len(await backend.held("acme")) == 3
        await transport.websocket.close()
        with pytest.raises(BaseException):  # noqa: B017 (whatever the closed socket raises in the client)
            await asyncio.wait_for(call, 10)
    for _ in range(60):  # the server cancels the flow run; its rollback hooks release
        if not await backend.held("acme") and not await running_here("acme"):
            break
        await asyncio.sleep(0.1)
    assert await backend.held("acme") == []
    assert await running_here("acme") == 0  # the call ended with its socket


@SERVED
async def test_cancelling_a_call_cancels_the_flow_and_releases(server, tokens, monkeypatch, assert_no_leaks):
    monkeypatch.setenv("ECHO_DELAY_S", "10")
    backend = runtime.backend(runtime.catalog_path())
    async with ws_client(server, tokens["acme"]) as client:
        call = asyncio.create_task(client.call_tool("fuse", {"prompt": THREE, "constraints": ECHO}))
        for _ in range(200):
            if len(await backend.held("acme")) == 3:
                break
            await asyncio.sleep(0.05)
        call.cancel()  # the SDK client sends notifications/cancelled
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(60):
            if not await backend.held("acme"):
                break
            await asyncio.sleep(0.1)
        assert await backend.held("acme") == []
        t0 = time.monotonic()
        while await running_here("acme") and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.1)
        assert await running_here("acme") == 0  # the call has ended
        # the connection is still usable
        assert (await client.call_tool("classify", {"prompt": "What is 2 + 2?"})).structured_content["label"]


@SERVED
async def test_the_per_tenant_cap_answers_a_clear_error(tokens, covenant_catalog, monkeypatch, assert_no_leaks):
    """The covenant's max_concurrent_requests: beyond it `fuse` fails at once with -32029, and the
    refused call leaves no flow run (it is refused before one is made)."""
    from apps.mcp_server import TOO_MANY_REQUESTS, create_app

    monkeypatch.setenv("ECHO_DELAY_S", "4")
    path = covenant_catalog(acme={"max_concurrent_requests": 2}, globex={})
    one = {"prompt": "Say one.", "constraints": ECHO}
    backend = runtime.backend(path)
    with serving(create_app(path)) as server:
        async with ws_client(server, tokens["acme"]) as client:
            running = [asyncio.create_task(client.call_tool("fuse", one)) for _ in range(2)]
            for _ in range(200):  # both calls run (each holds its allocation)
                if len(await backend.held("acme")) == 2:
                    break
                await asyncio.sleep(0.05)
            runs_before = await acme_flow_runs()
            with pytest.raises(MCPError, match="max_concurrent_requests: limit 2 at once") as refused:
                await client.call_tool("fuse", one)
            assert refused.value.error.code == TOO_MANY_REQUESTS and refused.value.error.data["retry_after_s"] > 0
            assert await acme_flow_runs() == runs_before  # no flow run for the refused call
            async with http_client(server, tokens["globex"]) as other:  # another tenant is not capped by acme
                assert not (await other.call_tool("fuse", one)).is_error
            assert all(not r.is_error for r in await asyncio.gather(*running))
            assert not (await client.call_tool("fuse", one)).is_error  # a place is free again
    assert await running_here("acme") == 0


async def running_here(tenant: str) -> int:
    """The tenant's requests this process has admitted to the ledger and not ended."""
    import asyncpg

    from connectors import postgres
    from connectors.ledger import holder_id

    conn = await asyncpg.connect(postgres.dsn(get_settings().pgdata, "homeskillet"))
    try:
        query = "SELECT count(*) FROM requests WHERE tenant = $1 AND holder = $2 AND ended_at IS NULL"
        return await conn.fetchval(query, tenant, holder_id())
    finally:
        await conn.close()


async def acme_flow_runs() -> int:
    """Flow runs tagged with tenant acme, in the session's Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with get_client() as prefect:
        return await prefect.count_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["tenant:acme"]))
        )


@SERVED
async def test_bad_input_gets_json_rpc_errors_and_the_socket_stays_usable(server, tokens):
    headers = {"Authorization": f"Bearer {tokens['acme']}"}
    async with websockets.connect(f"ws://{server}/ws", subprotocols=["mcp"], additional_headers=headers) as ws:
        await ws.send("{not json")
        assert json.loads(await ws.recv())["error"]["code"] == -32700
        await ws.send(json.dumps({"id": 7, "method": 3}))
        reply = json.loads(await ws.recv())
        assert reply["error"]["code"] == -32600 and reply["id"] == 7
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 8, "method": "tools/list", "pad": "x" * (2 << 20)}))
        reply = json.loads(await ws.recv())
        assert reply["error"]["code"] == -32600 and "exceeds the limit" in reply["error"]["message"]
    async with httpx.AsyncClient() as http:  # the same limits on Streamable HTTP
        auth = {
            "Authorization": f"Bearer {tokens['acme']}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        big = await http.post(f"http://{server}/mcp", content=b'{"pad": "' + b"x" * (2 << 20) + b'"}', headers=auth)
        assert big.status_code == 413
        garbled = await http.post(f"http://{server}/mcp", content=b"{not json", headers=auth)
        assert garbled.status_code == 400 and garbled.json()["error"]["code"] == -32700
    async with ws_client(server, tokens["acme"]) as client:
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("no_such_tool", {})
        assert unknown.value.error.code == -32601
        plan = (await client.call_tool("plan", {"prompt": THREE, "constraints": ECHO})).structured_content
        assert [f["id"] for f in plan["fragments"]] == ["f1", "f2", "f3"] and plan["est_cost_usd"] > 0
        assert await runtime.backend(runtime.catalog_path()).held("acme") == []
        bad = await client.call_tool("fuse", {"prompt": "  ", "constraints": ECHO})
        assert bad.is_error and "prompt is empty" in bad.content[0].text
        assert (await client.call_tool("classify", {"prompt": "Translate 'hello' to French"})).structured_content


@SERVED
async def test_plan_shows_only_what_the_covenant_allows_and_refuses_what_it_forbids(tokens, test_catalog, tmp_path):
    """`plan` prepares a request as `fuse` does: under a covenant that allows one model and one
    strategy it shows that model for every fragment, and refuses a forbidden strategy or model."""
    from apps.mcp_server import create_app

    raw = yaml.safe_load(Path(test_catalog).read_text())
    one_model = {"allowed_models": ["echo-lite"], "allowed_strategies": ["single"]}
    raw["tenants"] = [{"id": "acme", "covenant": one_model}, {"id": "globex"}]
    path = tmp_path / "covenants.yaml"
    path.write_text(yaml.safe_dump(raw))
    with serving(create_app(str(path))) as where:
        async with ws_client(where, tokens["globex"]) as client:  # the control: no covenant
            free = (await client.call_tool("plan", {"prompt": THREE})).structured_content
        assert {f["model"] for f in free["fragments"]} != {"echo-lite"}, free  # routing alone picks others
        async with ws_client(where, tokens["acme"]) as client:
            bound = (await client.call_tool("plan", {"prompt": THREE})).structured_content
            assert [f["id"] for f in bound["fragments"]] == ["f1", "f2", "f3"]
            assert {f["model"] for f in bound["fragments"]} == {"echo-lite"}, bound
            assert bound["covenant_terms"] == ["allowed_models"]
            strategy = await client.call_tool("plan", {"prompt": THREE, "strategy": "cascade"})
            assert strategy.is_error and "allowed_strategies" in strategy.content[0].text, strategy
            model = await client.call_tool("plan", {"prompt": THREE, "constraints": {"allowed_models": ["echo"]}})
            assert model.is_error and "allowed_models" in model.content[0].text, model
    assert await runtime.backend(runtime.catalog_path()).held("acme") == []


@asynccontextmanager
async def mcp_serve(port: int, log_path: Path):
    """`homeskillet mcp serve` as its own process (output to a file, never an unread pipe), once it listens."""
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [HOMESKILLET, "mcp", "serve", "--port", str(port)],
            env=os.environ.copy(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(300):
            assert serve.poll() is None, log_path.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        yield serve
    finally:
        serve.terminate()
        serve.wait(20)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HOMESKILLET, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy(), **kw
    )


@SERVED
async def test_the_command_line_serves_mcp_and_manages_tokens(assert_no_leaks, tmp_path):
    """End to end as a user runs it: `homeskillet mcp serve`, a token per tenant from `tokens create`, a
    WebSocket client runs a three-part question on the real local models."""
    made = [json.loads(_cli("tokens", "create", "--tenant", t, "--json").stdout) for t in ("demo", "globex")]
    assert [m["tenant"] for m in made] == ["demo", "globex"] and all(m["token"].startswith("hs_") for m in made)
    unknown = _cli("tokens", "create", "--tenant", "nobody")
    assert unknown.returncode == 2 and "unknown tenant 'nobody'" in unknown.stderr
    listed = _cli("tokens", "list", "--json")
    assert made[0]["token_id"] in listed.stdout and made[0]["token"] not in listed.stdout
    from flows.fusion import fuse_request

    await fuse_request(prompt=THREE_PARTS, tenant="demo", constraints={"max_tokens": 16})  # model servers up
    t0 = time.perf_counter()
    await fuse_request(prompt=THREE_PARTS, tenant="demo", constraints={"max_tokens": 16})
    direct = time.perf_counter() - t0
    port = free_port()
    async with mcp_serve(port, tmp_path / "serve-1.log"):
        progress: list[str] = []

        async def on_progress(value, total, message):
            progress.append(message)

        addr = f"127.0.0.1:{port}"
        async with ws_client(addr, made[0]["token"]) as client:
            assert {t.name for t in (await client.list_tools()).tools} == {
                "fuse",
                "plan",
                "classify",
                "allocations",
                "feedback",
            }
            over_mcp = []
            for _ in range(2):  # the first in a fresh server process loads the flow's clients
                progress.clear()
                t0 = time.perf_counter()
                result = await client.call_tool(
                    "fuse", {"prompt": THREE_PARTS, "constraints": {"max_tokens": 16}}, progress_callback=on_progress
                )
                over_mcp.append(time.perf_counter() - t0)
            assert not result.is_error, result.content
            fused = result.structured_content
            assert len({f["allocation_id"] for f in fused["fragments"]}) == 3
            assert sum("allocated" in m for m in progress) == 3 and sum("completed" in m for m in progress) == 3
        async with ws_client(addr, made[1]["token"]) as other:
            with pytest.raises(MCPError):
                await other.read_resource(f"homeskillet://requests/{fused['request_id']}")
            assert (await other.call_tool("allocations", {})).structured_content["allocations"] == []
        assert _cli("tokens", "revoke", made[1]["token_id"]).returncode == 0
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with ws_client(addr, made[1]["token"]):
                pass
    t0 = time.perf_counter()
    await fuse_request(prompt=THREE_PARTS, tenant="demo", constraints={"max_tokens": 16})
    print(
        f"\nreal models, three parts, max_tokens 16: fuse_request directly {direct:.2f}s (before), "
        f"over MCP/WebSocket {over_mcp[0]:.2f}s (first) {over_mcp[1]:.2f}s (second), directly {time.perf_counter() - t0:.2f}s (after)"
    )
    # a restart loses no finished result
    async with mcp_serve(port, tmp_path / "serve-2.log"):
        async with http_client(f"127.0.0.1:{port}", made[0]["token"]) as client:
            again = await client.read_resource(f"homeskillet://requests/{fused['request_id']}")
            assert json.loads(again.contents[0].text) == fused


async def test_the_handlers_are_methods_that_run_on_their_own():
    """A tool is a plain method of `Tools`: called here without a server, a transport or a token."""
    from mcp.server.mcpserver.exceptions import ToolError

    from apps.mcp_server import Tools, constraints_of

    tools = Tools(None)
    result = await tools.classify("Write a Python function that returns the sum of a list of numbers.")
    assert result.structured_content["label"] == "code"
    assert sum(result.structured_content["probabilities"].values()) == pytest.approx(1.0)
    with pytest.raises(ToolError, match="invalid constraints: .*max_tokens"):
        constraints_of({"max_tokens": -1})


@SERVED
async def test_a_flood_of_made_up_tokens_gets_401_or_429_and_a_real_tenant_is_served_throughout(test_catalog, tokens):
    """800 requests at once with made-up tokens (malformed ones, and well-formed ones that need a
    lookup): none gets a 5xx, and a tenant with a real token is answered during and after. (A
    server of its own: the flood leaves loopback over its failed-authentication rate.)"""
    from apps.mcp_server import create_app

    app = create_app(test_catalog)
    with serving(app) as where:
        await _flood(where, tokens, app)


async def _flood(server: str, tokens: dict, app) -> None:
    """The tenant has used the server before (its token is one the server knows live): from the
    flood's own address it is served all the same; an unknown token from there waits (429)."""
    import secrets

    junk = [f"hs_{secrets.token_urlsafe(32)}" if i % 2 else f"made-up-{i}" for i in range(800)]
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    limits = httpx.Limits(max_connections=800, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:

        async def attempt(token: str) -> int:
            response = await http.post(f"http://{server}/mcp", json=body, headers={"Authorization": f"Bearer {token}"})
            return response.status_code

        async def tenant_call() -> str:
            async with ws_client(server, tokens["acme"]) as client:
                return (await client.call_tool("allocations", {})).structured_content["tenant"]

        await tenant_call()  # the first request starts the revocation listener beside it
        for _ in range(100):
            if app.tools.store.listening:
                break
            await asyncio.sleep(0.05)
        assert await tenant_call() == "acme"  # now known live
        flood = asyncio.gather(*(attempt(t) for t in junk))
        during = await tenant_call()
        statuses = await flood
    assert set(statuses) <= {401, 429} and 401 in statuses, sorted(set(statuses))
    assert during == "acme" and await tenant_call() == "acme"


@SERVED
async def test_a_token_revoked_while_its_websocket_is_open_is_cut_off_within_seconds(server, tokens):
    store = tokens["store"]
    token_id, token = await store.create("acme")
    transport = WebSocketTransport(f"ws://{server}/ws", token=token)
    async with Client(transport) as client:
        assert (await client.call_tool("allocations", {})).structured_content["tenant"] == "acme"
        assert await store.revoke(token_id)
        started, failure = time.monotonic(), None
        while failure is None and time.monotonic() - started < 10:
            try:  # the socket is closed under the client: its next call fails
                await client.call_tool("allocations", {})
            except MCPError as exc:
                failure = exc
            await asyncio.sleep(0.1)
        assert failure is not None and "closed" in str(failure).lower(), failure
        assert transport.websocket.close_code == 1008 and transport.websocket.close_reason == "the token was revoked"
    async with httpx.AsyncClient() as http:  # and its next HTTP request is refused at once
        response = await http.post(
            f"http://{server}/mcp",
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 401


@SERVED
async def test_a_huge_prompt_is_refused_before_any_work_on_every_tool(server, tokens):
    import psutil

    huge = "Ok. Why? " * 20000  # 180 KB: once split into 40000 parts with the context copied into each
    rss = psutil.Process().memory_info().rss
    async with ws_client(server, tokens["acme"]) as client:
        for tool, args in (("plan", {}), ("fuse", {}), ("classify", {})):
            result = await client.call_tool(tool, {"prompt": huge, **args})
            assert result.is_error and "prompt is 180000 characters; at most 131072" in result.content[0].text
        many = "Ok. Why? " * 10000  # within the size limit, but far more parts than a request may have
        result = await client.call_tool("plan", {"prompt": many})
        assert result.is_error and "more than 16 parts" in result.content[0].text
    assert psutil.Process().memory_info().rss - rss < 100 * 2**20  # no gigabytes of fragment text


@SERVED
async def test_each_tenant_has_its_own_share_of_calls_sessions_and_connections(test_catalog, tokens):
    from apps.mcp_server import create_app
    from homeskillet.settings import Settings

    tight = Settings(tenant_rate="4/minute", tenant_max_sessions=1, tenant_max_connections=2)
    with serving(create_app(test_catalog, settings=tight)) as where:
        async with ws_client(where, tokens["acme"]) as acme:
            for _ in range(4):
                await acme.call_tool("allocations", {})
            with pytest.raises(MCPError, match="over its rate of 4/minute") as refused:
                await acme.call_tool("allocations", {})
            assert refused.value.error.code == -32029
            async with ws_client(where, tokens["globex"]) as globex:  # another tenant's calls are its own
                assert (await globex.call_tool("allocations", {})).structured_content["tenant"] == "globex"
            async with ws_client(where, tokens["acme"]):
                with pytest.raises(websockets.exceptions.InvalidStatus):  # a third connection of acme
                    async with ws_client(where, tokens["acme"]):
                        pass
        async with httpx.AsyncClient() as http:
            init = INITIALIZE
            headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {tokens['globex']}"}
            first = await http.post(f"http://{where}/mcp", json=init, headers=headers)
            second = await http.post(f"http://{where}/mcp", json=init, headers=headers)
            assert first.status_code == 200 and second.status_code == 429 and "sessions open" in second.text
            ended = await http.delete(
                f"http://{where}/mcp", headers={**headers, "mcp-session-id": first.headers["mcp-session-id"]}
            )
            assert ended.status_code < 300
            assert (await http.post(f"http://{where}/mcp", json=init, headers=headers)).status_code == 200


@SERVED
async def test_a_tenant_sees_no_internal_endpoint_and_no_other_tenant(server, tokens, monkeypatch, assert_no_leaks):
    from connectors.ledger import new_allocation_id

    services = runtime.services(APP["app"].tools.catalog_path)
    model = next(m for m in services.catalog.models if m.name == "echo")
    allocation = await services.local.allocate(
        allocation_id=new_allocation_id(), tenant="acme", request_id="meta", pool="roomy", model=model, wait_s=5
    )
    try:
        async with ws_client(server, tokens["acme"]) as client:
            shown = (await client.call_tool("allocations", {})).structured_content["allocations"]
            catalog = json.loads((await client.read_resource("homeskillet://catalog")).contents[0].text)
        mine = next(a for a in shown if a["allocation_id"] == allocation.allocation_id)
        assert "endpoint" not in mine and "127.0.0.1" not in json.dumps(shown)
        assert catalog["tenant"] == "acme" and "globex" not in json.dumps(catalog)
    finally:
        await services.local.release(allocation.allocation_id, "acme")


@SERVED
async def test_a_revocation_missed_while_the_listener_was_down_ends_the_connection_once_it_is_back(
    test_catalog, tokens
):
    import asyncpg

    from apps.mcp_server import create_app

    store = tokens["store"]
    app = create_app(test_catalog)
    with serving(app) as where:
        token_id, token = await store.create("acme")
        transport = WebSocketTransport(f"ws://{where}/ws", token=token)
        async with Client(transport) as client:
            assert (await client.call_tool("allocations", {})).structured_content["tenant"] == "acme"
            for _ in range(100):  # the listener starts beside the first request
                if app.tools.store.listening:
                    break
                await asyncio.sleep(0.05)
            assert app.tools.store.listening
            conn = await asyncpg.connect(app.tools.store._dsn)
            try:  # PostgreSQL drops the listener's connection (a restart, a network cut)
                await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'")
            finally:
                await conn.close()
            for _ in range(100):
                if not app.tools.store.listening:
                    break
                await asyncio.sleep(0.05)
            assert await store.revoke(token_id)  # announced while nobody listens
            async with ws_client(where, tokens["globex"]) as other:  # any request starts listening again
                await other.call_tool("allocations", {})
            for _ in range(100):
                if transport.websocket.close_code is not None:
                    break
                await asyncio.sleep(0.05)
            assert transport.websocket.close_code == 1008
            assert transport.websocket.close_reason == "the token was revoked"
