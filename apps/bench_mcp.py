"""What the MCP layer adds to a request: `classify` and `fuse` round trips over Streamable HTTP (the
SDK's client) and over WebSocket (ours), against the same request as a direct `fuse_request` call.

The MCP server app runs in this process on a free loopback port (real HTTP and WebSocket), with
a token of its own for the tenant, revoked at the end. `run_benchmark` returns the medians
(`report` words them); `homeskillet bench-mcp` runs it on the local Prefect server and prints them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

from connectors.processes import serve_in_thread
from connectors.tokens import TokenStore
from homeskillet.settings import get_settings

PROMPT = "1. Say one.\n2. Say two.\n3. Say three."
CLASSIFY = "What is the capital of France?"


async def _median_s(rounds: int, call: Callable[[], Awaitable[object]]) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def run_benchmark(
    catalog_path: str | None = None,
    tenant: str = "demo",
    prompt: str = PROMPT,
    constraints: dict | None = None,
    classify_rounds: int = 30,
    fuse_rounds: int = 5,
) -> dict[str, float]:
    """Median `classify` round trip (ms) and `fuse` call (s) on each transport, and the median
    direct `fuse_request` (s) for the same prompt, tenant and constraints. Needs the Prefect server
    (the flows) and PostgreSQL (the token, the ledger)."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from apps.mcp_server import create_app
    from connectors.ws_transport import WebSocketTransport
    from flows.fusion import fuse_request
    from homeskillet import catalog as cat
    from homeskillet.schemas import Constraints
    from tasks import runtime

    cat.check_tenant(runtime.catalog(catalog_path), tenant)
    constraints = constraints or {"max_tokens": 16}
    store = await TokenStore.open(get_settings().pgdata)
    token_id, token = await store.create(tenant)

    async def fuse_directly() -> None:
        await fuse_request(
            prompt=prompt, tenant=tenant, constraints=Constraints(**constraints), catalog_path=catalog_path
        )

    figures: dict[str, float] = {}
    try:
        await fuse_directly()  # model servers and clients warm: not counted
        with serve_in_thread(create_app(catalog_path), "MCP server") as url:
            clients = {
                "http": lambda: Client(
                    streamable_http_client(
                        f"{url}/mcp", http_client=create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
                    )
                ),
                "ws": lambda: Client(WebSocketTransport(f"{url.replace('http', 'ws', 1)}/ws", token=token)),
            }
            for name, make in clients.items():
                async with make() as client:

                    async def classify(client=client) -> None:
                        await client.call_tool("classify", {"prompt": CLASSIFY})

                    async def fuse(client=client, name=name) -> None:
                        result = await client.call_tool("fuse", {"prompt": prompt, "constraints": constraints})
                        if result.is_error:
                            raise RuntimeError(f"fuse over {name} failed: {result.content}")

                    figures[f"classify_{name}_ms"] = await _median_s(classify_rounds, classify) * 1000
                    figures[f"fuse_{name}_median_s"] = await _median_s(fuse_rounds, fuse)
        figures["fuse_direct_median_s"] = await _median_s(fuse_rounds, fuse_directly)
    finally:
        await store.revoke(token_id)
    return {k: round(v, 3) for k, v in figures.items()}


def report(figures: dict[str, float]) -> str:
    lines = [f"classify round trip over {t}: {figures[f'classify_{t}_ms']:.1f} ms (median)" for t in ("http", "ws")]
    lines += [f"fuse over {t}: {figures[f'fuse_{t}_median_s']:.3f} s (median)" for t in ("http", "ws")]
    lines.append(f"fuse_request directly: {figures['fuse_direct_median_s']:.3f} s (median)")
    return "\n".join(lines)
