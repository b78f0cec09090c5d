"""Fair shares on a server that strangers reach: no client, and no tenant, can take it all.

- `server`: HTTP requests and WebSockets handled at once, server-wide (beyond: 429 at once,
  before any token is looked at);
- `auth_failed` / `address_limited`: failed authentications per client address; an address past
  its limit gets 429 without a database lookup, unless its token is one this server knows live;
- `tenant`: one tenant's WebSockets and HTTP requests open at once;
- `session_opening` / `bind_session` / `end_session`: one tenant's Streamable HTTP sessions
  (a session the SDK has closed for idling is forgotten here too, so the map is pruned);
- `call`: one tenant's tool calls and resource reads, a moving-window rate across every tool;
- `watched`: a connection's cancel scope, ended when its token is revoked (`revoked`, called on
  the store's NOTIFY) or when it reaches its maximum lifetime.

A refusal is `TooManyRequests`, with the seconds to wait. Limits are per process; the covenant's
caps in PostgreSQL (`max_concurrent_requests`, quotas, budgets) hold across processes.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from homeskillet.errors import TooManyRequests
from homeskillet.settings import Settings

SESSION_IDLE_S = 600.0  # the SDK closes a Streamable HTTP session unused this long (set in create_app)
FORGET_AFTER_S = SESSION_IDLE_S + 60  # forgotten here only once the SDK has surely closed it


@dataclass(eq=False)  # each one its own, hashable by identity
class Watch:
    """An open connection's cancel scope, and why it was ended (None while it runs)."""

    scope: anyio.CancelScope
    why: str | None = None

    def end(self, why: str) -> None:
        self.why = self.why or why
        self.scope.cancel()


@dataclass
class Guards:
    settings: Settings
    limiter: MovingWindowRateLimiter = field(default_factory=lambda: MovingWindowRateLimiter(MemoryStorage()))
    in_flight: int = 0
    connections: Counter = field(default_factory=Counter)  # tenant → open connections
    sessions: dict[str, tuple[str, float]] = field(default_factory=dict)  # session id → (tenant, last seen)
    active: Counter = field(default_factory=Counter)  # session id → its requests running now
    watches: dict[str, set[Watch]] = field(default_factory=dict)  # token sha256 → its open connections

    def __post_init__(self) -> None:
        self.tenant_rate = parse(self.settings.tenant_rate)
        self.auth_rate = parse(self.settings.auth_failure_rate)

    @contextmanager
    def server(self) -> Iterator[None]:
        if self.in_flight >= self.settings.server_max_in_flight:
            raise TooManyRequests(f"the server handles {self.settings.server_max_in_flight} requests at once; retry")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def address_limited(self, address: str) -> float | None:
        """Seconds until the address may authenticate again, or None when it may now."""
        if self.limiter.test(self.auth_rate, "auth", address):
            return None
        return self._retry_after(self.auth_rate, "auth", address)

    def auth_failed(self, address: str) -> None:
        self.limiter.hit(self.auth_rate, "auth", address)

    @contextmanager
    def tenant(self, tenant: str) -> Iterator[None]:
        limit = self.settings.tenant_max_connections
        if self.connections[tenant] >= limit:
            raise TooManyRequests(f"tenant {tenant!r} has {limit} connections open, its limit; close one")
        self.connections[tenant] += 1
        try:
            yield
        finally:
            self.connections[tenant] -= 1
            if not self.connections[tenant]:
                del self.connections[tenant]

    def call(self, tenant: str) -> None:
        """Count one tool call or resource read of the tenant; TooManyRequests past its rate."""
        if not self.limiter.hit(self.tenant_rate, "calls", tenant):
            raise TooManyRequests(
                f"tenant {tenant!r} is over its rate of {self.settings.tenant_rate} calls",
                self._retry_after(self.tenant_rate, "calls", tenant),
            )

    def session_tenant(self, session: str) -> str | None:
        """The tenant a live session belongs to (None: unknown or over), and mark it used."""
        entry = self.sessions.get(session)
        if entry is None:
            return None
        if self._over(session, entry[1], time.monotonic()):
            del self.sessions[session]
            return None
        self.sessions[session] = (entry[0], time.monotonic())
        return entry[0]

    @contextmanager
    def in_session(self, session: str) -> Iterator[None]:
        """One request of a session (a stream may last long): the session is not over while it
        runs, and counts as used when it ends."""
        self.active[session] += 1
        try:
            yield
        finally:
            self.active[session] -= 1
            if not self.active[session]:
                del self.active[session]
            entry = self.sessions.get(session)
            if entry is not None:
                self.sessions[session] = (entry[0], time.monotonic())

    def _over(self, session: str, seen: float, now: float) -> bool:
        return now - seen > FORGET_AFTER_S and not self.active.get(session)

    def session_opening(self, tenant: str) -> None:
        """TooManyRequests when the tenant already has its most sessions open."""
        now = time.monotonic()
        for session, (_, seen) in list(self.sessions.items()):
            if self._over(session, seen, now):
                del self.sessions[session]
        limit = self.settings.tenant_max_sessions
        if sum(1 for owner, _ in self.sessions.values() if owner == tenant) >= limit:
            raise TooManyRequests(f"tenant {tenant!r} has {limit} sessions open, its limit; end one (DELETE)")

    def bind_session(self, session: str, tenant: str) -> None:
        self.sessions.setdefault(session, (tenant, time.monotonic()))

    def end_session(self, session: str) -> None:
        self.sessions.pop(session, None)

    @contextmanager
    def watched(self, token_sha256: str) -> Iterator[Watch]:
        """A cancel scope for one connection of this token, ended on its revocation or at its
        maximum lifetime (`watch.why` says which)."""
        watch = Watch(anyio.CancelScope())
        lifetime = self.settings.connection_max_s
        self.watches.setdefault(token_sha256, set()).add(watch)
        try:
            with anyio.move_on_after(lifetime) as deadline:
                with watch.scope:
                    yield watch
            if deadline.cancelled_caught:
                watch.why = watch.why or f"the connection reached its maximum lifetime of {lifetime:g}s"
        finally:
            open_ = self.watches.get(token_sha256)
            if open_ is not None:
                open_.discard(watch)
                if not open_:
                    del self.watches[token_sha256]

    def revoked(self, token_sha256: str) -> None:
        """End every open connection of a revoked token."""
        for watch in list(self.watches.get(token_sha256, ())):
            watch.end("the token was revoked")

    def _retry_after(self, item, *keys: str) -> float:
        reset = self.limiter.get_window_stats(item, *keys).reset_time
        return max(1.0, math.ceil(reset - time.time()))
