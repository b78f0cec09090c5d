"""The hosted·ai client (`connectors.hostedai`) against the emulator over real HTTP on loopback:
every quirk of the API notes, the retry rules, the circuit breaker's three states (counting only
"hosted·ai is not answering", never a business refusal), tenant isolation, and the API key absent
from every error, warning and log line on every fault path."""

import asyncio
import logging
import re

import httpx
import pytest

from connectors.hostedai import BREAKERS, HostedAIClient, Policy, vgpus_for
from connectors.hostedai_models import listed
from homeskillet.errors import (
    AlreadySubscribed,
    CircuitOpen,
    HostedAIAuthError,
    HostedAIError,
    HostedAIRejected,
    HostedAIUnavailable,
    InsufficientResources,
)
from homeskillet.schemas import HostedAICredentials
from tests.support import emulator_client as client
from tests.support import free_port

pytestmark = pytest.mark.usefixtures("no_subscriptions_left")
WRONG_KEY = "hai-WRONG-7f3a9c1e-secret"


async def cleanup(c: HostedAIClient) -> None:
    for sub in await c.subscriptions():
        await c.unsubscribe(sub.id, sub.pool_id)


def subs_of(emulator, tenant):
    return [s for s in emulator.state.subs.values() if s.team_id == emulator.teams[tenant].id]


async def test_discovery_and_estimate(emulator):
    c = client(emulator)
    assert [r.gpuaas_id for r in await c.regions()] == [7]
    pools = {p.name: p for p in await c.pools()}
    assert set(pools) == {"h100-dedicated", "a100-dedicated", "l4-spot", "a10-spot"}
    assert pools["l4-spot"].available_vgpus == 8 and pools["l4-spot"].price_per_vgpu_hour == pytest.approx(0.12)
    quote = await c.estimate(pools["l4-spot"].id, vgpus=2, hours=3)
    assert quote.hourly_cost == pytest.approx(0.24) and quote.currency == "USD"


def test_list_shapes_and_vgpu_sizing():
    assert listed(None, "GET /x") == [] and listed([1], "GET /x") == [1] and listed({"items": [2]}, "GET /x") == [2]
    with pytest.raises(HostedAIError, match=r"GET /x answered an object with keys rows, not a list") as caught:
        listed({"rows": ["hai-secret-value"]}, "GET /x")
    assert "hai-secret-value" not in str(caught.value)  # described by its shape, never its values
    # 16 TFLOPS + 4 GB on an L4 (121 TFLOPS, 24 GB) shared 4 ways: compute needs 1 slot of 30
    assert vgpus_for(16, 4, 121, 24, 4) == 1
    assert vgpus_for(70, 4, 121, 24, 4) == 3  # 70 / 30.25 → 3 slots
    assert vgpus_for(1, 50, 121, 24, 4) == 3  # memory: 50 / 24 → 3


async def test_subscription_life_cycle_reaches_a_real_model(emulator, local_models):
    c = client(emulator)
    sub_id = await c.subscribe(201, vgpus=1)
    ready = await c.wait_ready(sub_id)
    assert ready.status == "active"
    url = await c.inference_url(sub_id)  # exposes the service first: the pod starts with none
    assert re.search(rf"/pods/pod-{sub_id}/[\w-]{{20,}}/v1$", url)  # a secret part: only the team has the URL
    from connectors import openai_client

    out = await openai_client.complete(url, "smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert out.text.strip() and out.tokens_out > 0
    await c.unsubscribe(sub_id, 201)
    assert subs_of(emulator, "acme") == []


async def test_a_second_subscribe_adopts_the_first(emulator):
    c = client(emulator)
    first = await c.subscribe(202, vgpus=1)
    raw = await _raw(
        emulator,
        "acme",
        "POST",
        "/gpuaas/pool/subscribe",
        json={"pool_id": 202, "team_id": emulator.teams["acme"].id, "vgpus": 1},
    )
    assert raw.status_code == 409 and raw.json()["message"] == "Already subscribed"
    assert await c.subscribe(202, vgpus=1) == first
    assert len(subs_of(emulator, "acme")) == 1
    await cleanup(c)


async def test_an_empty_subscribe_answer_is_reconciled(emulator, faults):
    faults(empty_subscribe_rate=1.0, visibility_s=0.3)
    c = client(emulator)
    sub_id = await c.subscribe(201, vgpus=1)
    assert [s.id for s in subs_of(emulator, "acme")] == [sub_id]
    await cleanup(c)


async def test_no_duplicate_subscription_after_a_timed_out_subscribe(emulator, faults):
    faults(timeout_rate=1.0, timeout_s=2.0, visibility_s=0.5)
    c = client(emulator, subscribe_timeout_s=0.3, reconcile_s=5, poll_s=0.05)
    sub_id = await c.subscribe(201, vgpus=1)
    assert [s.id for s in subs_of(emulator, "acme")] == [sub_id]
    faults()
    await cleanup(c)


async def test_a_subscribe_that_took_effect_but_answered_internal_error_is_adopted(emulator, faults):
    """500 {50000001, "internal error"} after the subscription was made: the list shows it, and
    it is adopted, not left behind as a paid subscription nobody retires."""
    fired = emulator.state.fired["write_error_after"]
    faults(write_error_after_rate=1.0)
    c = client(emulator, reconcile_s=5, poll_s=0.05)
    sub_id = await c.subscribe(201, vgpus=1)
    assert emulator.state.fired["write_error_after"] > fired
    assert [s.id for s in subs_of(emulator, "acme")] == [sub_id]
    faults()
    await cleanup(c)


async def test_an_unsubscribe_that_took_effect_but_answered_internal_error_is_done(emulator, faults):
    """Asking again is safe: the second answer (not found, or done) settles it at once."""
    c = client(emulator, poll_s=0.05)
    sub_id = await c.subscribe(201, vgpus=1)
    fired = emulator.state.fired["write_error_after"]
    faults(write_error_after_rate=1.0)
    await c.unsubscribe(sub_id, 201)
    assert emulator.state.fired["write_error_after"] > fired  # (other tests' retires may be answered so too)
    assert subs_of(emulator, "acme") == [] or all(s.unsubscribed is not None for s in subs_of(emulator, "acme"))
    faults()


@pytest.mark.parametrize("in_2xx", [0.0, 1.0], ids=["as-500", "inside-200"])
async def test_insufficient_resources_is_a_business_error_whatever_the_status(emulator, faults, in_2xx):
    faults(business_in_2xx_rate=in_2xx, insufficient_pools=[101])
    c = client(emulator)
    calls = emulator.state.calls
    with pytest.raises(InsufficientResources, match="Insufficient resources .code 10189007"):
        await c.subscribe(101, vgpus=1)
    # not retried: one list to reconcile first, one subscribe
    assert emulator.state.calls - calls == 2


async def test_full_pool_answers_insufficient(emulator):
    c = client(emulator)
    with pytest.raises(InsufficientResources):
        await c.subscribe(202, vgpus=5)  # a10-spot has 4 slots


async def test_transient_5xx_are_retried_with_backoff(emulator, faults):
    faults(error_rate=0.5, seed=7)
    c = client(emulator, attempts=10, backoff_initial_s=0.01, backoff_max_s=0.05)
    for _ in range(5):
        assert len(await c.pools()) == 4
    faults(error_rate=1.0)
    calls = emulator.state.calls
    with pytest.raises(HostedAIUnavailable, match="HTTP 500"):
        await c.regions()
    assert emulator.state.calls - calls == c.policy.attempts


async def test_429_is_retried_after_the_servers_retry_after(emulator, faults):
    faults(rate_limit_rate=0.6, retry_after_s=0.05, seed=3)
    c = client(emulator)
    assert len(await c.regions()) == 1
    policy = Policy(retry_after_max_s=1.0)
    state = type(
        "S", (), {"outcome": type("O", (), {"exception": lambda self: HostedAIUnavailable("x", retry_after=7.0)})()}
    )()
    assert HostedAIClient(c.credentials, policy)._wait(state) == 1.0  # honoured, but bounded


async def test_a_writes_business_errors_are_not_retried(emulator):
    c = client(emulator)
    calls = emulator.state.calls
    with pytest.raises(HostedAIRejected, match="not found"):
        await c.call("POST", "/gpuaas/pool/subscribe", body={"pool_id": 999, "team_id": c.team_id, "vgpus": 1})
    assert emulator.state.calls - calls == 1


async def test_bad_keys_and_foreign_teams_are_refused_without_showing_the_key(emulator):
    bad = HostedAIClient(HostedAICredentials(url=emulator.url, api_key="hai-WRONG-secret", team_id="x"))
    with pytest.raises(HostedAIAuthError) as caught:
        await bad.regions()
    assert "hai-WRONG-secret" not in str(caught.value)
    assert "hai-WRONG-secret" not in repr(bad) and "hai-WRONG-secret" not in repr(bad.credentials)
    acme = emulator.teams["acme"]
    foreign = HostedAIClient(
        HostedAICredentials(url=emulator.url, api_key=acme.api_key, team_id=emulator.teams["globex"].id)
    )
    with pytest.raises(HostedAIAuthError, match="403"):
        await foreign.regions()


async def test_bearer_header_style_works(emulator):
    team = emulator.teams["acme"]
    c = HostedAIClient(
        HostedAICredentials(url=emulator.url, api_key=team.api_key, team_id=team.id, auth_header="bearer")
    )
    assert len(await c.regions()) == 1


async def test_a_tenant_cannot_see_use_or_release_another_tenants_subscription(emulator):
    acme, globex = client(emulator, "acme"), client(emulator, "globex")
    theirs = await globex.subscribe(201, vgpus=1)
    await globex.wait_ready(theirs)
    raw = await _raw(
        emulator, "acme", "GET", "/gpuaas/pool-subscription", params={"team_id": emulator.teams["acme"].id}
    )
    assert theirs in [i["id"] for i in raw.json()["items"]]  # the API's list leaks it...
    assert theirs not in [s.id for s in await acme.subscriptions()]  # ...the client filters it out
    with pytest.raises(HostedAIRejected, match="not found"):
        await acme.inference_url(theirs)
    with pytest.raises(HostedAIRejected, match="not found"):
        await acme.call(
            "POST",
            "/gpuaas/pool/unsubscribe",
            body={"subscription_id": theirs, "team_id": acme.team_id, "pool_id": 201},
        )
    assert await globex.exists(theirs)
    await cleanup(globex)


async def test_circuit_breaker_opens_fails_fast_half_opens_and_closes(emulator, faults):
    # its own base URL spelling, so its own breaker
    url = emulator.url.replace("127.0.0.1", "localhost")
    c = client(emulator, url=url, attempts=1, breaker_threshold=2, breaker_ttl_s=0.5)
    faults(error_rate=1.0)
    for _ in range(2):
        with pytest.raises(HostedAIUnavailable):
            await c.regions()
    assert (await BREAKERS.get_breaker(url)).context.state == "opened"
    calls = emulator.state.calls
    with pytest.raises(CircuitOpen, match="circuit open"):
        await c.regions()
    assert emulator.state.calls == calls  # failed fast: nothing was sent
    await asyncio.sleep(0.6)
    with pytest.raises(HostedAIUnavailable):  # half-open: one probe goes out, fails, re-opens
        await c.regions()
    assert emulator.state.calls == calls + 1
    with pytest.raises(CircuitOpen):
        await c.regions()
    faults()
    await asyncio.sleep(0.6)
    assert len(await c.regions()) == 1  # the probe succeeds: closed again
    assert (await BREAKERS.get_breaker(url)).context.state == "closed"


async def test_team_metrics_cover_ended_subscriptions(emulator):
    c = client(emulator)
    sub_id = await c.subscribe(202, vgpus=1)
    await c.unsubscribe(sub_id, 202)
    metrics = await c.team_metrics("2026-01-01", "2026-12-31")
    assert sub_id in [row["subscription_id"] for row in metrics.items]


async def test_already_subscribed_maps_from_409(emulator):
    c = client(emulator)
    sub_id = await c.subscribe(201, vgpus=1)
    with pytest.raises(AlreadySubscribed):
        await c.call(
            "POST", "/gpuaas/pool/subscribe", body={"pool_id": 201, "team_id": c.team_id, "vgpus": 1}, retry=False
        )
    await c.unsubscribe(sub_id, 201)


async def test_keys_never_reach_logs(emulator, faults, caplog):
    caplog.set_level(logging.DEBUG)
    faults(error_rate=0.3, empty_subscribe_rate=1.0, seed=1)
    c = client(emulator)
    await c.subscribe(201, vgpus=1)
    faults()
    await cleanup(c)
    assert caplog.records, "the client logged nothing to check"
    assert emulator.teams["acme"].api_key not in caplog.text


async def _raw(emulator, tenant, method, path, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(base_url=emulator.url) as http:
        return await http.request(method, path, headers={"X-API-Key": emulator.teams[tenant].api_key}, **kwargs)


# --- idempotent reads: retried on any 5xx and on an error inside a 2xx body ---


@pytest.mark.parametrize("fault", ["read_error_rate", "read_error_in_body_rate"])
async def test_a_failing_read_is_retried_until_it_answers(emulator, faults, fault):
    """GET /gpuaas/available-pools answering HTTP 500 {code 50000001} or 200 {code 12370004}:
    retried, and the pools come back."""
    kind = fault.removesuffix("_rate")
    fired = emulator.state.fired[kind]
    faults(**{fault: 0.5}, seed=4)
    c = client(emulator, attempts=12, backoff_initial_s=0.01, backoff_max_s=0.02)
    for _ in range(4):
        assert {p.name for p in await c.pools()} == {"h100-dedicated", "a100-dedicated", "l4-spot", "a10-spot"}
    assert emulator.state.fired[kind] - fired >= 2  # the faults did fire, and were ridden out


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("read_error_rate", r"HTTP 500: hosted·ai said 'internal error' \(code 50000001\)"),
        ("read_error_in_body_rate", r"error in a 200 body: hosted·ai said '.*' \(code 12370004\)"),
    ],
)
async def test_a_read_that_keeps_failing_ends_unavailable_after_the_attempts(emulator, faults, fault, message):
    faults(**{fault: 1.0})
    c = client(emulator, backoff_initial_s=0.01, backoff_max_s=0.02)
    calls = emulator.state.calls
    with pytest.raises(HostedAIUnavailable, match=message):
        await c.pools()
    assert emulator.state.calls - calls == c.policy.attempts


async def test_read_faults_leave_writes_alone(emulator, faults):
    """The emulator's read faults hit GETs only: a subscribe goes through, and its reconciling
    reads are retried around the faults."""
    faults(read_error_rate=0.4, read_error_in_body_rate=0.3, seed=9)
    c = client(emulator, attempts=12, backoff_initial_s=0.01, backoff_max_s=0.02)
    sub_id = await c.subscribe(201, vgpus=1)
    assert [s.id for s in subs_of(emulator, "acme")] == [sub_id]
    await c.unsubscribe(sub_id, 201)  # its reads (polling until gone) ride out the faults too
    assert subs_of(emulator, "acme") == []


def response(status: int, body=None, text: str | None = None, headers=None) -> httpx.Response:
    if text is not None:
        return httpx.Response(status, text=text, headers=headers)
    return (
        httpx.Response(status, json=body, headers=headers)
        if body is not None
        else httpx.Response(status, headers=headers)
    )


@pytest.mark.parametrize(
    ("status", "body", "read", "raised"),
    [
        # a read's failures: retried...
        (500, {"code": 50000001, "message": "internal error"}, True, HostedAIUnavailable),
        (200, {"code": 12370004, "message": "internal error"}, True, HostedAIUnavailable),
        (503, {"code": 503, "message": "busy"}, True, HostedAIUnavailable),
        (502, None, True, HostedAIUnavailable),
        # ...but a write's business error stays one (subscribe reconciles, never retries blindly)
        (500, {"code": 50000001, "message": "internal error"}, False, HostedAIRejected),
        (200, {"code": 12370004, "message": "internal error"}, False, HostedAIRejected),
        (500, {"code": 10189007, "message": "Insufficient resources"}, False, InsufficientResources),
        (200, {"code": 10189007, "message": "Insufficient resources"}, False, InsufficientResources),
        (500, None, False, HostedAIUnavailable),
        # a read's error object is classified by its code (after the retries, see below), never
        # by its words: "Unauthorized" or "permission" in a message is what hosted·ai said, not
        # proof that the key was refused
        (200, {"code": 401, "message": "token expired"}, True, HostedAIAuthError),
        (500, {"code": 12370001, "message": "Unauthorized"}, True, HostedAIUnavailable),
        (200, {"code": 12370009, "message": "Forbidden: not your team"}, True, HostedAIUnavailable),
        (200, {"code": 12370009, "message": "permission check failed"}, True, HostedAIUnavailable),
        (200, {"code": 404, "message": "Subscription not found"}, True, HostedAIRejected),
        (200, {"code": 404, "message": "gone"}, True, HostedAIRejected),  # by its code alone
        (500, {"code": 12370404, "message": "Pool 9 does not exist"}, True, HostedAIUnavailable),
        # a write's keep their words' meaning: it is never retried on them anyway
        (200, {"code": 12370009, "message": "permission denied"}, False, HostedAIAuthError),
        (500, {"code": 12370404, "message": "Pool 9 does not exist"}, False, HostedAIRejected),
        (401, {"code": 401, "message": "Unauthorized"}, True, HostedAIAuthError),
        (403, None, False, HostedAIAuthError),
        (404, {"code": 404, "message": "Subscription not found"}, True, HostedAIRejected),
        (400, {"code": 400, "message": "bad page"}, True, HostedAIRejected),
        (409, {"code": 409, "message": "Already subscribed"}, False, AlreadySubscribed),
        (429, None, True, HostedAIUnavailable),
    ],
)
def test_which_answers_are_retried(status, body, read, raised):
    from connectors.hostedai import _parse

    with pytest.raises(raised) as caught:
        _parse(response(status, body), "GET" if read else "POST", "/x", idempotent=read)
    assert type(caught.value) is raised  # not a subclass: Unavailable is retried, Rejected is not


def test_answers_that_are_not_errors_pass_through():
    from connectors.hostedai import _parse

    assert _parse(response(200, {"items": [1]}), "GET", "/x", idempotent=True) == {"items": [1]}
    assert _parse(response(200, {"code": 0, "message": "ok", "subscription_id": 5}), "POST", "/x") == {
        "code": 0,
        "message": "ok",
        "subscription_id": 5,
    }
    assert _parse(response(200, {"code": 200, "message": "ok"}), "GET", "/x", idempotent=True)["code"] == 200
    assert _parse(response(200, text="OK"), "POST", "/x") == "OK"
    assert _parse(response(200), "POST", "/x") is None
    with pytest.raises(HostedAIUnavailable) as caught:
        _parse(response(429, headers={"Retry-After": "2.5"}), "GET", "/x", idempotent=True)
    assert caught.value.retry_after == 2.5
    with pytest.raises(HostedAIUnavailable) as caught:
        _parse(
            response(500, {"code": 50000001, "message": "internal error"}, headers={"Retry-After": "3"}),
            "GET",
            "/x",
            idempotent=True,
        )
    assert caught.value.retry_after == 3.0


async def test_the_estimate_is_a_read(emulator, faults):
    """A price quote changes nothing: a 500 envelope or an error in its body is retried like a GET's."""
    c = client(emulator, attempts=12, backoff_initial_s=0.01, backoff_max_s=0.02)
    fired = emulator.state.fired["read_error"] + emulator.state.fired["read_error_in_body"]
    faults(read_error_rate=0.4, read_error_in_body_rate=0.3, seed=2)
    for _ in range(3):
        assert (await c.estimate(201, vgpus=1, hours=1)).currency == "USD"
    assert emulator.state.fired["read_error"] + emulator.state.fired["read_error_in_body"] - fired >= 1
    faults()
    calls = emulator.state.calls
    with pytest.raises(HostedAIRejected, match="not found"):  # an error object: asked again, then by its code
        await c.estimate(999, vgpus=1, hours=1)
    assert emulator.state.calls - calls == c.policy.attempts


@pytest.mark.parametrize(
    ("body", "raised", "code"),
    [
        ({"code": 10189099, "message": "Insufficient resources in pool"}, InsufficientResources, 10189099),
        ({"code": 10189007, "message": "no room"}, InsufficientResources, 10189007),
        ({"code": 12000409, "message": "Already subscribed to this pool"}, AlreadySubscribed, 12000409),
        ({"code": 409, "message": "conflict"}, AlreadySubscribed, 409),
        ({"code": 12370077, "message": "quota exceeded"}, HostedAIRejected, 12370077),
    ],
)
def test_business_errors_are_told_apart_by_code_or_words_and_keep_their_code(body, raised, code):
    from connectors.hostedai import _parse

    for status in (200, 500):
        with pytest.raises(raised) as caught:
            _parse(response(status, body), "POST", "/gpuaas/pool/subscribe")
        assert type(caught.value) is raised and caught.value.code == code
        assert body["message"] in str(caught.value) and "POST /gpuaas/pool/subscribe" in str(caught.value)


def test_an_auth_refusal_in_a_body_says_where_and_what():
    from connectors.hostedai import _parse

    with pytest.raises(
        HostedAIAuthError, match=r"GET /gpuaas/x: error in a 200 body: hosted·ai said 'token expired' \(code 401\)"
    ):
        _parse(response(200, {"code": 401, "message": "token expired"}), "GET", "/gpuaas/x", idempotent=True)
    with pytest.raises(HostedAIAuthError, match=r"POST /gpuaas/x: token expired \(code 12370001\)"):
        _parse(response(200, {"code": 12370001, "message": "token expired"}), "POST", "/gpuaas/x")


async def test_exists_is_about_that_subscription(emulator):
    c = client(emulator)
    sub_id = await c.subscribe(202, vgpus=1)
    await c.wait_ready(sub_id)
    assert await c.exists(sub_id) and not await c.exists(sub_id + 1000)
    await c.unsubscribe(sub_id, 202)
    assert not await c.exists(sub_id)


def own_url(emulator, tag: int) -> str:
    """The emulator under a base URL of its own (localhost spelled in another case), so that the
    test gets a circuit breaker of its own: one exists per base URL."""
    host = "".join(c.upper() if tag >> i & 1 else c for i, c in enumerate("localhost"))
    return emulator.url.replace("127.0.0.1", host)


# --- secrets on every fault path ----------------------------------------------------------------


@pytest.mark.parametrize("auth_header", ["x-api-key", "bearer"])
@pytest.mark.parametrize(
    "path",
    ["timeout", "401", "403", "429", "5xx", "5xx-envelope", "error-in-body", "circuit-open"],
)
async def test_no_failed_call_shows_the_key(emulator, faults, sweep, path, auth_header):
    key = emulator.teams["acme"].api_key
    kwargs = dict(auth_header=auth_header, attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02)
    expected: type[HostedAIError] = HostedAIUnavailable
    if path == "timeout":
        faults(latency_s=0.5)
        c = client(emulator, timeout_s=0.1, **kwargs)
    else:
        c = client(emulator, **kwargs)
    if path == "401":
        key, expected = WRONG_KEY, HostedAIAuthError
        c = client(emulator, key=WRONG_KEY, **kwargs)
    elif path == "403":
        expected = HostedAIAuthError
        c = client(emulator, team=emulator.teams["globex"].id, **kwargs)
    elif path == "429":
        faults(rate_limit_rate=1.0, retry_after_s=0.01)
    elif path == "5xx":
        faults(error_rate=1.0)
    elif path == "5xx-envelope":
        faults(read_error_rate=1.0)
    elif path == "error-in-body":
        faults(read_error_in_body_rate=1.0)
    elif path == "circuit-open":
        expected = CircuitOpen
        c = client(emulator, url=own_url(emulator, 1 + (auth_header == "bearer")), breaker_threshold=1, **kwargs)
        faults(error_rate=1.0)
        with pytest.raises(HostedAIUnavailable) as first:
            await c.regions()
        sweep.error(first.value)
    with pytest.raises(expected) as caught:
        await c.pools()
    assert type(caught.value) is expected
    sweep.error(caught.value)
    sweep.check(key)
    assert key not in repr(c) and key not in repr(c.credentials) and key not in str(c.credentials)


async def test_a_refused_connection_does_not_show_the_key(emulator, sweep):
    port = free_port()  # a port nothing listens on
    c = client(emulator, url=f"http://127.0.0.1:{port}", attempts=2, backoff_initial_s=0.01)
    with pytest.raises(HostedAIUnavailable, match="ConnectError") as caught:
        await c.regions()
    sweep.error(caught.value)
    sweep.check(emulator.teams["acme"].api_key)


@pytest.mark.parametrize("path", ["empty-body", "subscribe-timeout"])
async def test_an_unclear_subscribe_logs_its_warning_without_the_key(emulator, faults, sweep, path):
    if path == "empty-body":
        faults(empty_subscribe_rate=1.0, visibility_s=0.2)
        c = client(emulator)
    else:
        faults(timeout_rate=1.0, timeout_s=1.0, visibility_s=0.2)
        c = client(emulator, subscribe_timeout_s=0.2)
    sub_id = await c.subscribe(201, vgpus=1)
    assert sweep.seen(logging.WARNING, "reconciling")  # the path did run
    faults()
    await c.unsubscribe(sub_id, 201)
    sweep.check(emulator.teams["acme"].api_key)


# --- the circuit breaker counts unavailability only ---------------------------------------------


async def test_business_refusals_never_open_the_breaker(emulator, faults):
    url = own_url(emulator, 5)
    c = client(emulator, url=url, attempts=1, breaker_threshold=2, breaker_ttl_s=60)
    acme = emulator.teams["acme"]
    refusals = [
        (HostedAIRejected, lambda: c.estimate(999, vgpus=1, hours=1)),  # not found, in a body
        (
            HostedAIRejected,
            lambda: c.call("GET", "/gpuaas/connection-info", params={"team_id": acme.id, "subscription_id": 1}),
        ),  # 404
        (
            InsufficientResources,
            lambda: c.call(
                "POST", "/gpuaas/pool/subscribe", retry=False, body={"pool_id": 202, "team_id": acme.id, "vgpus": 60}
            ),
        ),
        (
            HostedAIAuthError,
            lambda: client(
                emulator, url=url, team=emulator.teams["globex"].id, attempts=1, breaker_threshold=2
            ).regions(),
        ),
        (
            HostedAIAuthError,
            lambda: client(emulator, url=url, key=WRONG_KEY, attempts=1, breaker_threshold=2).regions(),
        ),
    ]
    for expected, call in refusals * 2:  # ten refusals in a row, threshold two
        with pytest.raises(expected):
            await call()
        assert (await BREAKERS.get_breaker(url)).context.state == "closed"
    sub_id = await c.subscribe(202, vgpus=1)
    for _ in range(3):
        with pytest.raises(AlreadySubscribed):
            await c.call(
                "POST", "/gpuaas/pool/subscribe", body={"pool_id": 202, "team_id": acme.id, "vgpus": 1}, retry=False
            )
    assert (await BREAKERS.get_breaker(url)).context.state == "closed"
    assert len(await c.regions()) == 1
    await c.unsubscribe(sub_id, 202)
    # and the same breaker does open on what it is for
    faults(error_rate=1.0)
    for _ in range(2):
        with pytest.raises(HostedAIUnavailable):
            await c.regions()
    with pytest.raises(CircuitOpen):
        await c.regions()


# --- answers parsed, not indexed: connection-info's shapes, service discovery, service URLs ---


async def ready_subscription(c: HostedAIClient, pool: int = 201) -> int:
    sub_id = await c.subscribe(pool, vgpus=1)
    await c.wait_ready(sub_id)
    return sub_id


async def answers_models(url: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(f"{url}/models")).status_code == 200


@pytest.mark.parametrize("shape", ["pods", "subscriptions", "bare"])
async def test_connection_info_in_each_known_shape_gives_the_pods_service(emulator, faults, shape):
    """{pods: [...]}, subscription entries each with its pods, a bare array of pods: the same URL."""
    faults(connection_info_shape=shape)
    c = client(emulator)
    sub_id = await ready_subscription(c)
    url = await c.inference_url(sub_id)
    assert re.search(rf"/pods/pod-{sub_id}/[\w-]{{20,}}/v1$", url) and await answers_models(url)
    await cleanup(c)


async def test_connection_info_in_an_unknown_shape_is_an_error_naming_the_endpoint(emulator, faults):
    faults(connection_info_shape="unknown")
    c = client(emulator)
    sub_id = await ready_subscription(c)
    with pytest.raises(HostedAIError) as caught:  # not a KeyError, not a traceback
        await c.inference_url(sub_id)
    assert str(caught.value) == (
        "hosted·ai GET /gpuaas/connection-info answered a list of 3 objects without pods: keys id, name"
    )
    await cleanup(c)


def test_connection_info_shapes_are_parsed_for_the_asked_subscription():
    from connectors.hostedai_models import pods_of

    pod = {"pod_name": "p-1", "discovered_services": None, "ssh_info": {"host": "h"}, "new_field": 1}
    other = {"pod_name": "p-2"}
    assert [p.pod_name for p in pods_of({"pods": [pod]}, 7, "GET /c")] == ["p-1"]
    assert [p.pod_name for p in pods_of([pod], 7, "GET /c")] == ["p-1"]
    entries = [{"id": 6, "pods": [other]}, {"id": 7, "pods": {"items": [pod]}}]
    assert [p.pod_name for p in pods_of(entries, 7, "GET /c")] == ["p-1"]  # this subscription's entry
    assert [p.pod_name for p in pods_of([{"pods": [pod]}], 7, "GET /c")] == ["p-1"]  # entries without ids
    assert pods_of(None, 7, "GET /c") == [] and pods_of({"pods": None}, 7, "GET /c") == []
    for odd, words in [
        ({"pods": [{"name": "x"}]}, r"GET /c answered a list of 1 objects: keys name, not a list of Pod \(0.pod_name"),
        ([1, 2], r"GET /c answered a list of 2 items \(int\), neither pods"),
        ({"pod": {}}, r"GET /c answered an object with keys pod, not a list"),
        ("<html>hai-secret</html>", r"GET /c answered a text body of 23 characters, not a list"),
    ]:
        with pytest.raises(HostedAIError, match=words) as caught:
            pods_of(odd, 7, "GET /c")
        assert "hai-secret" not in str(caught.value)


async def test_a_service_discovered_under_another_name_is_used_and_nothing_is_exposed(emulator, faults):
    """The pod lists its server as "vllm-openai" (after a service that serves no models): it is
    found by asking each for /v1/models, and no second expose-service is sent (the panel refuses
    one for a port already exposed)."""
    faults(discovered_as="vllm-openai")
    c = client(emulator)
    sub_id = await ready_subscription(c)
    exposed = emulator.state.calls_by_route["POST /pods/expose-service"]
    url = await c.inference_url(sub_id)
    assert re.search(rf"/pods/pod-{sub_id}/[\w-]{{20,}}/v1$", url) and await answers_models(url)
    assert emulator.state.calls_by_route["POST /pods/expose-service"] == exposed
    await cleanup(c)


async def test_a_service_is_exposed_only_when_none_is_found(emulator):
    c = client(emulator)
    sub_id = await ready_subscription(c)
    exposed = emulator.state.calls_by_route["POST /pods/expose-service"]
    first = await c.inference_url(sub_id)
    assert emulator.state.calls_by_route["POST /pods/expose-service"] == exposed + 1
    assert await c.inference_url(sub_id) == first  # found by name now
    assert emulator.state.calls_by_route["POST /pods/expose-service"] == exposed + 1
    await cleanup(c)


async def test_a_reads_error_object_is_retried_then_reported_in_hosted_ais_words(emulator, faults):
    """An error object with "permission" in a GET's body is no proof the key was refused: asked
    again, and once hosted·ai answers the read succeeds; if it never does, the error quotes
    hosted·ai (short, the key taken out) instead of guessing at the key."""
    c = client(emulator)
    faults(body_error_reads=2, body_error_message="permission check failed, try again")
    calls = emulator.state.calls
    assert [r.gpuaas_id for r in await c.regions()] == [7]
    assert emulator.state.calls - calls == 3 and emulator.state.fired["body_error_read"] >= 2
    key = emulator.teams["acme"].api_key
    faults(body_error_reads=100, body_error_message=f"permission denied for {key}: " + "x" * 500)
    calls = emulator.state.calls
    with pytest.raises(HostedAIUnavailable) as caught:
        await c.regions()
    message = str(caught.value)
    assert emulator.state.calls - calls == c.policy.attempts
    assert message.startswith(
        "hosted·ai GET /gpuaas/available-regions: error in a 200 body: hosted·ai said 'permission denied for …: xxx"
    )
    assert message.endswith("…' (code 12370004)") and len(message) < 250
    assert key not in message and "API key was refused" not in message


async def test_a_writes_error_object_is_still_not_retried(emulator, faults):
    faults(body_error_reads=100)  # reads only: the write goes through
    c = client(emulator)
    calls = emulator.state.calls
    with pytest.raises(HostedAIRejected, match="not found"):
        await c.call("POST", "/gpuaas/pool/subscribe", body={"pool_id": 999, "team_id": c.team_id, "vgpus": 1})
    assert emulator.state.calls - calls == 1


@pytest.fixture
def bystander(asgi_server):
    """A loopback server that counts what reaches it: where a hostile service URL points."""
    hits = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        hits.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object": "list", "data": []}'})

    url, stop = asgi_server(app)
    yield url, hits
    stop()


@pytest.mark.parametrize(
    ("service_url", "problem"),
    [
        ("{bystander}/v1", r"host 127\.0\.0\.1:\d+: a loopback or private host that is not the panel's own"),
        ("http://169.254.169.254/latest/meta-data", "host 169.254.169.254: a link-local address"),
        ("http://[fe80::1]/v1", "host fe80::1: a link-local address"),
        ("{bystander}#", "a fragment"),
        ("{bystander}/v1?next=", "a query"),
        ("http://user:pw@127.0.0.1/v1", "credentials"),
        ("file:///etc/passwd", "scheme 'file'"),
    ],
)
@pytest.mark.parametrize("discovered_as", [None, "vllm-openai"])
async def test_a_service_url_of_the_panels_choosing_is_refused_before_anything_is_sent(
    emulator, faults, bystander, service_url, problem, discovered_as
):
    url, hits = bystander
    faults(service_url=service_url.format(bystander=url), discovered_as=discovered_as)
    c = client(emulator)
    sub_id = await ready_subscription(c)
    with pytest.raises(
        HostedAIRejected, match=f"^hosted·ai service URL of subscription {sub_id}: .*{problem}"
    ) as caught:
        await c.inference_url(sub_id)
    assert hits == []  # nothing was sent there, not even a probe
    assert "pw" not in str(caught.value) and "meta-data" not in str(caught.value)
    await cleanup(c)


def test_service_urls_are_checked_against_where_the_panel_is():
    public = HostedAIClient(HostedAICredentials(url="https://panel.example/api", api_key="k", team_id="t"))
    assert public.service_url(1, "https://pods.panel.example/p-1/k3y/v1/") == "https://pods.panel.example/p-1/k3y/v1"
    for url in ("http://127.0.0.1:8000/v1", "http://10.0.0.5/v1", "http://localhost/v1", "http://169.254.169.254/"):
        with pytest.raises(HostedAIRejected, match="service URL of subscription 1: host"):
            public.service_url(1, url)
    local = HostedAIClient(HostedAICredentials(url="http://127.0.0.1:8700", api_key="k", team_id="t"))
    assert local.service_url(1, "http://127.0.0.1:8700/pods/p/k/v1") == "http://127.0.0.1:8700/pods/p/k/v1"
    assert local.service_url(1, "https://pods.panel.example/v1") == "https://pods.panel.example/v1"  # public: fine
    for url in ("http://127.0.0.1:4200/v1", "http://10.0.0.5:8700/v1", "http://169.254.169.254/"):
        with pytest.raises(HostedAIRejected):
            local.service_url(1, url)


def test_error_messages_quote_hosted_ai_in_short_and_describe_other_bodies_by_shape():
    from connectors.hostedai import _parse, said

    key = "hai-live-9f8e7d6c5b4a"
    assert said(f"bad\nthing {key}\x00 and pods/p-1/AbCdEf0123456789xyzXYZ/v1", key) == "bad thing … and pods/p-1/…/v1"
    assert len(said("y" * 1000)) == 120
    page = "<html>" + "internal stack trace " * 100 + "</html>"
    with pytest.raises(HostedAIRejected) as caught:
        _parse(response(400, text=page), "POST", "/gpuaas/pool/subscribe")
    assert str(caught.value) == "hosted·ai POST /gpuaas/pool/subscribe: HTTP 400: a text body of 2113 characters"
    with pytest.raises(HostedAIRejected) as caught:
        _parse(response(200, {"code": 12370077, "message": f"quota for {key} exceeded"}), "POST", "/x", secret=key)
    assert key not in str(caught.value) and "quota for … exceeded" in str(caught.value)
