"""Guarantees of the hosted·ai client and backend that a one-line break must fail:
the API key absent from every error, warning and log line on every fault path; the circuit
breaker counting only "hosted·ai is not answering", never a business refusal; retire leaving
alone a subscription that another process still uses; `homeskillet allocations` showing another
process's allocations as they are. Real HTTP to the emulator, the real ledger, real processes;
no Prefect server needed (credentials are handed to the backend directly)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import traceback
import warnings

import pytest

from connectors.hostedai import BREAKERS, Policy
from connectors.hostedai_backend import HostedAIBackend
from connectors.ledger import new_allocation_id
from homeskillet.errors import (
    AlreadySubscribed,
    CircuitOpen,
    HostedAIAuthError,
    HostedAIError,
    HostedAIRejected,
    HostedAIUnavailable,
    InferenceError,
    InsufficientResources,
    Preempted,
)
from homeskillet.schemas import HostedAICredentials
from tasks import runtime
from tests.support import HOMESKILLET, free_port
from tests.support import emulator_client as client
from tests.support import emulator_credentials as creds

pytestmark = pytest.mark.usefixtures("no_subscriptions_left")
WRONG_KEY = "hai-WRONG-7f3a9c1e-secret"


def backend(emulator, test_catalog, tenant="acme", policy: Policy | None = None) -> HostedAIBackend:
    """A hosted·ai backend of its own (its ledger on the session's PostgreSQL: a test that makes
    one asks for `postgres`)."""
    from homeskillet.settings import get_settings
    from tasks import runtime

    async def credentials(name: str) -> HostedAICredentials:
        assert name == tenant
        return creds(emulator, tenant)

    return HostedAIBackend(get_settings(), runtime.catalog(test_catalog), credentials, policy)


def own_url(emulator, tag: int) -> str:
    """The emulator under a base URL of its own (localhost spelled in another case), so that the
    test gets a circuit breaker of its own: one exists per base URL."""
    host = "".join(c.upper() if tag >> i & 1 else c for i, c in enumerate("localhost"))
    return emulator.url.replace("127.0.0.1", host)


# --- secrets on every fault path ----------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record):
        self.records.append(record)


class Sweep:
    """Everything a fault path left behind that a person or a log shipper could read: the errors
    handed to it, every log record of every logger at DEBUG (on the loggers themselves: Prefect's
    logging set-up stops `connectors` from propagating to the root), every warning."""

    LOGGERS = ("", "connectors", "httpx", "httpcore", "prefect", "tasks", "flows")

    def __init__(self):
        self.handler = _Records()
        self.texts: list[str] = []
        self.warned: list[warnings.WarningMessage] = []

    @property
    def records(self) -> list[logging.LogRecord]:
        return self.handler.records

    def error(self, exc: BaseException) -> BaseException:
        self.texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc)), repr(vars(exc))]
        return exc

    def seen(self, level: int, words: str) -> bool:
        return any(r.levelno >= level and words in r.getMessage() for r in self.records)

    def check(self, secret: str) -> None:
        logged = [f"{self.handler.format(r)} {r.args!r}" for r in self.records]
        warned = [f"{w.message} {w.category}" for w in self.warned]
        assert secret not in "\n".join(self.texts + logged + warned)


@pytest.fixture
def sweep():
    s = Sweep()
    loggers = [logging.getLogger(name) for name in Sweep.LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(s.handler)
        lg.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            yield s
            s.warned = list(warned)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(s.handler)
            lg.setLevel(level)


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


@pytest.mark.usefixtures("postgres")
async def test_insufficient_everywhere_names_the_pools_not_the_key(emulator, faults, sweep, test_catalog):
    faults(insufficient_pools=[101, 102])
    b = backend(emulator, test_catalog)
    from homeskillet import catalog as cat

    echo = cat.model(b._catalog, "echo")
    with pytest.raises(InsufficientResources, match="h100-dedicated .insufficient resources.") as caught:
        await b.allocate(
            allocation_id=new_allocation_id(),
            tenant="acme",
            request_id="r",
            pool="hostedai-dedicated",
            model=echo,
            wait_s=5,
        )
    sweep.error(caught.value)
    sweep.check(emulator.teams["acme"].api_key)
    assert await b.held("acme") == []


@pytest.mark.usefixtures("postgres")
async def test_an_unsubscribe_that_fails_is_logged_without_the_key_and_retried_later(
    emulator, faults, sweep, test_catalog
):
    """The fragment is done, the share stays for now (error logged), and a later retire gives it
    back once hosted·ai answers again, with no release or shutdown to prompt it."""
    b = backend(emulator, test_catalog, policy=Policy(attempts=2, backoff_initial_s=0.01, backoff_max_s=0.2))
    from homeskillet import catalog as cat

    allocation_id = new_allocation_id()
    await b.allocate(
        allocation_id=allocation_id,
        tenant="acme",
        request_id="r",
        pool="hostedai-dedicated",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    (sub_id,) = b.subscriptions().values()
    errors = emulator.state.fired["error"]
    faults(error_rate=1.0, fault_paths=["/gpuaas/pool/unsubscribe"])
    await b.release(allocation_id, "acme")
    assert sweep.seen(logging.ERROR, f"unsubscribe of {sub_id} failed")
    assert sweep.seen(logging.WARNING, "stays until the next retire")
    assert b.subscriptions() == {("acme", "hostedai-dedicated"): sub_id}  # still ours, not forgotten
    assert emulator.state.fired["error"] - errors >= 2 and emulator.state.subs[sub_id].unsubscribed is None
    faults()
    deadline = time.monotonic() + 10
    while b.subscriptions() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert b.subscriptions() == {}  # the scheduled retry gave it back
    sweep.check(emulator.teams["acme"].api_key)


@pytest.mark.usefixtures("postgres")
async def test_a_preempted_fragment_errs_without_the_key(emulator, faults, sweep, test_catalog):
    from connectors import openai_client
    from homeskillet import catalog as cat
    from tasks.resources import infer

    b = backend(emulator, test_catalog)
    allocation_id = new_allocation_id()
    allocation = await b.allocate(
        allocation_id=allocation_id,
        tenant="acme",
        request_id="r",
        pool="hostedai-preemptible",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    preempted = emulator.state.fired["preempt"]
    faults(preempt_rate=1.0)
    try:
        with pytest.raises(InferenceError, match="preempted") as caught:
            await openai_client.complete(
                allocation.endpoint, "echo-1", messages=[{"role": "user", "content": "x"}], max_tokens=4
            )
        sweep.error(caught.value)
        assert emulator.state.fired["preempt"] == preempted + 1
        assert await b.verify(allocation) is False  # gone: forgotten, so the next allocation subscribes anew
        assert sweep.seen(logging.WARNING, "(preempted)")
        with pytest.raises(Preempted) as task_error:  # what the flow's infer task raises
            await infer.fn(runtime.services(test_catalog), allocation, "x", 4)
        sweep.error(task_error.value)
    finally:
        await b.release(allocation_id, "acme")
    assert b.subscriptions() == {}
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


# --- retire respects other processes; the CLI shows them -----------------------------------------

OTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from connectors import openai_client
    from connectors.hostedai_backend import HostedAIBackend
    from connectors.ledger import new_allocation_id
    from homeskillet import catalog as cat
    from homeskillet.catalog import load_catalog
    from homeskillet.schemas import HostedAICredentials
    from homeskillet.settings import get_settings

    async def main():
        catalog = load_catalog(sys.argv[1])
        creds = HostedAICredentials(url=os.environ["EMU_URL"], api_key=os.environ["EMU_KEY"], team_id=os.environ["EMU_TEAM"])

        async def credentials(tenant):
            return creds

        backend = HostedAIBackend(get_settings(), catalog, credentials)
        allocation_id = new_allocation_id()
        allocation = await backend.allocate(allocation_id=allocation_id, tenant="acme", request_id="r-other-process",
                                            pool="hostedai-dedicated", model=cat.model(catalog, "echo"), wait_s=10)
        print(json.dumps({"allocation_id": allocation_id, "subscription": backend.subscriptions()[("acme", "hostedai-dedicated")],
                          "pid": os.getpid()}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # go on when the test says so
        out = await openai_client.complete(allocation.endpoint, "echo-1", messages=[{"role": "user", "content": "from B"}],
                                           max_tokens=8)
        await backend.release(allocation_id, "acme")
        print(json.dumps({"answer": out.text, "left": list(backend.subscriptions().values())}), flush=True)

    asyncio.run(main())
    """
)


def cli_allocations(*args: str) -> list[dict]:
    done = subprocess.run([HOMESKILLET, "allocations", "--json", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.usefixtures("postgres")  # `homeskillet allocations` reads the ledger
async def test_retire_leaves_a_subscription_another_process_uses_and_the_cli_shows_both(emulator, test_catalog):
    from homeskillet import catalog as cat

    here = backend(emulator, test_catalog)
    mine = new_allocation_id()
    allocation = await here.allocate(
        allocation_id=mine,
        tenant="acme",
        request_id="r-this-process",
        pool="hostedai-dedicated",
        model=cat.model(here._catalog, "echo"),
        wait_s=5,
    )
    (sub_id,) = here.subscriptions().values()
    team = emulator.teams["acme"]
    env = os.environ | {"EMU_URL": emulator.url, "EMU_KEY": team.api_key, "EMU_TEAM": team.id}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, test_catalog],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        started = json.loads(await asyncio.to_thread(other.stdout.readline) or "{}")
        assert started.get("subscription") == sub_id  # adopted the tenant's subscription: no second one
        assert [s.id for s in emulator.state.subs.values() if s.team_id == team.id] == [sub_id]

        # `homeskillet allocations`, a third process, lists both, as they are
        listed = {a["allocation_id"]: a for a in cli_allocations()}
        assert {mine, started["allocation_id"]} <= set(listed)
        for allocation_id, request_id in ((mine, "r-this-process"), (started["allocation_id"], "r-other-process")):
            row = listed[allocation_id]
            assert (row["tenant"], row["pool"], row["model"], row["request_id"], row["state"]) == (
                "acme",
                "hostedai-dedicated/acme",
                "echo",
                request_id,
                "active",
            )
            assert row["endpoint"] == allocation.endpoint  # the subscription's pod
            assert row["tflops"] == 1.0 and row["vram_gb"] == 0.5
        assert mine in {a["allocation_id"] for a in cli_allocations("--tenant", "acme")}
        assert not {mine, started["allocation_id"]} & {
            a["allocation_id"] for a in cli_allocations("--tenant", "globex")
        }

        # this process's last release must not unsubscribe what the other process still uses
        await here.release(mine, "acme")
        assert emulator.state.subs[sub_id].unsubscribed is None
        assert await here.retire_idle(0) == 0  # held off again: nothing retired, none counted
        assert emulator.state.subs[sub_id].unsubscribed is None
        other.stdin.write("go\n")
        other.stdin.flush()
        finished = json.loads(await asyncio.to_thread(other.stdout.readline) or "{}")
        assert finished == {"answer": "echo: from B", "left": []}  # it worked on, then retired the subscription
        assert await asyncio.to_thread(other.wait, 30) == 0
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    emulator.state.sweep()
    assert sub_id not in emulator.state.subs or emulator.state.subs[sub_id].unsubscribed is not None
    # this process forgets its share of it once it looks again (it was held off, not dropped)
    deadline = time.monotonic() + 10
    while here.subscriptions() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert here.subscriptions() == {}
    assert cli_allocations("--tenant", "acme") == []


@pytest.mark.usefixtures("postgres")
async def test_verify_tells_a_live_share_from_a_vanished_one_and_does_not_guess(emulator, faults, test_catalog):
    """verify() says True for a live subscription and when hosted·ai cannot be asked (not a
    preemption), False once the subscription is gone; the hosted·ai backend lists only its own
    (per-tenant ledger pool) allocations."""
    from homeskillet import catalog as cat
    from tasks import runtime

    b = backend(emulator, test_catalog, policy=Policy(attempts=1, breaker_threshold=100))
    allocation_id = new_allocation_id()
    allocation = await b.allocate(
        allocation_id=allocation_id,
        tenant="acme",
        request_id="r",
        pool="hostedai-dedicated",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    local = runtime.backend(test_catalog)
    local_id = new_allocation_id()
    await local.allocate(
        allocation_id=local_id,
        tenant="acme",
        request_id="r",
        pool="tiny",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    try:
        assert [a.allocation_id for a in await b.held("acme")] == [allocation_id]
        assert await b.verify(allocation) is True
        faults(error_rate=1.0)
        assert await b.verify(allocation) is True  # cannot tell: no preemption is declared
        assert b.subscriptions() != {}
        faults()
        (sub_id,) = b.subscriptions().values()
        emulator.state.preempt(emulator.state.subs[sub_id])
        assert await b.verify(allocation) is False
        assert b.subscriptions() == {}  # forgotten: the next allocation subscribes anew
    finally:
        await local.release(local_id, "acme")
        await b.release(allocation_id, "acme")
