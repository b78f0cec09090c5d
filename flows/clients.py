"""One Prefect API client for every flow run a process makes in process (CLI, MCP server,
benchmarks). Without it, each flow run opens its own clients: a new connection pool and TLS
context per run (about a tenth of a request's orchestration time here, by py-spy), and a
per-run sync client for the server's default result storage lookup."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prefect.context import AsyncClientContext, SyncClientContext


@asynccontextmanager
async def prefect_clients() -> AsyncIterator[None]:
    """Flow runs started inside share one sync and one async client (Prefect's own contexts)."""
    with SyncClientContext.get_or_create():
        async with AsyncClientContext.get_or_create():
            yield
