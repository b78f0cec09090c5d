"""`homeskillet isolation-report`: every attack refused today, and a broken guarantee shows."""

import pytest

from connectors.local_backend import LocalBackend
from homeskillet.isolation import broken, run_attacks

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


async def test_every_attack_of_one_tenant_on_anothers_work_is_refused(hostedai_tenants, no_subscriptions_left):
    rows = await run_attacks(lend_emulator=False)  # the tenants' Secret blocks point at the session's emulator
    for r in rows:
        print(f"{r.result:15} | {r.attack} | {r.path} | {r.detail[:150]}")
    assert not broken(rows), [vars(r) for r in rows if r.result not in ("refused", "operator surface")]
    paths = {r.path for r in rows}
    assert {
        "MCP allocations tool (WebSocket)",
        "MCP allocations tool (Streamable HTTP)",
        "Streamable HTTP mcp-session-id",
        "backend.release(A's id, B)",
        "fuse_request constraints",
        "fuse_request without constraints",
        "hostedai backend.release(A's id, B)",
    } <= paths


async def test_a_backend_that_ignores_the_tenant_on_release_is_reported(monkeypatch):
    original = LocalBackend.release

    async def release_anyones(self, allocation_id, tenant):  # the break: the owner is not checked
        ledger = await self.ledger()
        owner = next((a.tenant for a in await ledger.held() if a.allocation_id == allocation_id), tenant)
        return await original(self, allocation_id, owner)

    monkeypatch.setattr(LocalBackend, "release", release_anyones)
    rows = await run_attacks(groups=("backend",))
    (row,) = [r for r in rows if r.path == "backend.release(A's id, B)"]
    assert row.result == "ALLOWED" and broken(rows)
