"""The MCP benchmark (`homeskillet bench-mcp`) end to end, a few rounds on the echo double."""

import pytest

from apps.bench_mcp import report, run_benchmark

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")

ECHO = {"allowed_models": ["echo"], "pool": "roomy", "max_tokens": 16}


async def test_the_benchmark_times_both_transports_and_the_direct_call(test_catalog, monkeypatch):
    from connectors.tokens import TokenStore
    from homeskillet.settings import get_settings

    monkeypatch.setenv("ECHO_DELAY_S", "0.05")
    store = await TokenStore.open(get_settings().pgdata)
    before = {t["token_id"] for t in await store.list("acme")}
    figures = await run_benchmark(
        catalog_path=test_catalog, tenant="acme", constraints=ECHO, classify_rounds=2, fuse_rounds=1
    )
    assert set(figures) == {
        "classify_http_ms",
        "classify_ws_ms",
        "fuse_http_median_s",
        "fuse_ws_median_s",
        "fuse_direct_median_s",
    }
    assert all(value > 0 for value in figures.values()), figures
    assert "fuse_request directly" in report(figures)
    made = [t for t in await store.list("acme") if t["token_id"] not in before]
    assert made and all(t["revoked_at"] is not None for t in made)  # its token is revoked at the end
