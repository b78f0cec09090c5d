"""`homeskillet isolation-report`: every way tenant B could reach tenant A's work, tried for real.

A (acme) holds a slice and a finished request result; B (globex) then tries to release, list and
read them through the backends, the ledger's listings and the MCP server (a real one on loopback,
both transports' auth path), to ride on A's MCP session, and to reach the Prefect API from off the
host. Each attack has a control — A doing the same to its own work — so a broken set-up can never
pass for a refusal. Secrets are looked for where they must not be: reprs, the token table,
Prometheus metrics, error messages.
"""

from __future__ import annotations

import json
import socket
import uuid
from dataclasses import dataclass

import httpx
import psutil

from homeskillet.errors import AllocationNotFound
from homeskillet.schemas import HostedAICredentials
from homeskillet.settings import get_settings
from tasks import runtime

A, B = "acme", "globex"


@dataclass
class Attack:
    attack: str
    path: str
    result: str  # "refused", "ALLOWED" (the guarantee broke) or "control failed" (the test is void)
    detail: str = ""


class _Report:
    def __init__(self) -> None:
        self.rows: list[Attack] = []

    def check(self, attack: str, path: str, refused: bool, control: bool = True, detail: str = "") -> None:
        result = "control failed" if not control else ("refused" if refused else "ALLOWED")
        self.rows.append(Attack(attack, path, result, detail))


async def run_attacks(catalog_path: str | None = None) -> list[Attack]:
    """Set up A's work, try every attack as B, clean up; the rows of the report."""
    from connectors.tokens import TokenStore

    report = _Report()
    services = runtime.services(catalog_path)
    local = services.local
    model = next(m for m in services.catalog.models if m.serving.kind == "llama_cpp")
    pool = next(p for p in services.catalog.pools if p.backend == "local")
    request_id = "iso-" + uuid.uuid4().hex[:12]
    from connectors.ledger import new_allocation_id

    allocation = await local.allocate(
        allocation_id=new_allocation_id(), tenant=A, request_id=request_id, pool=pool.id, model=model, wait_s=30
    )
    store = await TokenStore.open(get_settings().pgdata)
    made = {tenant: await store.create(tenant) for tenant in (A, B)}
    tokens = {tenant: token for tenant, (_, token) in made.items()}
    await store.save_result(A, request_id, {"request_id": request_id, "tenant": A, "answer": "A's answer"})
    try:
        await _backend_attacks(report, services, allocation)
        await _result_attacks(report, store, request_id)
        await _mcp_attacks(report, catalog_path, tokens, allocation.allocation_id, request_id)
        _network_attacks(report)
        await _covenant_attacks(report, services)
        await _secret_checks(report, store, tokens)
    finally:
        try:
            await local.release(allocation.allocation_id, A)
        except AllocationNotFound:
            pass
        for token_id, _ in made.values():
            await store.revoke(token_id)
    return report.rows


async def _backend_attacks(report: _Report, services, allocation) -> None:
    local = services.local
    held_by_b = [a.allocation_id for a in await local.held(B)]
    report.check(
        "list A's allocations as B",
        "backend.held(tenant=B)",
        allocation.allocation_id not in held_by_b,
        control=allocation.allocation_id in [a.allocation_id for a in await local.held(A)],
    )
    everything_b = [a.allocation_id for a in await services.held(B)]
    report.check(
        "list A's allocations as B",
        "homeskillet allocations --tenant B (Services.held)",
        allocation.allocation_id not in everything_b,
    )
    try:
        await local.release(allocation.allocation_id, B)
        refused, detail = False, "released"
    except AllocationNotFound as exc:
        refused, detail = True, str(exc)
    still = allocation.allocation_id in [a.allocation_id for a in await local.held(A)]
    report.check("release A's allocation id as B", "backend.release(A's id, B)", refused and still, detail=detail)
    try:
        await local.release("alloc-" + "x" * 22, B)
        unknown = ""
    except AllocationNotFound as exc:
        unknown = str(exc)
    report.check(
        "tell A's id from an unknown one by B's error",
        "backend.release",
        detail.replace(allocation.allocation_id, "ID") == unknown.replace("alloc-" + "x" * 22, "ID"),
        detail="the same message for both",
    )


async def _result_attacks(report: _Report, store, request_id: str) -> None:
    report.check(
        "read A's request result as B",
        "TokenStore.result(B, A's request id)",
        await store.result(B, request_id) is None,
        control=(await store.result(A, request_id) or {}).get("answer") == "A's answer",
    )


async def _mcp_attacks(report: _Report, catalog_path, tokens: dict, allocation_id: str, request_id: str) -> None:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from connectors.processes import serve_in_thread
    from connectors.ws_transport import WebSocketTransport
    from homeskillet.mcp_server import create_app

    with serve_in_thread(create_app(catalog_path), "MCP server", log_level="error") as url:
        base = url.removeprefix("http://")

        def http(token: str) -> Client:
            headers = {"Authorization": f"Bearer {token}"}
            return Client(
                streamable_http_client(f"http://{base}/mcp", http_client=create_mcp_http_client(headers=headers))
            )

        def ws(token: str) -> Client:
            return Client(WebSocketTransport(f"ws://{base}/ws", token=token))

        for transport, client in (("Streamable HTTP", http), ("WebSocket", ws)):
            async with client(tokens[A]) as a, client(tokens[B]) as b:
                mine = (await a.call_tool("allocations", {})).structured_content
                theirs = (await b.call_tool("allocations", {})).structured_content
                report.check(
                    "list A's allocations as B",
                    f"MCP allocations tool ({transport})",
                    allocation_id not in json.dumps(theirs),
                    control=allocation_id in json.dumps(mine),
                )
                uri = f"homeskillet://requests/{request_id}"
                own = await _read(a, uri)
                other = await _read(b, uri)
                report.check(
                    "read A's request result as B",
                    f"MCP resource requests/{{id}} ({transport})",
                    other is None,
                    control=own is not None and "A's answer" in own,
                )
        await _session_attacks(report, base, tokens)


async def _read(client, uri: str) -> str | None:
    try:
        result = await client.read_resource(uri)
    except Exception:  # the SDK raises the server's error: refused
        return None
    return "".join(getattr(c, "text", "") for c in result.contents)


async def _session_attacks(report: _Report, base: str, tokens: dict) -> None:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "isolation-report", "version": "1"},
        },
    }
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=f"http://{base}", timeout=30) as client:
        opened = await client.post("/mcp", json=initialize, headers={**accept, "Authorization": f"Bearer {tokens[A]}"})
        session = opened.headers.get("mcp-session-id")
        hijack = await client.post(
            "/mcp",
            json=listing,
            headers={**accept, "Authorization": f"Bearer {tokens[B]}", "mcp-session-id": session or ""},
        )
        report.check(
            "use A's MCP session with B's token",
            "Streamable HTTP mcp-session-id",
            hijack.status_code == 404,
            control=opened.status_code == 200 and bool(session),
            detail=f"HTTP {hijack.status_code}",
        )
        for name, headers in (("no token", {}), ("a made-up token", {"Authorization": "Bearer hsk_not-a-token"})):
            answer = await client.post("/mcp", json=initialize, headers={**accept, **headers})
            report.check(
                f"call the MCP server with {name}",
                "Streamable HTTP",
                answer.status_code == 401,
                detail=f"HTTP {answer.status_code}",
            )


async def _covenant_attacks(report: _Report, services) -> None:
    """B's covenant (in a copy of the catalog) allows one model on preemptible pools: asking for
    another model or tier through the flow is refused before anything is allocated, and a request
    that asks for nothing in particular is routed inside the covenant."""
    import tempfile
    from pathlib import Path

    import yaml

    from flows.fusion import fuse_request
    from homeskillet.errors import CovenantViolation

    data = yaml.safe_load(services.catalog_path.read_text())
    local = [m["name"] for m in data["models"] if m.get("serving", {}).get("kind", "llama_cpp") == "llama_cpp"]
    allowed, other = local[0], local[-1]
    for tenant in data["tenants"]:
        if tenant["id"] == B:
            tenant["covenant"] = {"allowed_models": [allowed], "allowed_tiers": ["preemptible"]}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "catalog.yaml"
        path.write_text(yaml.safe_dump(data))
        for term, constraints in (
            ("allowed_models", {"allowed_models": [other]}),
            ("allowed_tiers", {"tier": "dedicated"}),
        ):
            try:
                await fuse_request(
                    prompt="Say hi.", tenant=B, constraints={**constraints, "max_tokens": 4}, catalog_path=str(path)
                )
                refused, detail = False, "ran"
            except CovenantViolation as exc:
                refused, detail = exc.term == term, str(exc)
            report.check(
                f"widen B's covenant ({term}) in a request", "fuse_request constraints", refused, detail=detail
            )
        result = await fuse_request(prompt="Say hi.", tenant=B, constraints={"max_tokens": 4}, catalog_path=str(path))
        inside = all(f.model == allowed and f.tier == "preemptible" for f in result.fragments)
        report.check(
            "be routed outside B's covenant",
            "fuse_request without constraints",
            inside,
            detail=f"ran {result.fragments[0].model} on {result.fragments[0].tier}",
        )


def _network_attacks(report: _Report) -> None:
    port = get_settings().prefect_port
    addresses = [
        a.address
        for nic in psutil.net_if_addrs().values()
        for a in nic
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    if not addresses:
        report.rows.append(Attack("reach the Prefect API from off the host", "no non-loopback address", "n/a"))
        return
    with socket.socket() as sock:
        sock.settimeout(2)
        reached = sock.connect_ex((addresses[0], port)) == 0
    with socket.socket() as sock:
        sock.settimeout(2)
        control = sock.connect_ex(("127.0.0.1", port)) == 0
    report.check(
        "reach the Prefect API from off the host",
        f"{addresses[0]}:{port}",
        not reached,
        control=control,
        detail="the embedded server listens on 127.0.0.1 only",
    )


async def _secret_checks(report: _Report, store, tokens: dict) -> None:
    from prometheus_client import generate_latest

    key = "hai-" + uuid.uuid4().hex
    credentials = HostedAICredentials(url="https://panel.example/api", api_key=key, team_id="t")
    report.check(
        "see a hosted·ai key in a repr or dump",
        "HostedAICredentials",
        key not in repr(credentials) + str(credentials) + credentials.model_dump_json(),
    )
    conn = await store._connect()
    try:
        rows = json.dumps([dict(r) for r in await conn.fetch("SELECT * FROM api_tokens")], default=str)
    finally:
        await conn.close()
    report.check(
        "read MCP tokens from the database",
        "api_tokens table",
        not any(t in rows for t in tokens.values()),
        detail="only SHA-256 digests are stored",
    )
    metrics = generate_latest().decode()
    report.check(
        "see a token or key in the metrics",
        "Prometheus /metrics",
        not any(t in metrics for t in [*tokens.values(), key]),
    )


def broken(rows: list[Attack]) -> bool:
    return any(r.result not in ("refused", "n/a") for r in rows)
