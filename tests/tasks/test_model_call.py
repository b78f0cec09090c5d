"""One model call (`tasks.model_call`): its spend is written while its slice is still held, so a
call waiting for that room sees the spend before it, and a cancellation that lands while the
spend is written loses neither the spend nor the call's telemetry record. Through the flow, on the
echo double."""

import asyncio

import pytest

from connectors.telemetry import read_records
from flows.fusion import fuse_request
from homeskillet.errors import CovenantViolation
from homeskillet.settings import get_settings
from tasks import runtime
from tests.support import one_echo_call_on_tiny

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


async def test_a_request_cancelled_while_its_spend_is_written_still_records_the_spend(
    test_catalog, spend_writes_held, monkeypatch
):
    """The model call completed and is paid for: cancelling the request a moment later must not
    lose its spend (the tenant's budget), and its telemetry record says what it cost. The spend
    write is held up, so the cancellation lands while it waits; the slice is released."""
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    ledger = await runtime.backend(test_catalog).ledger()
    _, before = await ledger.spend("acme")
    run = asyncio.create_task(
        fuse_request(
            prompt="Say one.",
            tenant="acme",
            request_id="cancelled-while-paying",
            constraints={"allowed_models": ["echo"], "pool": "roomy", "split": False},
            catalog_path=test_catalog,
        )
    )
    assert await spend_writes_held.writer_waiting(run)
    run.cancel()
    await asyncio.sleep(0.2)  # the cancellation has reached the waiting write
    await spend_writes_held.let_go()
    with pytest.raises(asyncio.CancelledError):
        await run
    _, after = await ledger.spend("acme")
    assert after > before
    records = read_records(get_settings().telemetry)
    mine = records[records.request_id == "cancelled-while-paying"]
    assert list(mine.error_class) == ["CancelledError"] and (mine.cost_usd > 0).all() and (mine.tokens_out > 0).all()


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_call_waiting_for_room_counts_the_spend_of_the_call_before_it(
    covenant_catalog, echo_server, spend_writes_held
):
    """The spend is written while the slice is still held. With the first call's spend write held
    up, the second call, waiting for the one-slice pool, must not get the room and run before that
    spend, which leaves too little budget for it, is counted."""
    path = covenant_catalog(cov_turns={"budget_usd_per_day": 1.5 * one_echo_call_on_tiny(covenant_catalog.path)})
    seen = len(echo_server.seen)
    run = asyncio.create_task(
        fuse_request(
            prompt="1. Say one.\n2. Say two.",
            tenant="cov-turns",
            constraints={"allowed_models": ["echo"], "pool": "tiny"},
            catalog_path=path,
        )
    )
    assert await spend_writes_held.writer_waiting(run)
    await asyncio.sleep(1.5)  # the second call looks for room meanwhile (every ≤ 0.5 s)
    assert len(echo_server.seen) - seen == 1
    await spend_writes_held.let_go()
    with pytest.raises(CovenantViolation, match="budget_usd_per_day"):
        await run
    assert len(echo_server.seen) - seen == 1
