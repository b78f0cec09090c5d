"""`homeskillet isolation-report`: every way tenant B could reach tenant A's work, tried for real.

A (acme) holds a slice and a finished request result, locally and on hosted·ai (the emulator on
loopback, each tenant its own team and key in its own Secret block); B (globex) then tries to
release, list and read them through the backends, the ledger's listings, hosted·ai's API with its
own key and the MCP server (a real one on loopback, both transports' auth path), to ride on A's
MCP session and subscription, to reach A's pod, to run with A's tenant or Secret block, to read
A's telemetry and spend, and to reach the Prefect API from off the host. Each attack has a
control — A doing the same to its own work — so a broken set-up can never pass for a refusal.
Secrets are looked for where they must not be: reprs, the token table, Prometheus metrics, B's
answers and errors. What docs/operating.md documents as the operator's (the cost report, the telemetry
dataset, Prometheus) is a row "operator surface", not a tenant's way in.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml

from connectors.hostedai import HostedAIClient, items
from connectors.hostedai_backend import HostedAIBackend
from connectors.ledger import new_allocation_id
from homeskillet.errors import (
    AllocationNotFound,
    CovenantViolation,
    HomeskilletError,
    HostedAIError,
    InvalidRequest,
    MissingCredentials,
)
from homeskillet.schemas import Allocation, HostedAICredentials, ModelSpec
from homeskillet.settings import Settings, get_settings
from tasks import credentials, runtime

A, B = "acme", "globex"
GROUPS = ("backend", "results", "mcp", "network", "covenant", "hostedai", "secret_blocks", "telemetry", "secrets")
# What is not refused but is not a tenant's way in either: docs/operating.md documents it as the operator's.
OPERATOR = "operator surface"


@dataclass
class Attack:
    attack: str
    path: str
    result: str  # "refused", "ALLOWED" (the guarantee broke), "control failed" (the test is void), "n/a", OPERATOR
    detail: str = ""


class _Report:
    def __init__(self) -> None:
        self.rows: list[Attack] = []

    def check(self, attack: str, path: str, refused: bool, control: bool = True, detail: str = "") -> None:
        result = "control failed" if not control else ("refused" if refused else "ALLOWED")
        self.rows.append(Attack(attack, path, result, detail))


@dataclass
class _Hosted:
    """A's and B's work on hosted·ai: one allocation each, on their own teams' subscriptions."""

    backend: HostedAIBackend
    pool: str  # the catalog pool
    model: ModelSpec
    allocations: dict[str, Allocation]
    credentials: dict[str, HostedAICredentials]
    subscriptions: dict[str, int]  # tenant → its subscription's id, as the backend made it
    said_to_b: list[str] = field(default_factory=list)  # every answer and error B got: no key may be in it

    def client(self, tenant: str, **update) -> HostedAIClient:
        return HostedAIClient(self.credentials[tenant].model_copy(update=update))

    def keys(self) -> list[str]:
        return [c.api_key.get_secret_value() for c in self.credentials.values()]


async def _refused(call: Awaitable, *errors: type[BaseException]) -> tuple[bool, str, object]:
    """(refused, what was said, what came back) for one attempt."""
    try:
        value = await call
    except errors as exc:
        return True, str(exc), None
    return False, "done", value


async def run_attacks(
    catalog_path: str | None = None, lend_emulator: bool = True, groups: tuple[str, ...] = GROUPS
) -> list[Attack]:
    """Set up A's work, try every attack of the groups as B, clean up; the rows of the report.

    lend_emulator: start the hosted·ai emulator in this process and lend A and B its teams as their
    Secret blocks for the run (where either has credentials already, the hosted·ai rows say n/a);
    False: their blocks already point at an emulator (the tests' session one)."""
    from connectors.tokens import TokenStore

    report = _Report()
    services = runtime.services(catalog_path)
    local = services.local
    model = next(m for m in services.catalog.models if m.serving.kind == "llama_cpp")
    pool = next(p for p in services.catalog.pools if p.backend == "local")
    request_id = "iso-" + uuid.uuid4().hex[:12]
    allocation = await local.allocate(
        allocation_id=new_allocation_id(), tenant=A, request_id=request_id, pool=pool.id, model=model, wait_s=30
    )
    store = await TokenStore.open(get_settings().pgdata)
    made = {tenant: await store.create(tenant) for tenant in (A, B)}
    tokens = {tenant: token for tenant, (_, token) in made.items()}
    await store.save_result(A, request_id, {"request_id": request_id, "tenant": A, "answer": "A's answer"})
    try:
        if "backend" in groups:
            await _backend_attacks(report, services, allocation)
        if "results" in groups:
            await _result_attacks(report, store, request_id)
        if "mcp" in groups:
            await _mcp_attacks(report, catalog_path, tokens, allocation.allocation_id, request_id)
        if "network" in groups:
            _network_attacks(report)
        if "covenant" in groups:
            await _covenant_attacks(report, services)
        hosted_groups = {"hostedai", "secret_blocks", "secrets"} & set(groups)
        async with _hosted_work(services, request_id, lend_emulator, bool(hosted_groups)) as hosted:
            if isinstance(hosted, str):
                report.rows.append(Attack("reach A's work on hosted·ai", "hosted·ai emulator", "n/a", hosted))
                hosted = None
            elif hosted is not None and "hostedai" in groups:
                await _hostedai_api_attacks(report, hosted)
                await _pod_attacks(report, hosted)
                await _hostedai_backend_attacks(report, hosted)  # last: a release that works ends A's share
            if hosted is not None and "secret_blocks" in groups:
                await _secret_block_attacks(report, services, hosted, catalog_path, tokens)
            if "telemetry" in groups:
                await _telemetry_attacks(report, services, catalog_path, tokens, allocation)
            if "secrets" in groups:
                await _secret_checks(report, store, tokens, hosted)
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


@contextlib.asynccontextmanager
async def _mcp_server(catalog_path):
    """A real MCP server on loopback for the attacks; yields a client maker (token, transport)."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from apps.mcp_server import create_app
    from connectors.processes import serve_in_thread
    from connectors.ws_transport import WebSocketTransport

    with serve_in_thread(create_app(catalog_path), "MCP server", log_level="error") as url:
        base = url.removeprefix("http://")

        def client(token: str, transport: str = "WebSocket") -> Client:
            if transport == "WebSocket":
                return Client(WebSocketTransport(f"ws://{base}/ws", token=token))
            headers = {"Authorization": f"Bearer {token}"}
            return Client(
                streamable_http_client(f"http://{base}/mcp", http_client=create_mcp_http_client(headers=headers))
            )

        client.base = base  # type: ignore[attr-defined]
        yield client


async def _mcp_attacks(report: _Report, catalog_path, tokens: dict, allocation_id: str, request_id: str) -> None:
    async with _mcp_server(catalog_path) as client:
        for transport in ("Streamable HTTP", "WebSocket"):
            async with client(tokens[A], transport) as a, client(tokens[B], transport) as b:
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
        await _session_attacks(report, client.base, tokens)


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


@contextlib.contextmanager
def _catalog_with(services, covenant_of_b: dict | None = None, extra_tenants: tuple[str, ...] = ()):
    """A copy of the catalog (a temporary file) with B's covenant replaced and tenants added."""
    data = yaml.safe_load(services.catalog_path.read_text())
    for tenant in data["tenants"]:
        if tenant["id"] == B and covenant_of_b is not None:
            tenant["covenant"] = covenant_of_b
    data["tenants"] += [{"id": t} for t in extra_tenants]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "catalog.yaml"
        path.write_text(yaml.safe_dump(data))
        yield path


async def _covenant_attacks(report: _Report, services) -> None:
    """B's covenant (in a copy of the catalog) allows one model on preemptible pools: asking for
    another model or tier through the flow is refused before anything is allocated, and a request
    that asks for nothing in particular is routed inside the covenant."""
    from flows.fusion import fuse_request

    local = [m.name for m in services.catalog.models if m.serving.kind == "llama_cpp"]
    allowed, other = local[0], local[-1]
    with _catalog_with(services, {"allowed_models": [allowed], "allowed_tiers": ["preemptible"]}) as path:
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


# --- hosted·ai ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _hosted_work(services, request_id: str, lend_emulator: bool, wanted: bool):
    """A's and B's allocations on hosted·ai (None when no group needs them; a reason, as a string,
    when the tenants hold credentials that are not the emulator's to lend)."""
    if not wanted:
        yield None
        return
    from apps.loadtest import start_emulator

    lent = None
    if lend_emulator:
        try:
            lent = await start_emulator("", [A, B])
        except InvalidRequest as exc:
            yield f"not tried: {exc}"
            return
    backend = services.backend("hostedai")
    pool = next(p for p in services.catalog.pools if p.backend == "hostedai")
    model = next(m for m in services.catalog.models if m.serving.kind == "llama_cpp")
    allocations: dict[str, Allocation] = {}
    try:
        for tenant in (A, B):
            allocations[tenant] = await backend.allocate(
                allocation_id=new_allocation_id(),
                tenant=tenant,
                request_id=request_id,
                pool=pool.id,
                model=model,
                wait_s=30,
            )
        made = backend.subscriptions()
        yield _Hosted(
            backend,
            pool.id,
            model,
            allocations,
            {t: await credentials.hostedai_credentials(t) for t in (A, B)},
            {t: made[(t, pool.id)] for t in (A, B)},
        )
    finally:
        for tenant, allocation in allocations.items():
            with contextlib.suppress(AllocationNotFound):
                await backend.release(allocation.allocation_id, tenant)
        await backend.shutdown()
        if lent is not None:
            await lent.stop()


async def _hostedai_backend_attacks(report: _Report, hosted: _Hosted) -> None:
    """B against A's hosted·ai allocation through the backend: list, verify, allocate in A's
    ledger pool, share A's subscription, release."""
    backend, mine = hosted.backend, hosted.allocations[A]
    theirs = hosted.allocations[B]
    report.check(
        "list A's hosted·ai allocations as B",
        "hostedai backend.held(tenant=B)",
        mine.allocation_id not in [a.allocation_id for a in await backend.held(B)],
        control=mine.allocation_id in [a.allocation_id for a in await backend.held(A)],
    )
    answer = await backend.verify(mine.model_copy(update={"tenant": B}))
    report.check(
        "verify A's hosted·ai allocation as B (and make A's share be forgotten)",
        "hostedai backend.verify(A's id, tenant B)",
        backend.subscriptions().get((A, hosted.pool)) == hosted.subscriptions[A],
        detail=f"answered from B's own share ({answer}); A's share kept",
    )
    refused, detail, got = await _refused(
        backend.allocate(
            allocation_id=new_allocation_id(),
            tenant=B,
            request_id="iso-attack",
            pool=mine.pool,
            model=hosted.model,
            wait_s=1,
        ),
        HomeskilletError,
    )
    if got is not None:
        await backend.release(got.allocation_id, B)
    hosted.said_to_b.append(detail)
    report.check(
        "allocate in A's hosted·ai share as B", f"hostedai backend.allocate(pool={mine.pool})", refused, detail=detail
    )
    a_team, b_team = hosted.client(A), hosted.client(B)
    pool_of = {s.id: s.pool_id for s in await a_team.subscriptions()}
    b_live = await b_team.find(pool_of.get(hosted.subscriptions[A], -1))
    report.check(
        "use A's hosted·ai subscription for B's fragments",
        "HostedAIBackend share per (tenant, pool), made with B's own key",
        hosted.subscriptions[B] != hosted.subscriptions[A]
        and b_live is not None
        and b_live.id == hosted.subscriptions[B]
        and theirs.endpoint != mine.endpoint,
        control=hosted.subscriptions[A] in pool_of,
        detail=f"A's subscription {hosted.subscriptions[A]}, B's {hosted.subscriptions[B]} (B's team)",
    )
    refused, detail, _ = await _refused(backend.release(mine.allocation_id, B), AllocationNotFound)
    hosted.said_to_b.append(detail)
    kept = mine.allocation_id in [a.allocation_id for a in await backend.held(A)]
    report.check(
        "release A's hosted·ai allocation id as B",
        "hostedai backend.release(A's id, B)",
        refused and kept and await a_team.exists(hosted.subscriptions[A]),
        detail=detail,
    )


async def _hostedai_api_attacks(report: _Report, hosted: _Hosted) -> None:
    """B with its own key against A's subscription and team on hosted·ai's API."""
    a_team, b_team = hosted.client(A), hosted.client(B)
    sub = hosted.subscriptions[A]
    pool_id = next((s.pool_id for s in await a_team.subscriptions() if s.id == sub), -1)
    a_team_id = hosted.credentials[A].team_id
    listed = await b_team.subscriptions()
    hosted.said_to_b.append(repr(listed))
    report.check(
        "list A's hosted·ai subscriptions as B",
        "HostedAIClient.subscriptions (B's key; the API's list carries other teams' items)",
        all(s.team_id != a_team_id for s in listed),
        control=pool_id != -1,
    )
    attempts = (
        (
            "read A's pod connection info as B",
            "GET /gpuaas/connection-info (B's key, A's subscription)",
            lambda: b_team.inference_url(sub),
        ),
        (
            "retire A's subscription as B",
            "POST /gpuaas/pool/unsubscribe (B's key, A's subscription)",
            lambda: b_team.call(
                "POST",
                "/gpuaas/pool/unsubscribe",
                body={"subscription_id": sub, "team_id": b_team.team_id, "pool_id": pool_id},
            ),
        ),
        (
            "act as A's team with B's key",
            "GET /gpuaas/pool-subscription?team_id=A's team (B's key)",
            lambda: hosted.client(B, team_id=a_team_id).subscriptions(),
        ),
    )
    for attack, path, call in attempts:
        refused, detail, _ = await _refused(call(), HostedAIError)
        hosted.said_to_b.append(detail)
        report.check(attack, path, refused and await a_team.exists(sub), detail=detail)


async def _pod_attacks(report: _Report, hosted: _Hosted) -> None:
    """B learns the name of A's pod from the API's leaky list and calls it at the URLs its own
    pod's URL suggests."""
    b_team = hosted.client(B)
    data = await b_team.call("GET", "/gpuaas/pool-subscription", params={"team_id": b_team.team_id})
    pods = {
        str(i.get("team_id")): [p["pod_name"] for p in i.get("pods") or []] for i in items(data) if isinstance(i, dict)
    }
    theirs = hosted.allocations[B].endpoint
    base = hosted.credentials[B].url.rstrip("/")
    own = next((p for p in pods.get(hosted.credentials[B].team_id, []) if p in theirs), None)
    guesses = [
        url
        for pod in pods.get(hosted.credentials[A].team_id, [])
        for url in ({theirs.replace(own, pod)} if own else set()) | {f"{base}/pods/{pod}/v1"}
    ]
    headers = {"X-API-Key": hosted.credentials[B].api_key.get_secret_value()}
    async with httpx.AsyncClient(timeout=10) as http:
        control = (await http.get(f"{hosted.allocations[A].endpoint}/models")).status_code == 200
        answers = {url: (await http.get(f"{url}/models", headers=headers)).status_code for url in guesses}
    reached = [url for url, status in answers.items() if status == 200]
    report.check(
        "reach A's pod endpoint as B",
        "the pod's OpenAI-compatible URL, A's pod name from the list",
        not reached,
        control=control,
        detail=f"reached {reached}" if reached else f"tried {len(guesses)} URLs: HTTP {sorted(set(answers.values()))}",
    )


# --- Secret blocks across flow runs ---------------------------------------------------------


async def _secret_block_attacks(report: _Report, services, hosted: _Hosted, catalog_path, tokens: dict) -> None:
    """B's flow runs load B's Secret block only: B cannot name A's tenant or block in a request,
    a tenant id cannot alias A's block, and B without a block gets no one else's."""
    from homeskillet.catalog import load_catalog

    fields = {"prompt": "Say hi.", "constraints": {"backend": "hostedai", "max_tokens": 2}}
    async with _mcp_server(catalog_path) as client, client(tokens[B]) as b:
        ran = await b.call_tool("fuse", {**fields, "tenant": A})
        named = await b.call_tool(
            "fuse", {**fields, "constraints": {**fields["constraints"], "credentials": credentials.block_name(A)}}
        )
    data = ran.structured_content or {}
    said = [" ".join(getattr(c, "text", "") for c in answer.content) for answer in (ran, named)]
    hosted.said_to_b += said
    report.check(
        "run B's request as tenant A (A's Secret block)",
        "MCP fuse(tenant=A) with B's token, backend hostedai",
        data.get("tenant") == B,
        control=not ran.is_error,
        detail=f"ran as {data.get('tenant')!r}",
    )
    report.check(
        "name A's Secret block in B's request",
        "MCP fuse constraints.credentials",
        named.is_error,
        detail=said[1],
    )
    with _catalog_with(services, extra_tenants=(A.upper(),)) as path:
        try:
            load_catalog(path)
            refused, detail = False, "loaded: both tenants would load the same block"
        except InvalidRequest as exc:
            refused, detail = True, str(exc)
    report.check(
        "alias A's Secret block by a tenant id in another case",
        f"catalog tenant {A.upper()!r} → Secret block {credentials.block_name(A.upper())!r}",
        refused,
        detail=detail,
    )
    await credentials.delete_hostedai_credentials(B)
    try:
        refused, detail, got = await _refused(credentials.hostedai_credentials(B), MissingCredentials)
    finally:
        await credentials.save_hostedai_credentials(B, hosted.credentials[B])
    hosted.said_to_b.append(detail)
    report.check(
        "use A's Secret block when B has none",
        "tasks.credentials.hostedai_credentials(B)",
        refused and credentials.block_name(B) in detail,
        detail=detail if refused else f"got team {got.team_id}",
    )


# --- telemetry and cost ---------------------------------------------------------------------


async def _telemetry_attacks(report: _Report, services, catalog_path, tokens: dict, allocation) -> None:
    """B asks for A's figures where a tenant can ask: MCP offers no telemetry, cost or spend, and
    B's budget refusal names B's spend only. The cost report, the telemetry dataset, Prometheus and
    `covenant show` are the operator's (docs/operating.md), rows of their own."""
    from flows.fusion import fuse_request

    words = ("telemetry", "cost", "spend", "usage", "metric", "report", "budget")
    async with _mcp_server(catalog_path) as client, client(tokens[B]) as b:
        names = [t.name for t in (await b.list_tools()).tools]
        names += [str(r.uri) for r in (await b.list_resources()).resources]
        names += [t.uri_template for t in (await b.list_resource_templates()).resource_templates]
    exposing = [n for n in names if any(w in n.lower() for w in words)]
    report.check(
        "read A's telemetry or cost figures as B",
        "MCP tools and resources (WebSocket)",
        not exposing,
        control=bool(names),
        detail=f"B sees {', '.join(names)}",
    )
    ledger = await services.ledger()
    spent = [(await ledger.spend(A))[0]]
    with _catalog_with(services, {"budget_usd_per_day": 1e-12}) as path:

        async def refusal() -> str:
            request = fuse_request(prompt="Say hi.", tenant=B, constraints={"max_tokens": 2}, catalog_path=str(path))
            refused, detail, _ = await _refused(request, CovenantViolation)
            return detail if refused else "ran"

        before = await refusal()
        await ledger.record_spend(allocation.allocation_id, A, allocation.request_id, 5e-7)
        spent.append((await ledger.spend(A))[0])
        after = await refusal()
    report.check(
        "learn A's spend from B's budget refusal",
        "CovenantViolation budget_usd_per_day, before and after A spends",
        before == after != "ran",
        control=spent[1] > spent[0],
        detail=after,
    )
    for attack, path, documented in (
        ("read A's cost figures", "homeskillet cost-report (flow cost-report)", "cost per tenant, for the operator"),
        (
            "read A's telemetry",
            "Parquet dataset HOMESKILLET_HOME/telemetry, Prometheus on 127.0.0.1",
            "records and series per tenant, for the operator",
        ),
        ("read A's usage and spend", "homeskillet covenant show acme", "usage per tenant, for the operator"),
    ):
        report.rows.append(Attack(attack, path, OPERATOR, f"docs: {documented}; no tenant (MCP) path to it"))


# --- secrets --------------------------------------------------------------------------------


async def _secret_checks(report: _Report, store, tokens: dict, hosted: _Hosted | None) -> None:
    """Keys and tokens where they must not be: reprs and dumps, the token table, Prometheus, and
    everything B was answered on the way."""
    from prefect.blocks.system import Secret
    from prometheus_client import generate_latest

    key = "hai-" + uuid.uuid4().hex
    made_up = HostedAICredentials(url="https://panel.example/api", api_key=key, team_id="t")
    settings = Settings(hostedai_url=made_up.url, hostedai_api_key=key, hostedai_team_id="t")
    for path, text in (
        ("HostedAICredentials", repr(made_up) + str(made_up) + made_up.model_dump_json()),
        ("Settings (HOMESKILLET_HOSTEDAI_API_KEY)", repr(settings) + str(settings) + settings.model_dump_json()),
        ("HostedAIClient", repr(HostedAIClient(made_up))),
    ):
        report.check("see a hosted·ai key in a repr or dump", path, key not in text)
    keys = [key, *(hosted.keys() if hosted else [])]
    if hosted is not None:
        secret = await Secret.aload(credentials.block_name(A))
        backend = hosted.backend
        report.check(
            "see A's hosted·ai key in a repr",
            f"HostedAIBackend and its shares, Secret block {credentials.block_name(A)!r}",
            not any(k in repr(backend) + repr(vars(backend)) + repr(secret) + str(secret) for k in hosted.keys()),
        )
        report.check(
            "find A's hosted·ai key in what B was answered",
            "B's hosted·ai refusals, listings, MCP answers and errors",
            not any(k in text for k in hosted.keys() for text in hosted.said_to_b),
            control=bool(hosted.said_to_b),
            detail=f"{len(hosted.said_to_b)} answers searched",
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
        "Prometheus /metrics (names, labels, values)",
        not any(t in metrics for t in [*tokens.values(), *keys]),
        detail=f"{len(keys)} hosted·ai keys and {len(tokens)} tokens looked for",
    )


def broken(rows: list[Attack]) -> bool:
    return any(r.result not in ("refused", "n/a", OPERATOR) for r in rows)
