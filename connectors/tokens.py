"""API tokens (one tenant each) and finished request results, in the shared PostgreSQL.

A token is `hs_` + 32 random bytes (url-safe base64); only its sha256 is stored, and it is shown
once, when created. Results are kept per tenant so that `homeskillet://requests/{id}` survives
a server restart; another tenant's id reads exactly like an unknown one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from datetime import datetime
from pathlib import Path

import asyncpg

from connectors import postgres

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


def new_token() -> str:
    return "hs_" + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Tokens and results in the `homeskillet` database of the embedded PostgreSQL."""

    def __init__(self, dsn: str):
        self._dsn = dsn

    @classmethod
    async def open(cls, pgdata: Path) -> TokenStore:
        """Start (or reuse) PostgreSQL and create the tables if needed."""
        await asyncio.to_thread(postgres.ensure_postgres, pgdata)
        store = cls(postgres.dsn(pgdata, "homeskillet"))
        await postgres.apply_schema(store._dsn, "homeskillet.tokens", SCHEMA)
        return store

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._dsn)

    async def create(self, tenant: str) -> tuple[str, str]:
        """A new token for the tenant: (token_id, token). The token itself is never stored."""
        token = new_token()
        token_id = "tok-" + secrets.token_hex(4)
        conn = await self._connect()
        try:
            await conn.execute(
                "INSERT INTO api_tokens (token_sha256, token_id, tenant) VALUES ($1, $2, $3)",
                token_hash(token),
                token_id,
                tenant,
            )
        finally:
            await conn.close()
        return token_id, token

    async def tenant_of(self, token: str | None) -> str | None:
        """The tenant of a live token; None for a missing, unknown or revoked one."""
        if not token:
            return None
        conn = await self._connect()
        try:
            return await conn.fetchval(
                "SELECT tenant FROM api_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL", token_hash(token)
            )
        finally:
            await conn.close()

    async def list(self, tenant: str | None = None) -> list[dict]:
        conn = await self._connect()
        try:
            rows = await conn.fetch(
                "SELECT token_id, tenant, created_at, revoked_at FROM api_tokens "
                "WHERE ($1::text IS NULL OR tenant = $1) ORDER BY created_at",
                tenant,
            )
        finally:
            await conn.close()
        return [dict(r) for r in rows]

    async def revoke(self, token_or_id: str) -> bool:
        """Revoke by token id (tok-…) or by the token itself; True when a live token was revoked."""
        conn = await self._connect()
        try:
            revoked = await conn.fetchval(
                "UPDATE api_tokens SET revoked_at = now() WHERE (token_id = $1 OR token_sha256 = $2) "
                "AND revoked_at IS NULL RETURNING token_id",
                token_or_id,
                token_hash(token_or_id),
            )
        finally:
            await conn.close()
        return revoked is not None

    async def save_result(self, tenant: str, request_id: str, result: dict) -> None:
        conn = await self._connect()
        try:
            await conn.execute(
                "INSERT INTO request_results (request_id, tenant, result) VALUES ($1, $2, $3::jsonb) "
                "ON CONFLICT (tenant, request_id) DO UPDATE SET result = $3::jsonb, finished_at = now()",
                request_id,
                tenant,
                json.dumps(result),
            )
        finally:
            await conn.close()

    async def result(self, tenant: str, request_id: str) -> dict | None:
        """The tenant's finished request, or None (unknown, or another tenant's)."""
        conn = await self._connect()
        try:
            raw = await conn.fetchval(
                "SELECT result::text FROM request_results WHERE tenant = $1 AND request_id = $2", tenant, request_id
            )
        finally:
            await conn.close()
        return None if raw is None else json.loads(raw)


def created_iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")
