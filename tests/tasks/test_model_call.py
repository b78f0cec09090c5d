"""One model call (`tasks.model_call`): once its slice is held it reserves its worst-case cost
against the tenant's budget, and settles what it really cost while the slice is still held. A call
that is cancelled or fails after its reservation is billed for what it used (its slice's time); a
cancellation that lands while the spend is written loses neither the spend nor the call's
telemetry record; calls running at once cannot together overrun the budget. Through the flow, on
the echo double."""

import asyncio
import time

import asyncpg
import pytest

from connectors import postgres
from connectors.telemetry import read_records
from flows.fusion import fuse_request
from homeskillet.errors import CovenantViolation, InferenceError
from homeskillet.settings import get_settings
from tasks import runtime
from tasks.routing import worst_case_cost

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks", "ledger_tables")


@pytest.fixture
async def ledger_tables(test_catalog):
    """The ledger's tables exist before a test reads them."""
    await runtime.backend(test_catalog).ledger()


def echo_worst_case(catalog_path, pool: str, prompt: str = "Say one.") -> float:
    """The worst case an echo call on `pool` reserves."""
    catalog = runtime.catalog(catalog_path)
    echo = next(m for m in catalog.models if m.name == "echo")
    where = next(p for p in catalog.pools if p.id == pool)
    return worst_case_cost(echo, where, prompt, 128, get_settings().infer_timeout_s)


async def spend_rows(request_id: str) -> list[dict]:
    """The ledger's spend rows of a request: its calls' reservations and settlements."""
    conn = await asyncpg.connect(postgres.dsn(get_settings().pgdata, "homeskillet"))
    try:
        query = "SELECT allocation_id, state, cost_usd, reserved_usd FROM spend WHERE request_id = $1"
        return [dict(r) for r in await conn.fetch(query, request_id)]
    finally:
        await conn.close()


async def until_reserved(request_id: str, run: asyncio.Task, timeout_s: float = 60) -> dict:
    """The request's first reservation, once it is written: its slice is held, its call starts."""
    deadline = time.monotonic() + timeout_s
    while not (rows := await spend_rows(request_id)):
        assert not run.done() and time.monotonic() < deadline, "the call never reserved its worst case"
        await asyncio.sleep(0.02)
    return rows[0]


def records_of(request_id: str):
    records = read_records(get_settings().telemetry)
    return records[records.request_id == request_id]


def echo_request(catalog_path, request_id: str, prompt: str = "Say one.", tenant: str = "acme", pool="roomy"):
    return fuse_request(
        prompt=prompt,
        tenant=tenant,
        request_id=request_id,
        constraints={"allowed_models": ["echo"], "pool": pool, "split": False},
        catalog_path=catalog_path,
    )


async def test_a_call_reserves_its_worst_case_while_it_runs_and_settles_what_it_cost(test_catalog):
    request_id = f"reserved-then-settled-{time.monotonic_ns()}"
    run = asyncio.create_task(echo_request(test_catalog, request_id))
    reservation = await until_reserved(request_id, run)
    worst = echo_worst_case(test_catalog, "roomy")
    assert reservation["state"] == "reserved" and reservation["reserved_usd"] == pytest.approx(worst)
    result = await run
    (settled,) = await spend_rows(request_id)
    assert settled["state"] == "settled" and settled["allocation_id"] == result.fragments[0].allocation_id
    assert settled["cost_usd"] == pytest.approx(result.cost_usd) and 0 < settled["cost_usd"] < worst


async def test_a_call_cancelled_while_it_runs_is_billed_for_the_time_its_slice_was_held(test_catalog, monkeypatch):
    """Cancelled once its slice is held and inference started: no tokens come back, but the
    slice's time until then is billed, its reservation settled at that, and the slice released."""
    monkeypatch.setenv("ECHO_DELAY_S", "30")
    request_id = f"cancelled-mid-call-{time.monotonic_ns()}"
    run = asyncio.create_task(echo_request(test_catalog, request_id))
    await until_reserved(request_id, run)
    await asyncio.sleep(0.5)  # inference is under way
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    (row,) = await spend_rows(request_id)
    worst = echo_worst_case(test_catalog, "roomy")
    assert row["state"] == "settled" and 0 < row["cost_usd"] < worst
    (record,) = records_of(request_id).itertuples()
    assert record.error_class == "CancelledError" and record.cost_usd == pytest.approx(row["cost_usd"])


async def test_a_call_whose_model_fails_is_billed_for_the_time_its_slice_was_held(test_catalog, echo_server):
    seen = len(echo_server.seen)
    request_id = f"failed-call-{time.monotonic_ns()}"
    with pytest.raises(InferenceError, match="model crashed"):
        await echo_request(test_catalog, request_id, prompt="FAIL now.")
    assert len(echo_server.seen) - seen == 1  # the model was called, and failed
    (row,) = await spend_rows(request_id)
    assert row["state"] == "settled" and 0 < row["cost_usd"] < echo_worst_case(test_catalog, "roomy")
    (record,) = records_of(request_id).itertuples()
    assert record.error_class == "InferenceError" and record.cost_usd == pytest.approx(row["cost_usd"])


class SettlementHeld:
    """A row lock on a request's reservation, taken as soon as it is written: its settlement
    (an UPDATE of that row) waits until `let_go`."""

    async def hold(self, request_id: str, run: asyncio.Task) -> None:
        reservation = await until_reserved(request_id, run)
        self.conn = await asyncpg.connect(postgres.dsn(get_settings().pgdata, "homeskillet"))
        self.txn = self.conn.transaction()
        await self.txn.start()
        await self.conn.execute("SELECT 1 FROM spend WHERE allocation_id = $1 FOR UPDATE", reservation["allocation_id"])

    async def writer_waiting(self, run: asyncio.Task, timeout_s: float = 30) -> bool:
        query = (  # a writer waiting for this transaction's row lock
            "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted "
            "AND transactionid = pg_current_xact_id()::xid"
        )
        deadline = time.monotonic() + timeout_s
        while not await self.conn.fetchval(query):
            if run.done() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def let_go(self) -> None:
        await self.txn.rollback()
        await self.conn.close()


async def test_a_request_cancelled_while_its_spend_is_written_still_records_the_spend(test_catalog):
    """The model call completed and is paid for: cancelling the request a moment later must not
    lose its spend (the tenant's budget), and its telemetry record says what it cost. The
    settlement is held up, so the cancellation lands while it waits; the slice is released."""
    request_id = f"cancelled-while-paying-{time.monotonic_ns()}"
    run = asyncio.create_task(echo_request(test_catalog, request_id))
    held = SettlementHeld()
    await held.hold(request_id, run)
    try:
        assert await held.writer_waiting(run)
        run.cancel()
        await asyncio.sleep(0.2)  # the cancellation has reached the waiting write
    finally:
        await held.let_go()
    with pytest.raises(asyncio.CancelledError):
        await run
    (row,) = await spend_rows(request_id)
    assert row["state"] == "settled" and row["cost_usd"] > 0
    mine = records_of(request_id)
    assert list(mine.error_class) == ["CancelledError"] and (mine.cost_usd > 0).all() and (mine.tokens_out > 0).all()
    assert mine.cost_usd.iloc[0] == pytest.approx(row["cost_usd"])  # the real cost, settled once


async def test_calls_running_at_once_cannot_together_overrun_the_budget(covenant_catalog, echo_server, monkeypatch):
    """Two fragments on a roomy pool hold their slices at once: the budget leaves room for one
    call's worst case, so the first to reserve runs and the other is refused before its model
    call; the request stops, and what it spent stays within the budget."""
    monkeypatch.setenv("ECHO_DELAY_S", "5")  # the first call is still running when the second reserves
    worst = echo_worst_case(covenant_catalog.path, "roomy")
    path = covenant_catalog(cov_parallel={"budget_usd_per_day": 1.5 * worst})
    seen = len(echo_server.seen)
    request_id = f"parallel-{time.monotonic_ns()}"
    with pytest.raises(CovenantViolation, match=r"budget_usd_per_day: .* reserved for calls running; the next call"):
        await fuse_request(
            prompt="1. Say one.\n2. Say two.",
            tenant="cov-parallel",
            request_id=request_id,
            constraints={"allowed_models": ["echo"], "pool": "roomy"},
            catalog_path=path,
        )
    assert len(echo_server.seen) - seen <= 1
    (row,) = await spend_rows(request_id)  # the refused call reserved nothing
    assert row["state"] == "settled" and 0 < row["cost_usd"] <= 1.5 * worst
    ledger = await runtime.services(path).ledger()
    day, _ = await ledger.spend("cov-parallel")
    assert day + await ledger.reserved("cov-parallel") <= 1.5 * worst
