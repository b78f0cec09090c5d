"""The allocation ledger: pools, their capacity, and every logical allocation, in PostgreSQL.

Every process that runs flows on this machine (the CLI, workers, tests) shares it. Capacity is
enforced under a row lock on the pool, so two processes can never over-commit a pool.
A lease ends when it is released, when its expiry passes, or at once when its holder process
(on this host) is gone: expiry is the backstop for holders that crashed without releasing.

Covenants: a tenant's row holds the TFLOPS/VRAM it may hold at once, checked in `reserve` under
the pool row's lock and then the tenant row's; `requests` holds the requests running now (per
holder process, so a dead process's rows do not count) for concurrency caps; `spend` holds each
allocation's cost, for budgets: first its worst case, reserved before the model call under the
tenant row's lock (`reserve_spend`), then what it really cost (`record_spend` settles it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, TypeVar

import asyncpg
import psutil
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

from connectors import postgres
from homeskillet.errors import AllocationNotFound, CapacityTimeout, CovenantViolation, NoRoute, ServiceError
from homeskillet.schemas import EPS, Allocation, Covenant, PoolSpec

T = TypeVar("T")
HOST = socket.gethostname()
log = logging.getLogger(__name__)

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
CREATE INDEX IF NOT EXISTS allocations_active_tenant ON allocations (tenant) WHERE state = 'active';
CREATE TABLE IF NOT EXISTS tenants (
    id text PRIMARY KEY,
    max_tflops double precision,
    max_vram_gb double precision,
    covenant_version text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS requests (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    request_id text NOT NULL,
    holder text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz
);
CREATE INDEX IF NOT EXISTS requests_running ON requests (tenant) WHERE ended_at IS NULL;
CREATE TABLE IF NOT EXISTS spend (
    allocation_id text PRIMARY KEY,
    tenant text NOT NULL,
    request_id text NOT NULL,
    cost_usd double precision NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS spend_tenant_at ON spend (tenant, at);
ALTER TABLE spend ADD COLUMN IF NOT EXISTS state text NOT NULL DEFAULT 'settled';
ALTER TABLE spend ADD COLUMN IF NOT EXISTS holder text;
ALTER TABLE spend ADD COLUMN IF NOT EXISTS reserved_usd double precision;
CREATE INDEX IF NOT EXISTS spend_reserved ON spend (tenant) WHERE state = 'reserved';
"""

# the start of this UTC day and month, as timestamptz
DAY = "(date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"
MONTH = "(date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')"

COLUMNS = (
    "allocation_id, tenant, request_id, backend, pool, model, tflops, vram_gb, endpoint, created_at, "
    "lease_expires_at, state"
)


async def _settled(work: Awaitable[T]) -> T:
    """Run `work` to its end even when the caller is cancelled meanwhile, then pass the
    cancellation on. A reservation is committed or rolled back before whoever was cancelled goes
    on to release it (else a release could run before the reservation's commit lands, and miss it);
    a spend is written although the request it was spent for is being cancelled."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await task
        raise


class BudgetUse(NamedTuple):
    """A tenant's spend against its budgets, US$: settled this UTC day and month, and the worst
    cases reserved for calls that have not settled yet (they count against both)."""

    day_usd: float
    month_usd: float
    reserved_usd: float


def new_allocation_id() -> str:
    """Unguessable: 128 random bits."""
    return "alloc-" + secrets.token_urlsafe(16)


def new_request_key() -> str:
    """The key a running request is recorded under (`admit`, `end_request`)."""
    return "req-" + secrets.token_urlsafe(12)


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
    """PostgreSQL restarting, shutting down or unreachable: worth trying again on a new connection.
    InternalClientError is a connection a restart left mid-operation ("another operation is in
    progress"): the pool discards it, and the call runs again on another."""
    return isinstance(
        exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | asyncpg.InternalClientError | OSError
    ) or isinstance(exc, asyncpg.exceptions.OperatorInterventionError)


def _reconnecting(method):
    """Run a ledger call again on a fresh connection while PostgreSQL is away (a restart), up to
    the ledger's retry_s; after that, a ServiceError that says so. Every call is safe to repeat:
    release and set_endpoint are idempotent, and reserve finds its own row if a lost reply hid
    that it committed."""

    @functools.wraps(method)
    async def call(self: Ledger, *args, **kwargs):
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_lost_connection),
                stop=stop_after_delay(self.retry_s),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                reraise=True,
            ):
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
        self._pools = postgres.LoopPools(dsn, max_size=8)

    def _connect(self):
        """A connection from this event loop's pool (a new connection costs ~4 ms; a pooled one
        ~0.1 ms, and a fragment makes about four ledger calls). No transaction outlives a call."""
        return self._pools.connection()

    async def create_schema(self) -> None:
        """Create the tables if needed (alone in its transaction: DDL takes table locks)."""
        await postgres.apply_schema(self._dsn, "homeskillet.schema", SCHEMA)

    @_reconnecting
    async def sync_pools(self, pools: list[PoolSpec]) -> None:
        """Add or update these pools.

        Lock order, which keeps writers free of deadlocks: pool rows first, in id order (this
        method locks them all, `reserve` just its own), then the tenant row, then allocation rows.
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
        wait_s for room in the pool and in the tenant's quota (its covenant's max_tflops and
        max_vram_gb, synced by `admit`); raise CapacityTimeout or CovenantViolation after.
        `backend` names who serves it."""
        deadline = time.monotonic() + wait_s
        delay = 0.05
        over_quota: CovenantViolation | None = None
        row = free_t = free_v = None

        async def attempt() -> Allocation | None:
            nonlocal row, free_t, free_v, over_quota
            async with self._connect() as conn:
                async with conn.transaction():
                    row = await conn.fetchrow("SELECT tflops, vram_gb FROM pools WHERE id = $1 FOR UPDATE", pool)
                    mine = await conn.fetchrow(
                        f"SELECT {COLUMNS} FROM allocations WHERE allocation_id = $1 AND tenant = $2",
                        allocation_id,
                        tenant,
                    )
                    if mine is not None:  # a retry after a lost reply: it committed the first time
                        return Allocation(**dict(mine))
                    if row is None:
                        raise NoRoute(f"pool {pool!r} is not in the ledger")
                    if tflops > row["tflops"] + EPS or vram_gb > row["vram_gb"] + EPS:
                        raise NoRoute(
                            f"pool {pool!r} ({row['tflops']:g} TFLOPS, {row['vram_gb']:g} GB) is too small "
                            f"for {model} ({tflops:g} TFLOPS, {vram_gb:g} GB)"
                        )
                    quota = await conn.fetchrow(  # lock order: the pool row, then the tenant row
                        "SELECT max_tflops, max_vram_gb FROM tenants WHERE id = $1 FOR UPDATE", tenant
                    )
                    await self._expire(conn, pool)
                    over_quota = await self._over_quota(conn, tenant, quota, tflops, vram_gb)
                    used = await conn.fetchrow(
                        "SELECT coalesce(sum(tflops), 0) AS t, coalesce(sum(vram_gb), 0) AS v "
                        "FROM allocations WHERE pool = $1 AND state = 'active'",
                        pool,
                    )
                    free_t, free_v = row["tflops"] - used["t"], row["vram_gb"] - used["v"]
                    if over_quota is None and tflops <= free_t + EPS and vram_gb <= free_v + EPS:
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
            return None

        while True:
            allocation = await _settled(attempt())
            if allocation is not None:
                return allocation
            if time.monotonic() >= deadline:
                if over_quota is not None:
                    raise over_quota
                raise CapacityTimeout(
                    f"pool {pool!r} had no room for {model} ({tflops:g} TFLOPS, {vram_gb:g} GB) within "
                    f"{wait_s:g}s: {free_t:g} TFLOPS and {free_v:g} GB free of {row['tflops']:g} and "
                    f"{row['vram_gb']:g}"
                )
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    async def _over_quota(
        self, conn: asyncpg.Connection, tenant: str, quota: asyncpg.Record | None, tflops: float, vram_gb: float
    ) -> CovenantViolation | None:
        """Why the slice would take the tenant past its quota (None when it fits); a slice larger
        than the quota itself is refused at once."""
        if quota is None or (quota["max_tflops"] is None and quota["max_vram_gb"] is None):
            return None
        held_t, held_v = await self._tenant_holds(conn, tenant)
        for term, limit, held, asked, unit in (
            ("max_tflops", quota["max_tflops"], held_t, tflops, "TFLOPS"),
            ("max_vram_gb", quota["max_vram_gb"], held_v, vram_gb, "GB"),
        ):
            if limit is None:
                continue
            if asked > limit + EPS:
                raise CovenantViolation(
                    tenant,
                    term,
                    f"{limit:g} {unit} held at once",
                    f"{held:g} {unit} held",
                    f"one slice asks {asked:g} {unit}",
                )
            if held + asked > limit + EPS:
                return CovenantViolation(
                    tenant,
                    term,
                    f"{limit:g} {unit} held at once",
                    f"{held:g} {unit} held",
                    f"the next slice asks {asked:g} {unit}",
                )
        return None

    async def _tenant_holds(self, conn: asyncpg.Connection, tenant: str) -> tuple[float, float]:
        """TFLOPS and VRAM the tenant holds now, across pools: live leases only (read, not ended
        here: ending another pool's leases would take its rows out of lock order)."""
        rows = await conn.fetch(
            "SELECT tflops, vram_gb, holder FROM allocations "
            "WHERE tenant = $1 AND state = 'active' AND lease_expires_at >= now()",
            tenant,
        )
        alive = {h: _holder_alive(h) for h in {r["holder"] for r in rows}}
        live = [r for r in rows if alive[r["holder"]]]
        return sum(r["tflops"] for r in live), sum(r["vram_gb"] for r in live)

    async def admit(
        self, tenant: str, request_id: str, covenant: Covenant, default_cap: int | None = None, key: str | None = None
    ) -> str:
        """Start a request under the tenant's covenant: sync its quota to the tenant row, refuse
        with CovenantViolation when max_concurrent_requests (else `default_cap`, a server's cap
        for covenants that set none) run already (in any live process), else record it as
        running. Returns the key to `end_request` with (`key`: one the caller chose, so that it
        can end a request whose admission it stopped waiting for)."""
        key = key or new_request_key()
        await self._admit(key, tenant, request_id, covenant, default_cap)
        return key

    @_reconnecting
    async def _admit(
        self, key: str, tenant: str, request_id: str, covenant: Covenant, default_cap: int | None = None
    ) -> None:
        async with self._connect() as conn:
            async with conn.transaction():
                if await conn.fetchval("SELECT 1 FROM requests WHERE id = $1", key):
                    return  # a retry after a lost reply: it committed the first time
                await conn.execute(  # the upsert locks the tenant row until the request is recorded
                    """INSERT INTO tenants (id, max_tflops, max_vram_gb, covenant_version) VALUES ($1, $2, $3, $4)
                       ON CONFLICT (id) DO UPDATE SET max_tflops = $2, max_vram_gb = $3, covenant_version = $4""",
                    tenant,
                    covenant.max_tflops,
                    covenant.max_vram_gb,
                    covenant.version,
                )
                limit = (
                    covenant.max_concurrent_requests if covenant.max_concurrent_requests is not None else default_cap
                )
                if limit is not None:
                    running = len(await self._running(conn, tenant))
                    if running >= limit:
                        raise CovenantViolation(
                            tenant, "max_concurrent_requests", f"{limit} at once", f"{running} running"
                        )
                await conn.execute(
                    "INSERT INTO requests (id, tenant, request_id, holder) VALUES ($1, $2, $3, $4)",
                    key,
                    tenant,
                    request_id,
                    self._holder,
                )

    @_reconnecting
    async def end_request(self, key: str) -> None:
        async with self._connect() as conn:
            await conn.execute("UPDATE requests SET ended_at = now() WHERE id = $1 AND ended_at IS NULL", key)

    async def _running(self, conn: asyncpg.Connection, tenant: str) -> list[str]:
        """The tenant's requests running now in live processes (a dead holder's rows are ended)."""
        rows = await conn.fetch("SELECT id, holder FROM requests WHERE tenant = $1 AND ended_at IS NULL", tenant)
        alive = {h: _holder_alive(h) for h in {r["holder"] for r in rows}}
        dead = [r["id"] for r in rows if not alive[r["holder"]]]
        if dead:
            await conn.execute("UPDATE requests SET ended_at = now() WHERE id = ANY($1::text[])", dead)
        return [r["id"] for r in rows if alive[r["holder"]]]

    @_reconnecting
    async def reserve_spend(
        self,
        allocation_id: str,
        tenant: str,
        request_id: str,
        worst_usd: float,
        check: Callable[[BudgetUse], None],
    ) -> None:
        """Reserve a model call's worst-case cost before it runs, so that calls running at once,
        in any process, cannot together overrun the tenant's budget.

        Under the tenant row's lock (the row is made if absent): reservations whose caller is gone
        are settled first (`_settle_abandoned`), then `check` is given the tenant's spend and open
        reservations and raises to refuse (CovenantViolation); else the reservation is written, a
        `spend` row in state 'reserved' that `record_spend` settles. Once per allocation: a retry
        finds its row. Settled like `record_spend`: a cancellation waits for the commit or the
        rollback (the caller settles what it used, and needs the reservation there or not at all).
        """

        async def write() -> Exception | None:
            async with self._connect() as conn:
                async with conn.transaction():
                    await conn.execute("INSERT INTO tenants (id) VALUES ($1) ON CONFLICT (id) DO NOTHING", tenant)
                    await conn.execute("SELECT id FROM tenants WHERE id = $1 FOR UPDATE", tenant)
                    mine = await conn.fetchval("SELECT tenant FROM spend WHERE allocation_id = $1", allocation_id)
                    if mine == tenant:
                        return None  # a retry after a lost reply: it committed the first time
                    if mine is not None:
                        raise AllocationNotFound(f"tenant {tenant!r} holds no allocation {allocation_id!r}")
                    await self._settle_abandoned(conn, tenant)
                    try:
                        check(await self._budget_use(conn, tenant))
                    except Exception as refusal:  # raised once the settlements above are committed
                        return refusal
                    await conn.execute(
                        "INSERT INTO spend (allocation_id, tenant, request_id, cost_usd, state, holder, reserved_usd) "
                        "VALUES ($1, $2, $3, 0, 'reserved', $4, $5)",
                        allocation_id,
                        tenant,
                        request_id,
                        self._holder,
                        worst_usd,
                    )
            return None

        refusal = await _settled(write())
        if refusal is not None:
            raise refusal

    async def _settle_abandoned(self, conn: asyncpg.Connection, tenant: str) -> None:
        """Settle the tenant's reservations whose caller will never settle them (its process is
        gone, or the reservation outlived the lease: the backstop for another host's process) at
        their worst case: what the call cost is unknown, and a crash must never make it free."""
        rows = await conn.fetch(
            "SELECT allocation_id, holder, at < now() - make_interval(secs => $2) AS stale "
            "FROM spend WHERE tenant = $1 AND state = 'reserved'",
            tenant,
            self._lease_s,
        )
        alive = {h: _holder_alive(h) for h in {r["holder"] for r in rows if r["holder"]}}
        gone = [r["allocation_id"] for r in rows if r["stale"] or not alive.get(r["holder"], False)]
        if gone:
            await conn.execute(
                "UPDATE spend SET state = 'settled', cost_usd = reserved_usd, at = now() "
                "WHERE allocation_id = ANY($1::text[]) AND state = 'reserved'",
                gone,
            )
            log.warning(
                "tenant %r: %d reservation(s) of calls whose process is gone settled at their worst case",
                tenant,
                len(gone),
            )

    async def _budget_use(self, conn: asyncpg.Connection, tenant: str) -> BudgetUse:
        row = await conn.fetchrow(
            f"SELECT coalesce(sum(cost_usd) FILTER (WHERE state = 'settled' AND at >= {DAY}), 0) AS day, "
            f"coalesce(sum(cost_usd) FILTER (WHERE state = 'settled' AND at >= {MONTH}), 0) AS month, "
            "coalesce(sum(reserved_usd) FILTER (WHERE state = 'reserved'), 0) AS reserved "
            f"FROM spend WHERE tenant = $1 AND (at >= {MONTH} OR state = 'reserved')",
            tenant,
        )
        return BudgetUse(row["day"], row["month"], row["reserved"])

    @_reconnecting
    async def record_spend(
        self, allocation_id: str, tenant: str, request_id: str, cost_usd: float, reserved_only: bool = False
    ) -> None:
        """Settle what one allocation cost its tenant: its reservation becomes its spend (an
        allocation that reserved nothing gets a settled row of its own, unless `reserved_only`:
        a caller that does not know whether its reservation committed). Once per allocation: a
        row already settled stays as it is. Settled: a cancellation that lands meanwhile waits for
        the write (else a request cancelled while or after its call ran would have it free)."""

        async def write() -> None:
            async with self._connect() as conn:
                async with conn.transaction():
                    settled = await conn.fetchval(
                        "UPDATE spend SET state = 'settled', cost_usd = $3, at = now() "
                        "WHERE allocation_id = $1 AND tenant = $2 AND state = 'reserved' RETURNING allocation_id",
                        allocation_id,
                        tenant,
                        cost_usd,
                    )
                    if settled is None and not reserved_only:
                        await conn.execute(
                            "INSERT INTO spend (allocation_id, tenant, request_id, cost_usd) VALUES ($1, $2, $3, $4) "
                            "ON CONFLICT (allocation_id) DO NOTHING",
                            allocation_id,
                            tenant,
                            request_id,
                            cost_usd,
                        )

        await _settled(write())

    @_reconnecting
    async def budget_use(self, tenant: str) -> BudgetUse:
        """The tenant's settled spend this UTC day and month and its open reservations, in one read."""
        async with self._connect() as conn:
            return await self._budget_use(conn, tenant)

    async def spend(self, tenant: str) -> tuple[float, float]:
        """The tenant's settled spend this UTC day and this UTC month, US$ (open reservations:
        `reserved`)."""
        use = await self.budget_use(tenant)
        return use.day_usd, use.month_usd

    async def reserved(self, tenant: str) -> float:
        """The worst cases reserved for the tenant's calls that have not settled, US$ (a gone
        caller's count here until a reservation of the tenant settles them)."""
        return (await self.budget_use(tenant)).reserved_usd

    @_reconnecting
    async def request_spend(self, tenant: str, request_id: str) -> list[dict]:
        """The tenant's spend rows of one request, one per model call that reserved: its
        allocation_id, state ('reserved' while the call runs, then 'settled'), cost_usd (what it
        was billed, once settled) and reserved_usd (the worst case it reserved)."""
        async with self._connect() as conn:
            rows = await conn.fetch(
                "SELECT allocation_id, state, cost_usd, reserved_usd FROM spend "
                "WHERE tenant = $1 AND request_id = $2 ORDER BY at",
                tenant,
                request_id,
            )
        return [dict(r) for r in rows]

    @_reconnecting
    async def usage(self, tenant: str) -> dict:
        """What the tenant uses now: held slices, TFLOPS and VRAM held, settled spend today and
        this month, reservations open, requests running, and the covenant version its quota was
        last synced from."""
        held = await self.held(tenant)
        async with self._connect() as conn:
            use = await self._budget_use(conn, tenant)
            async with conn.transaction():
                running = await self._running(conn, tenant)
            version = await conn.fetchval("SELECT covenant_version FROM tenants WHERE id = $1", tenant)
        return {
            "held_slices": len(held),
            "tflops_held": sum((a.tflops for a in held), 0.0),
            "vram_gb_held": sum((a.vram_gb for a in held), 0.0),
            "spend_usd_today": use.day_usd,
            "spend_usd_month": use.month_usd,
            "reserved_usd": use.reserved_usd,
            "requests_running": len(running),
            "synced_covenant_version": version,
        }

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
        """Active allocations (all tenants or one, all backends or one) that are live: one whose
        lease is over or whose holder process is gone is left out (`reserve` ends it in its own
        pool). A plain read: it locks nothing, so a flood of listings never holds up a reservation."""
        async with self._connect() as conn:
            rows = await conn.fetch(
                f"SELECT {COLUMNS}, holder FROM allocations WHERE state = 'active' AND lease_expires_at >= now() "
                "AND ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR backend = $2) ORDER BY created_at",
                tenant,
                backend,
            )
        alive = {h: _holder_alive(h) for h in {r["holder"] for r in rows}}
        return [Allocation(**{k: v for k, v in r.items() if k != "holder"}) for r in rows if alive[r["holder"]]]

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
