"""The allocation ledger: pools, their capacity, and every logical allocation, in PostgreSQL.

Every process that runs flows on this machine (the CLI, workers, tests) shares it. Capacity is
enforced under a row lock on the pool, so two processes can never over-commit a pool.
A lease ends when it is released, when its expiry passes, or at once when its holder process
(on this host) is gone: expiry is the backstop for holders that crashed without releasing.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import asyncpg
import psutil
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from connectors import postgres
from homeskillet.errors import AllocationNotFound, CapacityTimeout, NoRoute, ServiceError
from homeskillet.schemas import Allocation, PoolSpec

EPS = 1e-9
HOST = socket.gethostname()

SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    id text PRIMARY KEY,
    tier text NOT NULL,
    tflops double precision NOT NULL,
    vram_gb double precision NOT NULL,
    price_per_hour double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS allocations (
    allocation_id text PRIMARY KEY,
    tenant text NOT NULL,
    request_id text NOT NULL,
    pool text NOT NULL REFERENCES pools(id),
    model text NOT NULL,
    tflops double precision NOT NULL,
    vram_gb double precision NOT NULL,
    endpoint text NOT NULL DEFAULT '',
    holder text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'active',
    ended_at timestamptz
);
ALTER TABLE allocations ADD COLUMN IF NOT EXISTS backend text NOT NULL DEFAULT 'local';
CREATE INDEX IF NOT EXISTS allocations_active_pool ON allocations (pool) WHERE state = 'active';
"""

COLUMNS = (
    "allocation_id, tenant, request_id, backend, pool, model, tflops, vram_gb, endpoint, created_at, "
    "lease_expires_at, state"
)


def new_allocation_id() -> str:
    """Unguessable: 128 random bits."""
    return "alloc-" + secrets.token_urlsafe(16)


def holder_id() -> str:
    """This process, in a form that tells a live holder from a dead one (pids get reused)."""
    pid = psutil.Process().pid
    return f"{HOST}:{pid}:{psutil.Process(pid).create_time():.3f}"


def _holder_alive(holder: str) -> bool:
    host, pid, created = holder.rsplit(":", 2)
    if host != HOST:
        return True  # another machine's process: only its lease expiry can end it
    try:
        return f"{psutil.Process(int(pid)).create_time():.3f}" == created
    except psutil.Error:
        return False


def _lost_connection(exc: BaseException) -> bool:
    """PostgreSQL restarting, shutting down or unreachable: worth trying again on a new connection."""
    return isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | OSError) or isinstance(
        exc, asyncpg.exceptions.OperatorInterventionError
    )


def _reconnecting(method):
    """Run a ledger call again on a fresh connection while PostgreSQL is away (a restart), up to
    the ledger's retry_s; after that, a ServiceError that says so. Every call is safe to repeat:
    release and set_endpoint are idempotent, and reserve finds its own row if a lost reply hid
    that it committed."""

    @functools.wraps(method)
    async def call(self: Ledger, *args, **kwargs):
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_lost_connection), stop=stop_after_delay(self.retry_s),
                wait=wait_exponential(multiplier=0.05, max=1.0), reraise=True,
            ):  # fmt: skip
                with attempt:
                    return await method(self, *args, **kwargs)
        except Exception as exc:
            if _lost_connection(exc):
                raise ServiceError(
                    f"the ledger's PostgreSQL did not answer for {self.retry_s:g}s ({type(exc).__name__}: {exc})"
                ) from None
            raise

    return call


_opened: dict[tuple[Path, float], Ledger] = {}
_opening = threading.Lock()


def open_ledger(pgdata: Path, lease_s: float) -> Ledger:
    """The ledger in this PostgreSQL, started and given its tables once per process (blocking:
    call it in a thread from async code)."""
    key = (pgdata.resolve(), lease_s)
    with _opening:
        if key not in _opened:
            postgres.ensure_postgres(pgdata)
            ledger = Ledger(postgres.dsn(pgdata, "homeskillet"), lease_s=lease_s)
            asyncio.run(ledger.create_schema())
            _opened[key] = ledger
        return _opened[key]


class Ledger:
    def __init__(self, dsn: str, lease_s: float, retry_s: float = 30.0):
        self._dsn = dsn
        self._lease_s = lease_s
        self.retry_s = retry_s
        self._holder = holder_id()
        # one pool per event loop: a connection belongs to the loop that opened it
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncpg.Pool] = weakref.WeakKeyDictionary()
        self._pool_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection from this event loop's pool (a new connection costs ~4 ms; a pooled one
        ~0.1 ms, and a fragment makes about four ledger calls). No transaction outlives a call."""
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            for closed in [other for other in self._pools if other.is_closed()]:
                del self._pools[closed]  # its loop is gone, and with it any use of its connections
            async with self._pool_locks.setdefault(loop, asyncio.Lock()):
                pool = self._pools.get(loop)
                if pool is None:
                    pool = self._pools[loop] = await asyncpg.create_pool(
                        self._dsn, min_size=0, max_size=8, max_inactive_connection_lifetime=60
                    )
        async with pool.acquire() as conn:
            yield conn

    async def create_schema(self) -> None:
        """Create the tables if needed (alone in its transaction: DDL takes table locks)."""
        await postgres.apply_schema(self._dsn, "homeskillet.schema", SCHEMA)

    @_reconnecting
    async def sync_pools(self, pools: list[PoolSpec]) -> None:
        """Add or update these pools.

        Lock order, which keeps writers free of deadlocks: pool rows first, in id order (this
        method and `held` lock them all, `reserve` just its own), then allocation rows.
        """
        async with self._connect() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('homeskillet.pools'))")
                await conn.execute("SELECT id FROM pools ORDER BY id FOR UPDATE")
                await conn.executemany(
                    """INSERT INTO pools (id, tier, tflops, vram_gb, price_per_hour) VALUES ($1, $2, $3, $4, $5)
                       ON CONFLICT (id) DO UPDATE SET tier = $2, tflops = $3, vram_gb = $4, price_per_hour = $5""",
                    [(p.id, p.tier, p.tflops, p.vram_gb, p.price_per_hour) for p in sorted(pools, key=lambda p: p.id)],
                )

    @_reconnecting
    async def capacities(self) -> dict[str, tuple[float, float]]:
        """Every pool's capacity: id → (TFLOPS, GB of VRAM)."""
        async with self._connect() as conn:
            rows = await conn.fetch("SELECT id, tflops, vram_gb FROM pools")
        return {r["id"]: (r["tflops"], r["vram_gb"]) for r in rows}

    @_reconnecting
    async def reserve(
        self,
        *,
        allocation_id: str,
        tenant: str,
        request_id: str,
        pool: str,
        model: str,
        tflops: float,
        vram_gb: float,
        wait_s: float,
        backend: str = "local",
    ) -> Allocation:
        """Reserve a slice of the pool under the given id (from new_allocation_id), waiting up to
        wait_s for room; raise CapacityTimeout after. `backend` names who serves it."""
        deadline = time.monotonic() + wait_s
        delay = 0.05
        while True:
            async with self._connect() as conn:
                async with conn.transaction():
                    row = await conn.fetchrow("SELECT tflops, vram_gb FROM pools WHERE id = $1 FOR UPDATE", pool)
                    mine = await conn.fetchrow(
                        f"SELECT {COLUMNS} FROM allocations WHERE allocation_id = $1 AND tenant = $2",
                        allocation_id, tenant,
                    )  # fmt: skip
                    if mine is not None:  # a retry after a lost reply: it committed the first time
                        return Allocation(**dict(mine))
                    if row is None:
                        raise NoRoute(f"pool {pool!r} is not in the ledger")
                    if tflops > row["tflops"] + EPS or vram_gb > row["vram_gb"] + EPS:
                        raise NoRoute(
                            f"pool {pool!r} ({row['tflops']:g} TFLOPS, {row['vram_gb']:g} GB) is too small "
                            f"for {model} ({tflops:g} TFLOPS, {vram_gb:g} GB)"
                        )
                    await self._expire(conn, pool)
                    used = await conn.fetchrow(
                        "SELECT coalesce(sum(tflops), 0) AS t, coalesce(sum(vram_gb), 0) AS v "
                        "FROM allocations WHERE pool = $1 AND state = 'active'",
                        pool,
                    )
                    free_t, free_v = row["tflops"] - used["t"], row["vram_gb"] - used["v"]
                    if tflops <= free_t + EPS and vram_gb <= free_v + EPS:
                        record = await conn.fetchrow(
                            f"""INSERT INTO allocations
                                (allocation_id, tenant, request_id, pool, model, tflops, vram_gb, holder,
                                 lease_expires_at, backend)
                                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9), $10)
                                RETURNING {COLUMNS}""",
                            allocation_id,
                            tenant,
                            request_id,
                            pool,
                            model,
                            tflops,
                            vram_gb,
                            self._holder,
                            self._lease_s,
                            backend,
                        )
                        return Allocation(**dict(record))
            if time.monotonic() >= deadline:
                raise CapacityTimeout(
                    f"pool {pool!r} had no room for {model} ({tflops:g} TFLOPS, {vram_gb:g} GB) within "
                    f"{wait_s:g}s: {free_t:g} TFLOPS and {free_v:g} GB free of {row['tflops']:g} and "
                    f"{row['vram_gb']:g}"
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    @_reconnecting
    async def set_endpoint(self, allocation_id: str, endpoint: str) -> Allocation:
        async with self._connect() as conn:
            record = await conn.fetchrow(
                f"UPDATE allocations SET endpoint = $2 WHERE allocation_id = $1 RETURNING {COLUMNS}",
                allocation_id,
                endpoint,
            )
        return Allocation(**dict(record))

    @_reconnecting
    async def release(self, allocation_id: str, tenant: str) -> datetime:
        """End the tenant's allocation; releasing one already ended is a no-op that returns its end.

        Another tenant's allocation, or an unknown id, raises AllocationNotFound with the same
        message, so a tenant cannot even learn whether another tenant's id exists.
        """
        async with self._connect() as conn:
            ended = await conn.fetchval(
                """UPDATE allocations SET state = 'released', ended_at = now()
                   WHERE allocation_id = $1 AND tenant = $2 AND state = 'active' RETURNING ended_at""",
                allocation_id,
                tenant,
            )
            if ended is None:
                ended = await conn.fetchval(
                    "SELECT ended_at FROM allocations WHERE allocation_id = $1 AND tenant = $2",
                    allocation_id,
                    tenant,
                )
        if ended is None:
            raise AllocationNotFound(f"tenant {tenant!r} holds no allocation {allocation_id!r}")
        return ended

    @_reconnecting
    async def held(self, tenant: str | None = None, backend: str | None = None) -> list[Allocation]:
        """Active allocations (all tenants or one, all backends or one), after ending those whose
        lease is over."""
        async with self._connect() as conn:
            async with conn.transaction():
                await conn.execute("SELECT id FROM pools ORDER BY id FOR UPDATE")  # lock order: see sync_pools
                await self._expire(conn, None)
                rows = await conn.fetch(
                    f"SELECT {COLUMNS} FROM allocations WHERE state = 'active' AND ($1::text IS NULL OR tenant = $1) "
                    "AND ($2::text IS NULL OR backend = $2) ORDER BY created_at",
                    tenant,
                    backend,
                )
        return [Allocation(**dict(r)) for r in rows]

    async def _expire(self, conn: asyncpg.Connection, pool: str | None) -> None:
        """End active leases that passed their expiry or whose holder process is gone."""
        holders = await conn.fetch(
            "SELECT DISTINCT holder FROM allocations WHERE state = 'active' AND ($1::text IS NULL OR pool = $1)",
            pool,
        )
        dead = [h["holder"] for h in holders if not _holder_alive(h["holder"])]
        await conn.execute(
            """UPDATE allocations SET state = 'expired', ended_at = now()
               WHERE state = 'active' AND ($1::text IS NULL OR pool = $1)
               AND (lease_expires_at < now() OR holder = ANY($2::text[]))""",
            pool,
            dead,
        )
