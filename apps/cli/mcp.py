"""`mcp serve` runs the MCP server (apps.mcp_server); `tokens create|list|revoke` manage the API
tokens it accepts, one tenant each, stored hashed (connectors.tokens)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.table import Table

from apps.cli.running import console, errors, fail, use_local_prefect
from homeskillet.errors import HomeskilletError
from homeskillet.settings import get_settings


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    catalog: Annotated[
        str | None, typer.Option(help="Catalog file (default: HOMESKILLET_CATALOG or packaged).")
    ] = None,
) -> None:
    """Serve MCP (tools fuse, plan, classify, allocations) to clients holding a token (and, beside
    it, the OpenAI-compatible API: `homeskillet serve`). A tenant's concurrent requests are capped
    by its covenant's max_concurrent_requests, across every server process."""
    _serve(host, port, catalog)


def serve_all(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    catalog: Annotated[
        str | None, typer.Option(help="Catalog file (default: HOMESKILLET_CATALOG or packaged).")
    ] = None,
) -> None:
    """Serve every surface on one port: the OpenAI-compatible /v1 API, MCP (/mcp, /ws), /healthz."""
    _serve(host, port, catalog)


def _serve(host: str, port: int, catalog: str | None) -> None:
    api_url = use_local_prefect()
    import uvicorn

    from apps.mcp_server import create_app

    errors.print(
        f"OpenAI-compatible API on http://{host}:{port}/v1 · MCP on http://{host}:{port}/mcp and "
        f"ws://{host}:{port}/ws · Prefect {api_url}",
        highlight=False,
    )
    uvicorn.run(
        create_app(catalog, host=host),
        host=host,
        port=port,
        log_level="warning",
        ws_max_size=4 << 20,  # the app answers frames over 1 MiB with a JSON-RPC error; this is the hard stop
    )


def _token_store():
    from connectors.tokens import TokenStore

    return TokenStore.open(get_settings().pgdata)


def tokens_create(
    tenant: Annotated[str, typer.Option(help="The catalog tenant the token acts as.")],
    as_json: Annotated[bool, typer.Option("--json", help='Print {"tenant", "token"}.')] = False,
) -> None:
    """Create a token for a tenant; it is printed once and only its hash is stored."""
    from homeskillet import catalog as cat
    from tasks import runtime

    try:
        cat.check_tenant(runtime.catalog(), tenant)

        async def main():
            return await (await _token_store()).create(tenant)

        token_id, token = asyncio.run(main())
    except HomeskilletError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"tenant": tenant, "token": token, "token_id": token_id}))
        return
    print(token)
    errors.print(f"token {token_id} for tenant {tenant}; shown once, store it now", highlight=False)


def tokens_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's tokens.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List tokens (id, tenant, created, revoked); never the tokens themselves."""
    from connectors.tokens import created_iso

    async def main():
        return await (await _token_store()).list(tenant)

    try:
        rows = [
            {
                "token_id": r["token_id"],
                "tenant": r["tenant"],
                "created_at": created_iso(r["created_at"]),
                "revoked_at": created_iso(r["revoked_at"]),
            }
            for r in asyncio.run(main())
        ]
    except HomeskilletError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} token(s)")
    for column in ("token_id", "tenant", "created_at", "revoked_at"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["token_id"], r["tenant"], r["created_at"], r["revoked_at"] or "")
    console.print(table)


def tokens_revoke(token: Annotated[str, typer.Argument(help="The token id (tok-…) or the token itself.")]) -> None:
    """Revoke a token: the server refuses it from the next connection or request on."""

    async def main():
        return await (await _token_store()).revoke(token)

    try:
        revoked = asyncio.run(main())
    except HomeskilletError as exc:
        fail(exc)
    if not revoked:
        fail(ValueError("no live token matches"))
    errors.print("revoked", highlight=False)
