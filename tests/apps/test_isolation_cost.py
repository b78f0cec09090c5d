"""The isolation report's `cost` group (`apps.isolation.cost`): B cannot overrun its own day budget
with calls fired at once, nor run a call for free by cancelling it; and a ledger that stops
checking reservations, or a call that goes unbilled when cancelled, shows as ALLOWED."""

import pytest

from apps.isolation import broken
from apps.isolation import cost as cost_group
from apps.isolation.report import Report, Target
from connectors.ledger import Ledger
from tasks import runtime

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


async def cost_rows(catalog_path) -> dict:
    """The group's rows on the catalog, by attack."""
    report = Report()
    target = Target(runtime.services(catalog_path), catalog_path, None, {}, None, "")
    await cost_group.attacks(report, target)
    return {r.attack: r for r in report.rows}


async def test_b_can_neither_overrun_its_budget_in_parallel_nor_cancel_a_call_to_run_it_free(test_catalog):
    rows = await cost_rows(test_catalog)
    assert set(rows) == {"overrun B's own day budget with parallel calls", "cancel a call to run it for free"}
    assert not broken(list(rows.values())), [vars(r) for r in rows.values()]


async def test_a_ledger_that_checks_no_reservation_and_bills_no_cancelled_call_is_reported(test_catalog, monkeypatch):
    reserve_spend, record_spend = Ledger.reserve_spend, Ledger.record_spend
    unbilled: list[tuple] = []

    async def unchecked(self, allocation_id, tenant, request_id, worst_usd, check):  # the break: no budget
        return await reserve_spend(self, allocation_id, tenant, request_id, worst_usd, lambda use: None)

    async def free_when_cancelled(self, allocation_id, tenant, request_id, cost_usd, reserved_only=False):
        if reserved_only:  # the break: a call that did not complete is never billed
            unbilled.append((self, allocation_id, tenant, request_id))
            return None
        return await record_spend(self, allocation_id, tenant, request_id, cost_usd)

    async def no_early_refusal(ctx, next_usd=0.0):  # else requests that start late are refused there
        return None

    monkeypatch.setattr(Ledger, "reserve_spend", unchecked)
    monkeypatch.setattr(Ledger, "record_spend", free_when_cancelled)
    monkeypatch.setattr("flows.fusion.within_budget", no_early_refusal)
    try:
        rows = await cost_rows(test_catalog)
    finally:
        for ledger, allocation_id, tenant, request_id in unbilled:  # settle what the break left open
            await record_spend(ledger, allocation_id, tenant, request_id, 0.0, reserved_only=True)
    assert rows["overrun B's own day budget with parallel calls"].result == "ALLOWED"
    assert rows["cancel a call to run it for free"].result == "ALLOWED"
