"""A fuzzing pass over the emulator's API (hypothesis): whatever the body or query, the emulator
answers with a status and body of the documented kinds, never an unhandled error, and its
books stay consistent (no pool over-committed, no negative availability)."""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doubles.hostedai_emulator import create_app, default_config

CONFIG = default_config()
APP = create_app(CONFIG, model_endpoint=lambda name: None)
TEAM = CONFIG.teams[1]
KEYS = st.sampled_from([TEAM.api_key, CONFIG.teams[2].api_key, "", "nope"])
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
FIELDS = {
    "pool_id": st.sampled_from([101, 102, 201, 202, 999]) | st.integers(),
    "team_id": st.sampled_from([TEAM.id, CONFIG.teams[0].id, "x"]),
    "vgpus": st.integers(-3, 80),
    "duration_hours": st.floats(-1, 1e6, allow_nan=False),
    "subscription_id": st.integers(4990, 5100),
    "pod_name": st.text(max_size=12),
    "pool_subscription_id": st.integers(4990, 5100),
    "port": st.integers(-1, 70000),
    "service_name": st.text(max_size=70),
}
BODIES = st.fixed_dictionaries({}, optional={k: v | JSONISH for k, v in FIELDS.items()}) | JSONISH
POSTS = [
    "/gpuaas/calculate-pool-subscription",
    "/gpuaas/pool/subscribe",
    "/gpuaas/pool/unsubscribe",
    "/pods/expose-service",
]
GETS = [
    "/gpuaas/available-regions",
    "/gpuaas/available-pools",
    "/gpuaas/pool-subscription",
    "/gpuaas/connection-info",
    f"/gpuaas/{TEAM.id}/metrics",
]
QUERIES = st.dictionaries(
    st.sampled_from(["team_id", "gpuaas_id", "page", "per_page", "subscription_id", "itemsPerPage"]),
    st.text(max_size=8) | st.integers(-5, 10**6).map(str) | st.just(TEAM.id),
    max_size=4,
)


def check(response: httpx.Response) -> None:
    assert response.status_code in (200, 401, 403, 404, 409, 422, 500), response.text
    if response.status_code == 500:  # only business errors: JSON with a code, never a crash
        assert isinstance(response.json().get("code"), int), response.text
    state = APP.state.emulator
    for pool in state.pools.values():
        assert 0 <= state.available(pool) <= pool.gpus * pool.sharing_ratio


@pytest.fixture(scope="module")
async def api():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://emulator") as client:
        yield client


def test_openapi_document_lists_the_api():
    paths = APP.openapi()["paths"]
    assert {"/gpuaas/pool/subscribe", "/gpuaas/pool-subscription", "/gpuaas/connection-info"} <= set(paths)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(POSTS), body=BODIES, key=KEYS)
async def test_posts_never_crash(api, path, body, key):
    check(await api.post(path, json=body, headers={"X-API-Key": key}))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(GETS), query=QUERIES, key=KEYS)
async def test_gets_never_crash(api, path, query, key):
    check(await api.get(path, params=query, headers={"X-API-Key": key}))
