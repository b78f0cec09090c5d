"""B against everyone's share of a server (a real MCP server on loopback): floods of made-up
tokens, sessions and calls, a huge prompt, a capacity hog, a revoked token on an open socket, and
the metadata a tenant must not see (other tenants, the pool's fill, internal endpoints).

An attack on availability is refused when the server turns it away (401/429, a JSON-RPC -32029,
an InvalidRequest, a quota) and A's own `fuse`, run while the attack goes on, answers within its
baseline (A alone, measured first) + SLACK_S. The baseline is the control.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time

import httpx
import psutil

from apps.isolation.mcp import INITIALIZE, serve
from apps.isolation.report import A, B, Report, Target
from connectors.ledger import new_allocation_id
from homeskillet.errors import CapacityTimeout, CovenantViolation, public_message

SLACK_S = 2.0
WINDOW_S = 1.1  # past the default per-tenant rate's window (30/second)
FLOOD = 800
HUGE = "Ok. Why? " * 20000  # 180 KB; split the old way, 40000 parts with the context copied into each
SAY_HI = {"prompt": "Say hi.", "constraints": {"max_tokens": 2}}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def attacks(report: Report, target: Target) -> None:
    # the flood on a server of its own: it leaves loopback over its failed-authentication rate,
    # which would refuse the other rows' new tokens (every client here shares one address)
    async with serve(target.catalog_path) as client, _beside_a(report, client, target.tokens[A]) as beside:
        await beside(
            f"flood the server with {FLOOD} made-up tokens at once",
            "Streamable HTTP Authorization",
            lambda: _made_up_tokens(client.base),
        )
    async with serve(target.catalog_path) as client, _beside_a(report, client, target.tokens[A]) as beside:
        tokens = target.tokens
        await beside(
            "open Streamable HTTP sessions without end as B",
            "initialize without mcp-session-id",
            lambda: _sessions(client.base, tokens[B]),
        )
        await beside(
            "flood the allocations tool as B", "MCP allocations tool (WebSocket)", lambda: _calls(client, tokens[B])
        )
        await beside(
            "freeze the server with a huge prompt", "MCP plan tool (WebSocket)", lambda: _huge(client, tokens[B])
        )
        await _hog(report, target)
        await _revoked(report, target, client)
        async with client(tokens[A]) as a:
            await _metadata(report, target, a, client)


@contextlib.asynccontextmanager
async def _beside_a(report: Report, client, token: str):
    """Yields `beside(attack, path, attempt)`: runs `attempt` (→ refused, detail) with A's fuse
    beside it and makes the row; A's baseline (alone, best of two) is measured first."""
    async with client(token) as a:

        async def a_fuse() -> tuple[bool, float]:
            started = time.perf_counter()
            result = await a.call_tool("fuse", SAY_HI)
            return not result.is_error, time.perf_counter() - started

        runs = [await a_fuse() for _ in range(2)]
        baseline = min(t for _, t in runs)
        control = all(ok for ok, _ in runs)

        async def beside(attack: str, path: str, attempt) -> None:
            (refused, detail), (ok, took) = await asyncio.gather(attempt(), _after(0.2, a_fuse()))
            report.check(
                attack,
                path,
                refused and ok and took <= baseline + SLACK_S,
                control=control,
                detail=f"{detail}; A's fuse {took:.2f}s (baseline {baseline:.2f}s + {SLACK_S:g}s)",
            )
            await asyncio.sleep(WINDOW_S)  # the attacker's rate window passes before the next row

        yield beside


async def _after(delay_s: float, work):
    await asyncio.sleep(delay_s)
    return await work


async def _made_up_tokens(base: str) -> tuple[bool, str]:
    """The flood from a process of its own, as an attacker's would be (not sharing the server's)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOODER, base, str(FLOOD), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    counts = {int(k): v for k, v in json.loads(out or b"{}").items()}
    return bool(counts) and set(counts) <= {401, 429}, f"answers {counts}"


FLOODER = """
import asyncio, json, secrets, sys
import httpx

async def main(base, n):
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    junk = [f"hs_{secrets.token_urlsafe(32)}" if i % 2 else f"made-up-{i}" for i in range(n)]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=f"http://{base}", limits=limits, timeout=120) as http:
        async def one(token):
            try:
                return (await http.post("/mcp", json=body, headers={"Authorization": f"Bearer {token}"})).status_code
            except httpx.HTTPError:
                return 0  # no answer at all counts against the server
        statuses = await asyncio.gather(*(one(t) for t in junk))
    print(json.dumps({s: statuses.count(s) for s in sorted(set(statuses))}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _sessions(base: str, token: str) -> tuple[bool, str]:
    headers = {**ACCEPT, "Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"http://{base}", timeout=30) as http:
        answers = [await http.post("/mcp", json=INITIALIZE, headers=headers) for _ in range(40)]
        opened = [
            r.headers["mcp-session-id"] for r in answers if r.status_code == 200 and "mcp-session-id" in r.headers
        ]
        for session in opened:
            await http.delete("/mcp", headers={**headers, "mcp-session-id": session})
    refused = sum(r.status_code == 429 for r in answers)
    return refused > 0 and len(opened) + refused == len(answers), f"{len(opened)} opened, {refused} refused (429)"


async def _calls(client, token: str) -> tuple[bool, str]:
    async def burst(connection) -> list[str]:
        async def one() -> str:
            try:
                await connection.call_tool("allocations", {})
                return "answered"
            except Exception as exc:  # the SDK raises the server's JSON-RPC error
                return "limited" if "-32029" in repr(exc) or "rate" in str(exc) or "in flight" in str(exc) else "failed"

        return await asyncio.gather(*(one() for _ in range(60)))

    async with client(token) as c1, client(token) as c2:
        outcomes = [o for batch in await asyncio.gather(burst(c1), burst(c2)) for o in batch]
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    return counts.get("limited", 0) > 0 and "failed" not in counts, f"calls {counts}"


async def _huge(client, token: str) -> tuple[bool, str]:
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    async with client(token) as b:
        result = await b.call_tool("plan", {"prompt": HUGE})
    took = time.perf_counter() - started
    grown = (psutil.Process().memory_info().rss - before) / 2**20
    text = result.content[0].text if result.content else ""
    refused = result.is_error and "InvalidRequest" in text and grown < 100
    return refused, f"refused in {took:.2f}s ({text[:80]}); memory +{grown:.0f} MB"


async def _hog(report: Report, target: Target) -> None:
    """B, with the catalog's default covenant, takes slices of the largest local pool until refused:
    its quota stops it short of the pool, and A still gets a slice."""
    services = target.services
    ledger = await services.ledger()
    covenant = services.covenant(B)
    pool = max((p for p in services.catalog.pools if p.backend == "local"), key=lambda p: p.tflops)
    model = min((m for m in services.catalog.models if m.serving.kind == "llama_cpp"), key=lambda m: m.tflops)
    running = await ledger.admit(B, "iso-hog", covenant)  # what the flow does first: B's quota synced
    held, why = [], "never refused"
    try:
        while len(held) * model.tflops <= pool.tflops:
            try:
                held.append(
                    await services.local.allocate(
                        allocation_id=new_allocation_id(),
                        tenant=B,
                        request_id="iso-hog",
                        pool=pool.id,
                        model=model,
                        wait_s=0.5,
                    )
                )
            except (CovenantViolation, CapacityTimeout) as exc:
                why = f"{type(exc).__name__}: {exc}"
                break
        mine = await services.local.allocate(
            allocation_id=new_allocation_id(), tenant=A, request_id="iso-hog-a", pool=pool.id, model=model, wait_s=5
        )
        await services.local.release(mine.allocation_id, A)
        took = sum(a.tflops for a in held)
        report.check(
            "hold every slice of a pool as B (no covenant of its own)",
            f"backend allocate on {pool.id}",
            "CovenantViolation" in why and took < pool.tflops,
            control=True,
            detail=f"B held {took:g} of {pool.tflops:g} TFLOPS, then {why[:90]}; A got a slice",
        )
    finally:
        for allocation in held:
            await services.local.release(allocation.allocation_id, B)
        await ledger.end_request(running)


async def _revoked(report: Report, target: Target, client) -> None:
    token_id, token = await target.store.create(B)
    async with client(token) as b:
        before = (await b.call_tool("allocations", {})).structured_content["tenant"] == B
        await target.store.revoke(token_id)
        started, after = time.perf_counter(), "answered for 5 s"
        while time.perf_counter() - started < 5:
            try:
                await b.call_tool("allocations", {})
            except Exception as exc:  # the socket was closed under the client
                after = f"closed after {time.perf_counter() - started:.2f}s ({type(exc).__name__})"
                break
            await asyncio.sleep(0.1)
    report.check(
        "keep using a revoked token on an open WebSocket",
        "MCP WebSocket after revocation",
        after.startswith("closed"),
        control=before,
        detail=after,
    )


async def _metadata(report: Report, target: Target, a, client) -> None:
    async with client(target.tokens[B]) as b:
        catalog = json.loads((await b.read_resource("homeskillet://catalog")).contents[0].text)
    report.check(
        "read other tenants' ids from the catalog as B",
        "MCP resource homeskillet://catalog",
        A not in json.dumps(catalog),
        control=catalog.get("tenant") == B and bool(catalog.get("models")),
    )
    mine = (await a.call_tool("allocations", {})).structured_content["allocations"]
    shown = json.dumps(mine)
    report.check(
        "read where A's slice is served (an internal endpoint)",
        "MCP allocations tool",
        "endpoint" not in shown and "127.0.0.1" not in shown,
        control=target.allocation.allocation_id in shown,
    )
    services = target.services
    pool = next(p for p in services.catalog.pools if p.id == target.allocation.pool)  # A holds a slice of it
    ledger = await services.ledger()
    probe = "iso-probe-" + secrets.token_hex(4)  # a tenant without a quota: only the pool's room refuses it
    try:  # the whole pool while A holds a slice of it: the ledger's own message names the pool's fill
        taken = await ledger.reserve(
            allocation_id=new_allocation_id(),
            tenant=probe,
            request_id="iso-fill",
            pool=pool.id,
            model=target.allocation.model,
            tflops=pool.tflops,
            vram_gb=pool.vram_gb,
            wait_s=0,
        )
        await ledger.release(taken.allocation_id, probe)
        told, internal = "reserved", ""
    except CapacityTimeout as exc:
        internal, told = str(exc), public_message(exc, "iso-fill")
    report.check(
        "learn how full the shared pool is from a capacity error",
        "CapacityTimeout as a tenant is told",
        not any(word in told for word in ("TFLOPS", " GB", pool.id)),
        control="TFLOPS" in internal and pool.id in internal,
        detail=told[:120],
    )
