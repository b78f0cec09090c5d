"""API tokens (one tenant each) and finished request results, in the shared PostgreSQL.

A token is `hs_` + 32 random bytes (url-safe base64); only its sha256 is stored, and it is shown
once, when created. Results are kept per tenant so that `homeskillet://requests/{id}` survives
a server restart; another tenant's id reads exactly like an unknown one.

Checking a token costs nothing for junk and little for the rest:

- a string that is not of the token's form is refused before any database access;
- every query goes through one bounded connection pool per event loop (`postgres.LoopPools`), so
  a flood of made-up tokens queues for a few connections instead of opening one each;
- answers are cached briefly: unknown tokens always (a token cannot be presented before it is
  created), live ones only while this process listens for revocations (`listen`), because a
  revocation is announced with PostgreSQL `NOTIFY` in the transaction that revokes, and every
  listening process drops the token from its cache at once and tells its subscribers (a server
  closes the token's open connections).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import asyncpg
from cachetools import TTLCache

from connectors import postgres

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    token_sha256 text PRIMARY KEY,
    token_id text NOT NULL UNIQUE,
    tenant text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE TABLE IF NOT EXISTS request_results (
    request_id text NOT NULL,
    tenant text NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT now(),
    result jsonb NOT NULL,
    PRIMARY KEY (tenant, request_id)
);
"""
TOKEN_FORM = re.compile(r"hs_[A-Za-z0-9_-]{43}")  # "hs_" + token_urlsafe(32)
CHANNEL = "homeskillet_tokens"  # NOTIFY payload: the revoked token's sha256
CACHE_S = 30.0  # a cached answer's life (a live token's is cut short by its revocation)
CACHE_SIZE = 10_000
LISTEN_RETRY_S = 5.0
LISTEN_TIMEOUT_S = 5.0
POOL_SIZE = 4  # connections per event loop for token checks and results


def new_token() -> str:
    return "hs_" + secrets.token_urlsafe(32)


def well_formed(token: str | None) -> bool:
    return bool(token) and TOKEN_FORM.fullmatch(token) is not None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Tokens and results in the `homeskillet` database of the embedded PostgreSQL."""

    def __init__(self, dsn: str):
        self._dsn = dsn
        self._pools = postgres.LoopPools(dsn, max_size=POOL_SIZE)
        self._cache: TTLCache[str, str | None] = TTLCache(CACHE_SIZE, CACHE_S)  # sha256 → tenant or None
        self._cache_lock = threading.Lock()  # a store may serve several event loops (threads)
        self._listener: asyncpg.Connection | None = None
        self._listening = asyncio.Lock()
        self._subscribers: list[Callable[[str], None]] = []
        self._listen_failed_at = -LISTEN_RETRY_S
        self._generation = 0  # counts revocations heard and listeners lost: a lookup spanning one is not cached

    @classmethod
    async def open(cls, pgdata: Path) -> TokenStore:
        """Start (or reuse) PostgreSQL and create the tables if needed."""
        await asyncio.to_thread(postgres.ensure_postgres, pgdata)
        store = cls(postgres.dsn(pgdata, "homeskillet"))
        await postgres.apply_schema(store._dsn, "homeskillet.tokens", SCHEMA)
        return store

    def _connect(self):
        return self._pools.connection()

    async def create(self, tenant: str) -> tuple[str, str]:
        """A new token for the tenant: (token_id, token). The token itself is never stored."""
        token = new_token()
        token_id = "tok-" + secrets.token_hex(4)
        async with self._connect() as conn:
            await conn.execute(
                "INSERT INTO api_tokens (token_sha256, token_id, tenant) VALUES ($1, $2, $3)",
                token_hash(token),
                token_id,
                tenant,
            )
        return token_id, token

    def cached(self, token: str | None) -> str | None:
        """The tenant of a token this process checked lately and found live; None otherwise
        (no database access)."""
        if not well_formed(token):
            return None
        with self._cache_lock:
            return self._cache.get(token_hash(token))

    async def tenant_of(self, token: str | None) -> str | None:
        """The tenant of a live token; None for a missing, malformed, unknown or revoked one."""
        if not well_formed(token):
            return None
        digest = token_hash(token)
        with self._cache_lock:
            if digest in self._cache:
                return self._cache[digest]
            generation = self._generation
        async with self._connect() as conn:
            tenant = await conn.fetchval(
                "SELECT tenant FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL", digest
            )
        with self._cache_lock:
            # a live token is cached only while revocations are heard, and only when none was heard
            # (nor the listener lost) during the query: its answer might predate a revocation
            if tenant is None or (self.listening and generation == self._generation):
                self._cache[digest] = tenant
        return tenant

    async def revoked_among(self, digests: list[str]) -> set[str]:
        """Which of these token hashes are revoked or unknown now (read from the database)."""
        if not digests:
            return set()
        async with self._connect() as conn:
            live = await conn.fetch(
                "SELECT token_sha256 FROM api_tokens WHERE token_sha256 = ANY($1::text[]) AND revoked_at IS NULL",
                digests,
            )
        return set(digests) - {r["token_sha256"] for r in live}

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    def subscribe(self, on_revoke: Callable[[str], None]) -> None:
        """Call `on_revoke(token_sha256)` for every revocation heard (from any process)."""
        self._subscribers.append(on_revoke)

    async def listen(self) -> bool:
        """Hear revocations on this event loop (once; again after the connection is lost). True
        when listening. A lost listener empties the cache: what it missed cannot be known."""
        async with self._listening:
            if self.listening:
                return True
            if time.monotonic() - self._listen_failed_at < LISTEN_RETRY_S:
                return False  # PostgreSQL was away a moment ago: not a connection attempt per request
            conn = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=LISTEN_TIMEOUT_S)
                await conn.add_listener(CHANNEL, self._heard)
            except Exception as exc:  # PostgreSQL away, slow or refusing: try again later
                log.warning("not listening for token revocations: %s", exc)
                self._listen_failed_at = time.monotonic()
                if conn is not None:
                    conn.terminate()
                return False
            conn.add_termination_listener(lambda _conn: self._forget_all())
            self._listener = conn
            return True

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    def _heard(self, _conn, _pid, _channel, digest: str) -> None:
        with self._cache_lock:
            self._cache.pop(digest, None)
            self._generation += 1
        for on_revoke in list(self._subscribers):
            try:
                on_revoke(digest)
            except Exception:
                log.exception("a token revocation subscriber failed")

    def _forget_all(self) -> None:
        with self._cache_lock:
            self._cache.clear()
            self._generation += 1

    async def list(self, tenant: str | None = None) -> list[dict]:
        async with self._connect() as conn:
            rows = await conn.fetch(
                "SELECT token_id, tenant, created_at, revoked_at FROM api_tokens "
                "WHERE ($1::text IS NULL OR tenant = $1) ORDER BY created_at",
                tenant,
            )
        return [dict(r) for r in rows]

    async def revoke(self, token_or_id: str) -> bool:
        """Revoke by token id (tok-…) or by the token itself; True when a live token was revoked.
        Every process listening hears it (NOTIFY, sent when the revocation commits)."""
        async with self._connect() as conn:
            async with conn.transaction():
                digest = await conn.fetchval(
                    "UPDATE api_tokens SET revoked_at = now() WHERE (token_id = $1 OR token_sha256 = $2) "
                    "AND revoked_at IS NULL RETURNING token_sha256",
                    token_or_id,
                    token_hash(token_or_id),
                )
                if digest is not None:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, digest)
        if digest is not None:
            with self._cache_lock:
                self._cache.pop(digest, None)
                self._generation += 1
        return digest is not None

    async def save_result(self, tenant: str, request_id: str, result: dict) -> None:
        async with self._connect() as conn:
            await conn.execute(
                "INSERT INTO request_results (request_id, tenant, result) VALUES ($1, $2, $3::jsonb) "
                "ON CONFLICT (tenant, request_id) DO UPDATE SET result = $3::jsonb, finished_at = now()",
                request_id,
                tenant,
                json.dumps(result),
            )

    async def result(self, tenant: str, request_id: str) -> dict | None:
        """The tenant's finished request, or None (unknown, or another tenant's)."""
        async with self._connect() as conn:
            raw = await conn.fetchval(
                "SELECT result::text FROM request_results WHERE tenant = $1 AND request_id = $2", tenant, request_id
            )
        return None if raw is None else json.loads(raw)


def created_iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")
