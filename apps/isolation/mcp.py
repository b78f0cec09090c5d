"""B against A's work through the MCP server (a real one on loopback): A's allocations and result
over both transports, A's Streamable HTTP session with B's token, no token or a made-up one.
`serve` is the server that the other groups' MCP attacks use too."""

from __future__ import annotations

import contextlib
import json

import httpx

from apps.isolation.report import A, B, Report, Target


@contextlib.asynccontextmanager
async def serve(catalog_path):
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


async def attacks(report: Report, target: Target) -> None:
    tokens, allocation_id, request_id = target.tokens, target.allocation.allocation_id, target.request_id
    async with serve(target.catalog_path) as client:
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


# the JSON-RPC request that opens a Streamable HTTP session
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "isolation-report", "version": "1"},
    },
}


async def _session_attacks(report: Report, base: str, tokens: dict) -> None:
    initialize = INITIALIZE
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
