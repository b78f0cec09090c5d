"""`homeskillet loadtest`: the figures it reports, and that its invariant checks see a break."""

import asyncio

import pytest

from apps.loadtest import Run, _sample, chunk_text, quantile, run_load, sse_data, streamed_problem
from connectors.ledger import new_allocation_id
from connectors.tokens import TokenStore
from homeskillet.errors import InvalidRequest
from homeskillet.settings import RECORDINGS as ROUTERBENCH
from homeskillet.settings import get_settings
from tasks import runtime

INVARIANTS = ("leaked_allocations", "capacity_violations", "cross_tenant", "duplicate_subscriptions")


def broken(figures: dict) -> dict:
    """The invariants the run saw broken, with their counts (none: {})."""
    return {name: figures[name] for name in INVARIANTS if figures[name] != 0}


RECORDINGS = ROUTERBENCH / "arc_challenge_train.csv"


@pytest.mark.usefixtures("local_services")  # flows
async def test_a_small_load_on_the_local_models_keeps_every_invariant(assert_no_leaks):
    figures = await run_load(requests=6, concurrency=3, tenants=2, max_tokens=8, sample_s=0.05)
    assert figures["ok"] + sum(figures["errors"].values()) == 6
    assert figures["ok"] == 6, figures["errors"]
    assert figures["samples"] > 0 and figures["tenants"] == ["demo", "acme"]
    assert broken(figures) == {}
    assert 0 < figures["latency_s"]["p50"] <= figures["latency_s"]["p95"] <= figures["latency_s"]["p99"]


@pytest.mark.usefixtures("local_services")  # flows
async def test_a_small_load_through_the_api_keeps_every_invariant_and_revokes_its_tokens(assert_no_leaks):
    store = await TokenStore.open(get_settings().pgdata)
    before = {t["token_id"] for t in await store.list()}
    figures = await run_load(requests=4, concurrency=2, tenants=2, max_tokens=8, sample_s=0.05, via="api")
    made = [t for t in await store.list() if t["token_id"] not in before]
    await store.close()
    assert figures["ok"] == 4, figures["errors"]
    assert figures["via"] == "api" and figures["samples"] > 0
    assert broken(figures) == {}
    assert sorted(t["tenant"] for t in made) == ["acme", "demo"]  # a token per tenant, for the run only
    assert all(t["revoked_at"] is not None for t in made)


@pytest.mark.usefixtures("local_services")  # flows
async def test_a_replayed_load_answers_from_the_recordings_and_keeps_every_invariant(assert_no_leaks):
    figures = await run_load(
        requests=9, concurrency=3, tenants=3, backend="replay", recordings=RECORDINGS, sample_s=0.05
    )
    assert figures["ok"] == 9, figures["errors"]
    assert figures["tenants"] == ["tenant-1", "tenant-2", "tenant-3"] and figures["samples"] > 0
    assert broken(figures) == {}


@pytest.mark.parametrize(
    ("backend", "recordings", "problem"),
    [
        ("replay", None, "--recordings"),
        ("local", RECORDINGS, "--recordings"),
        ("gpu-farm", None, "unknown backend 'gpu-farm'"),
        ("hostedai", None, "--via api runs on the local backend"),
    ],
)
async def test_a_load_that_cannot_run_as_asked_says_why(backend, recordings, problem):
    via = "api" if "--via" in problem else "flow"
    with pytest.raises(InvalidRequest, match=problem):
        await run_load(requests=1, concurrency=1, tenants=1, backend=backend, recordings=recordings, via=via)
    with pytest.raises(InvalidRequest, match="unknown way in 'carrier-pigeon'"):
        await run_load(requests=1, concurrency=1, tenants=1, via="carrier-pigeon")


def lines(*texts: str):
    async def each():
        for text in texts:
            yield text

    return each()


async def test_a_streamed_answer_is_read_to_its_done_and_its_failures_are_named():
    role = 'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}'
    text = 'data: {"choices": [{"delta": {"content": "Paris."}}]}'
    assert sse_data(": keep-alive") is None and sse_data("data: [DONE]") == "[DONE]"
    assert chunk_text(sse_data(role)) == "" and chunk_text(sse_data(text)) == "Paris."
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 2}}) == ""
    assert await streamed_problem(lines(role, "", text, "", "data: [DONE]")) is None
    assert await streamed_problem(lines(role, "data: [DONE]")) == "empty answer"
    assert await streamed_problem(lines(role, text)) == "stream ended before [DONE]"
    error = 'data: {"error": {"message": "x", "type": "server_error"}}'
    assert await streamed_problem(lines(role, text, error, "data: [DONE]")) == "stream error server_error"


@pytest.mark.usefixtures("postgres")  # the ledger
async def test_the_sampler_sees_cross_tenant_holdings_and_overfull_pools(test_catalog):
    services = runtime.services(test_catalog)
    ledger = await services.local.ledger()
    pool = next(p for p in services.catalog.pools if p.id == "roomy")
    await ledger.sync_pools([pool.model_copy(update={"id": "loadtest-pool"})])
    allocation_id = new_allocation_id()
    await ledger.reserve(
        allocation_id=allocation_id,
        tenant="sampler-a",  # tenants of this test alone: no quota synced by another
        request_id="load-x",
        pool="loadtest-pool",
        model="echo",
        tflops=pool.tflops,
        vram_gb=pool.vram_gb,
        wait_s=1,
    )
    # the pool shrinks under the allocation (as a catalog change could make it): now it is overfull
    await ledger.sync_pools([pool.model_copy(update={"id": "loadtest-pool", "tflops": pool.tflops / 2})])
    run = Run(tenant_of={"load-x": "sampler-b"})  # the request was sampler-b's, but sampler-a holds its slice
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(services, run, None, stop, 0.01))
    await asyncio.sleep(0.2)
    stop.set()
    await sampler
    await ledger.release(allocation_id, "sampler-a")
    assert run.cross_tenant and "held by sampler-a" in run.cross_tenant[0]
    assert run.capacity_violations and run.capacity_violations[0].startswith("loadtest-pool:")


def test_quantiles_are_latencies_that_were_seen():
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0 and quantile([1.0, 2.0, 3.0, 4.0], 0.99) == 4.0


async def test_hostedai_load_with_a_fifth_of_calls_failing_keeps_every_invariant(
    hostedai_tenants, faults, no_subscriptions_left, assert_no_leaks
):
    faults(error_rate=0.2, latency_s=0.01)
    calls = hostedai_tenants.state.calls
    figures = await run_load(
        requests=8,
        concurrency=4,
        tenants=3,
        backend="hostedai",
        max_tokens=8,
        sample_s=0.05,
        emulator_state=hostedai_tenants.state,
    )
    assert hostedai_tenants.state.calls > calls  # the load reached the emulator
    assert figures["ok"] + sum(figures["errors"].values()) == 8
    unexpected = [name for name in figures["errors"] if name.startswith("unexpected")]
    assert not unexpected, figures["errors"]
    assert broken(figures) == {}
