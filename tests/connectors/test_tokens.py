"""API tokens and finished results (`connectors.tokens`) in the session's PostgreSQL: a token is
shown once and stored as its hash, revoked by its id or by itself; a result is kept per tenant, and
another tenant's request id reads like an unknown one."""

from connectors.tokens import TokenStore, token_hash


async def test_a_token_is_shown_once_kept_as_a_hash_and_revoked_by_its_id_or_itself(postgres):
    store = await TokenStore.open(postgres)
    first_id, first = await store.create("tokens-acme")
    second_id, second = await store.create("tokens-acme")
    assert first.startswith("hs_") and len(first) == 3 + 43 and first != second
    assert await store.tenant_of(first) == "tokens-acme" == await store.tenant_of(second)
    assert await store.tenant_of("hs_unknown") is None and await store.tenant_of(None) is None
    listed = await store.list("tokens-acme")
    assert {r["token_id"] for r in listed} == {first_id, second_id}
    assert not any(first in str(r) or token_hash(first) in str(r) for r in listed)
    assert await store.revoke(first_id) and not await store.revoke(first_id)  # revoked once
    assert await store.revoke(second)  # by the token itself
    assert await store.tenant_of(first) is None and await store.tenant_of(second) is None
    assert all(r["revoked_at"] is not None for r in await store.list("tokens-acme"))


async def test_a_result_is_kept_per_tenant_and_another_tenants_id_reads_as_unknown(postgres):
    store = await TokenStore.open(postgres)
    await store.save_result("results-acme", "req-1", {"answer": "one"})
    await store.save_result("results-acme", "req-1", {"answer": "again"})  # saved again: the latest stands
    assert await store.result("results-acme", "req-1") == {"answer": "again"}
    assert await store.result("results-globex", "req-1") is None
    assert await store.result("results-acme", "req-unknown") is None
