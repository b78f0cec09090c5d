"""`homeskillet isolation-report`: every attack refused today, and a broken guarantee shows."""

import pytest

from apps.isolation import broken, run_attacks
from connectors.local_backend import LocalBackend

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


async def test_every_attack_of_one_tenant_on_anothers_work_is_refused(hostedai_tenants, no_subscriptions_left):
    rows = await run_attacks(lend_emulator=False)  # the tenants' Secret blocks point at the session's emulator
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
        "the pod's OpenAI-compatible URL, A's pod name from the list",
        "MCP fuse(tenant=A) with B's token, backend hostedai",
        "catalog tenant 'ACME' → Secret block 'hostedai-acme'",
        "CovenantViolation budget_usd_per_day, before and after A spends",
        "Prometheus /metrics (names, labels, values)",
        "Streamable HTTP Authorization",
        "initialize without mcp-session-id",
        "MCP plan tool (WebSocket)",
        "MCP WebSocket after revocation",
        "MCP resource homeskillet://catalog",
        "CapacityTimeout as a tenant is told",
        "edge worker /http://127.0.0.1:4200/api/health",
        "edge worker ///169.254.169.254/latest/meta-data/",
        "POST /v1/chat/completions user=A with B's key",
    } <= paths
    assert any(p.startswith("backend allocate on ") for p in paths)  # the capacity hog
    assert {r.result for r in rows if r.path.startswith(("homeskillet cost-report", "Parquet"))} == {"operator surface"}


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


HOSTED = pytest.mark.usefixtures("hostedai_tenants", "no_subscriptions_left")


def row(rows, path):
    (found,) = [r for r in rows if r.path == path]
    return found


@HOSTED
async def test_a_hostedai_backend_that_ignores_the_tenant_on_release_is_reported(monkeypatch):
    from connectors.hostedai_backend import HostedAIBackend

    original = HostedAIBackend.release

    async def release_anyones(self, allocation_id, tenant):  # the break: the owner is not checked
        owner = next((a.tenant for a in await self.held() if a.allocation_id == allocation_id), tenant)
        return await original(self, allocation_id, owner)

    monkeypatch.setattr(HostedAIBackend, "release", release_anyones)
    rows = await run_attacks(lend_emulator=False, groups=("hostedai",))
    assert row(rows, "hostedai backend.release(A's id, B)").result == "ALLOWED" and broken(rows)


@HOSTED
async def test_a_catalog_that_lets_a_tenant_id_alias_anothers_secret_block_is_reported(monkeypatch):
    from homeskillet import catalog

    monkeypatch.setattr(catalog, "tenant_aliases", lambda _catalog: [])  # the break: ids differing in case load
    rows = await run_attacks(lend_emulator=False, groups=("secret_blocks",))
    assert row(rows, "catalog tenant 'ACME' → Secret block 'hostedai-acme'").result == "ALLOWED" and broken(rows)


async def test_a_budget_refusal_that_counts_every_tenants_spend_is_reported(monkeypatch):
    from connectors.ledger import BudgetUse, Ledger

    original = Ledger._budget_use

    async def everyones(self, conn, tenant):  # the break: the spend of every tenant, not the request's
        figures = [await original(self, conn, t) for t in ("acme", "globex")]
        return BudgetUse(*(sum(f[i] for f in figures) for i in range(3)))

    monkeypatch.setattr(Ledger, "_budget_use", everyones)
    rows = await run_attacks(groups=("telemetry",))
    found = row(rows, "CovenantViolation budget_usd_per_day, before and after A spends")
    assert found.result == "ALLOWED" and broken(rows)


@HOSTED
async def test_a_client_repr_that_shows_the_key_is_reported(monkeypatch):
    from connectors.hostedai import HostedAIClient

    monkeypatch.setattr(
        HostedAIClient, "__repr__", lambda self: f"HostedAIClient({self.credentials.api_key.get_secret_value()})"
    )
    rows = await run_attacks(lend_emulator=False, groups=("secrets",))
    assert row(rows, "HostedAIClient").result == "ALLOWED"
    assert row(rows, "HostedAIBackend and its shares, Secret block 'hostedai-acme'").result == "ALLOWED"
