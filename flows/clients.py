"""One pair of Prefect API clients per event loop for every flow run a long-lived process makes
(the MCP server, benchmarks, load tests). Without it each flow run opens its own: a new
connection pool and TLS context per run, and a sync client for the server's default result
storage lookup (its share of a request's time: docs/scaling.md)."""

from __future__ import annotations

import asyncio
import weakref

from prefect.context import AsyncClientContext, SyncClientContext

_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[SyncClientContext, AsyncClientContext]] = (
    weakref.WeakKeyDictionary()
)


async def lend_clients() -> None:
    """Flow runs started from the calling asyncio task (and the tasks it creates) use this loop's
    shared clients, opened on first use and kept for the life of the loop. Prefect's engines take
    a client context that is already set instead of opening their own."""
    loop = asyncio.get_running_loop()
    if loop not in _shared:
        sync, async_ = SyncClientContext(), AsyncClientContext()
        sync.client.__enter__()
        await async_.client.__aenter__()
        _shared[loop] = (sync, async_)
    sync, async_ = _shared[loop]
    SyncClientContext.__var__.set(sync)
    AsyncClientContext.__var__.set(async_)
