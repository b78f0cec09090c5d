"""The server's fair shares (`apps.guards`), without a server: each limit refuses past its bound,
names what was refused, frees its place when a holder ends, and keeps one tenant's use from
counting against another's."""

from __future__ import annotations

import anyio
import pytest

from apps.guards import FORGET_AFTER_S, Guards
from homeskillet.errors import TooManyRequests
from homeskillet.settings import Settings


def guards(**values) -> Guards:
    return Guards(Settings(**values))


def test_the_server_wide_cap_refuses_at_once_and_frees_its_place():
    g = guards(server_max_in_flight=2)
    with g.server(), g.server():
        with pytest.raises(TooManyRequests, match="2 requests at once"), g.server():
            pass
    with g.server():  # both places are free again
        assert g.in_flight == 1


def test_a_tenants_connections_are_capped_and_other_tenants_are_not_counted():
    g = guards(tenant_max_connections=1)
    with g.tenant("acme"):
        with pytest.raises(TooManyRequests, match="'acme' has 1 connections open"), g.tenant("acme"):
            pass
        with g.tenant("globex"):
            pass
    with g.tenant("acme"):
        pass
    assert not g.connections


def test_a_tenants_calls_are_rate_limited_across_tools_with_a_wait_to_retry():
    g = guards(tenant_rate="3/minute")
    for _ in range(3):
        g.call("acme")
    with pytest.raises(TooManyRequests, match="'acme' is over its rate of 3/minute") as refused:
        g.call("acme")
    assert 1 <= refused.value.retry_after_s <= 60
    g.call("globex")  # another tenant's calls are its own


def test_failed_authentications_limit_the_address_they_came_from():
    g = guards(auth_failure_rate="2/minute")
    assert g.address_limited("10.0.0.1") is None
    g.auth_failed("10.0.0.1")
    g.auth_failed("10.0.0.1")
    assert g.address_limited("10.0.0.1") >= 1
    assert g.address_limited("10.0.0.2") is None


def test_sessions_per_tenant_are_capped_and_the_map_forgets_ended_and_idle_ones(monkeypatch):
    g = guards(tenant_max_sessions=2)
    g.session_opening("acme")
    g.bind_session("s1", "acme")
    g.bind_session("s2", "acme")
    with pytest.raises(TooManyRequests, match="'acme' has 2 sessions open"):
        g.session_opening("acme")
    g.session_opening("globex")
    assert g.session_tenant("s1") == "acme" and g.session_tenant("nope") is None
    g.end_session("s1")
    g.session_opening("acme")  # one ended: room again
    clock = [0.0]
    monkeypatch.setattr("apps.guards.time.monotonic", lambda: clock[0])
    g.bind_session("s3", "acme")
    clock[0] = FORGET_AFTER_S + 1  # s3 idle past the SDK's timeout: over, and pruned
    assert g.session_tenant("s3") is None and "s3" not in g.sessions


async def test_a_revocation_ends_the_tokens_connections_and_only_its_own():
    g = guards()
    ended = {}

    async def connection(name: str, token: str) -> None:
        with g.watched(token) as watch:
            await anyio.sleep(30)
        ended[name] = watch.why

    async with anyio.create_task_group() as tg:
        tg.start_soon(connection, "a1", "sha-a")
        tg.start_soon(connection, "a2", "sha-a")
        tg.start_soon(connection, "b", "sha-b")
        await anyio.sleep(0.05)
        g.revoked("sha-a")
        await anyio.sleep(0.05)
        assert ended == {"a1": "the token was revoked", "a2": "the token was revoked"}
        g.revoked("sha-b")
    assert ended["b"] == "the token was revoked" and not g.watches


async def test_a_connection_ends_at_its_maximum_lifetime():
    g = guards(connection_max_s=0.1)
    with g.watched("sha") as watch:
        await anyio.sleep(30)
    assert watch.why == "the connection reached its maximum lifetime of 0.1s"


def test_a_session_with_a_request_running_is_not_over_however_long_it_runs(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("apps.guards.time.monotonic", lambda: clock[0])
    g = guards()
    g.bind_session("s1", "acme")
    with g.in_session("s1"):  # a stream that outlives the idle timeout
        clock[0] = 10 * FORGET_AFTER_S
        g.session_opening("acme")  # pruning skips it
        assert g.session_tenant("s1") == "acme"
    clock[0] += FORGET_AFTER_S - 1  # used when the stream ended: not idle yet
    assert g.session_tenant("s1") == "acme"
