"""The hosted·ai emulator on its own. A fuzzing pass over its API (hypothesis): whatever the body or
query, the emulator answers with a status and body of the documented kinds, never an unhandled
error, and its books stay consistent (no pool over-committed, no negative availability). Then its
parts without HTTP: the state machine's timings, the fault model's parsing and draws, and
handlers called directly, where what a call did to the books can be read next to its answer."""

import json

import httpx
import pytest
from fastapi import HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from doubles.hostedai_emulator import (
    INSUFFICIENT,
    INTERNAL,
    Faults,
    State,
    SubscribeBody,
    Subscription,
    UnsubscribeBody,
    create_app,
    default_config,
    routes,
)

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


# -- the parts on their own


def state_with(**faults) -> State:
    return State(default_config().model_copy(update={"faults": Faults(**faults)}))


@pytest.mark.parametrize(
    "age, status",
    [(0.0, None), (0.19, None), (0.2, "subscribing"), (0.49, "subscribing"), (0.5, "active"), (3600.0, "active")],
)
def test_a_new_subscription_is_hidden_then_subscribing_then_active(age, status):
    state = state_with(visibility_s=0.2, activation_s=0.5)
    sub = Subscription(id=1, team_id=TEAM.id, pool_id=101, vgpus=1, created=0.0)
    assert state.status(sub, age) == status


def test_sweep_ends_an_unsubscribe_once_its_un_subscribing_time_is_over_and_gives_the_vgpus_back():
    state = state_with(unsubscribe_s=0.5)
    pool = state.pools[101]
    staying = Subscription(id=1, team_id=TEAM.id, pool_id=101, vgpus=1, created=0.0)
    leaving = Subscription(id=2, team_id=CONFIG.teams[2].id, pool_id=101, vgpus=2, created=0.0, unsubscribed=100.0)
    state.subs = {1: staying, 2: leaving}

    state.sweep(now=100.4)
    assert state.status(leaving, 100.4) == "un_subscribing"
    assert sorted(state.subs) == [1, 2] and state.available(pool) == 4 - 3 and state.history == []

    state.sweep(now=100.5)
    assert sorted(state.subs) == [1]  # an old subscription nobody unsubscribed stays
    assert state.available(pool) == 4 - 1
    assert [(h["subscription_id"], h["team_id"], h["ended"]) for h in state.history] == [
        (2, CONFIG.teams[2].id, "unsubscribed")
    ]


def test_faults_parse_reads_numbers_lists_and_strings_and_nothing_is_no_fault():
    faults = Faults.parse('error_rate=0.2, insufficient_pools=[101],seed=7,fault_paths=["/gpuaas/pool"]')
    assert (faults.error_rate, faults.insufficient_pools, faults.seed) == (0.2, [101], 7)
    assert faults.fault_paths == ["/gpuaas/pool"]
    assert Faults.parse("") == Faults() == Faults.parse(" , ")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("error_rate", "fault 'error_rate' is not key=value"),
        ("eror_rate=0.2", "unknown fault(s) ['eror_rate']; known: ['activation_s', "),
        ("error_rate=2", "error_rate\n  Input should be less than or equal to 1"),
        ('{"latency_s": -1}', "latency_s\n  Input should be greater than or equal to 0"),
    ],
)
def test_faults_parse_refuses_a_bad_spec_with_a_value_error_that_names_the_fault(spec, message):
    with pytest.raises(ValueError) as refused:  # what the CLI and the load test catch
        Faults.parse(spec)
    assert message in str(refused.value)


def test_a_fault_that_is_off_draws_nothing_from_the_seeded_sequence():
    state, twin = state_with(seed=5), state_with(seed=5)
    assert not state.fires("error", 0.0)
    assert state.rng.random() == twin.rng.random()  # the seeded run is the same with a fault off
    assert state.fired == {}
    assert state.fires("error", 1.0) and state.fires("error", 1.0)
    assert state.fired == {"error": 2}


@pytest.mark.parametrize("in_2xx_rate, status", [(0.0, 500), (1.0, 200)])
def test_a_business_error_keeps_its_code_whether_sent_as_500_or_inside_a_200(in_2xx_rate, status):
    state = state_with(business_in_2xx_rate=in_2xx_rate)
    answer = routes.business(state, "Insufficient resources", INSUFFICIENT)
    assert answer.status_code == status
    assert json.loads(answer.body) == {"code": INSUFFICIENT, "message": "Insufficient resources", "errors": []}
    assert state.fired["business_in_2xx"] == (1 if status == 200 else 0)


async def test_a_subscribe_answered_as_an_internal_error_has_taken_the_vgpus_and_a_retry_meets_it():
    state = state_with(write_error_after_rate=1.0)
    body = SubscribeBody(pool_id=101, team_id=TEAM.id, vgpus=3)

    answer = await routes.subscribe(body, team=TEAM, state=state)
    assert answer.status_code == 500
    assert json.loads(answer.body) == {"code": INTERNAL, "message": "internal error", "errors": []}
    assert [(s.team_id, s.pool_id, s.vgpus) for s in state.subs.values()] == [(TEAM.id, 101, 3)]
    assert state.available(state.pools[101]) == 4 - 3
    assert state.fired["write_error_after"] == 1

    retry = await routes.subscribe(body, team=TEAM, state=state)  # 409, not "Insufficient resources"
    assert retry.status_code == 409 and json.loads(retry.body)["message"] == "Already subscribed"
    assert len(state.subs) == 1


async def test_a_repeated_unsubscribe_keeps_its_first_time_and_answers_ok_without_a_second_fault():
    state = state_with(write_error_after_rate=1.0)
    sub = state.subs[7] = Subscription(id=7, team_id=TEAM.id, pool_id=201, vgpus=1)
    body = UnsubscribeBody(subscription_id=7, team_id=TEAM.id, pool_id=201)

    first = await routes.unsubscribe(body, team=TEAM, state=state)
    assert first.status_code == 500 and sub.unsubscribed is not None
    when = sub.unsubscribed

    second = await routes.unsubscribe(body, team=TEAM, state=state)
    assert (second.status_code, second.body) == (200, b"OK")
    assert sub.unsubscribed == when  # a retry does not put the end off
    assert state.fired["write_error_after"] == 1


def test_another_teams_subscription_reads_as_missing_not_forbidden():
    state = state_with()
    globex = CONFIG.teams[2]
    state.subs[9] = Subscription(id=9, team_id=globex.id, pool_id=101, vgpus=1)
    assert routes.own_subscription(state, globex, 9) is state.subs[9]
    with pytest.raises(HTTPException) as refused:
        routes.own_subscription(state, TEAM, 9)
    assert (refused.value.status_code, refused.value.detail) == (404, "Subscription not found")


# -- what no schema promises, on request: connection-info's shapes, another name, hostile URLs


async def connection_info_with(**faults):
    """A fresh emulator with these faults, one active subscription of TEAM, and its connection-info."""
    config = default_config().model_copy(update={"faults": Faults(visibility_s=0, activation_s=0, **faults)})
    app = create_app(config, model_endpoint=lambda name: None)
    headers = {"X-API-Key": TEAM.api_key}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emulator") as http:
        made = await http.post(
            "/gpuaas/pool/subscribe", json={"pool_id": 201, "team_id": TEAM.id, "vgpus": 1}, headers=headers
        )
        sub = made.json()["subscription_id"]
        info = await http.get(
            "/gpuaas/connection-info", params={"team_id": TEAM.id, "subscription_id": sub}, headers=headers
        )
        exposed = await http.post(
            "/pods/expose-service",
            json={"pod_name": f"pod-{sub}", "pool_subscription_id": sub, "port": 8000, "service_name": "inference"},
            headers=headers,
        )
    return app.state.emulator, sub, info.json(), exposed


@pytest.mark.parametrize("shape", ["pods", "subscriptions", "bare", "unknown"])
async def test_connection_info_answers_in_the_shape_asked(shape):
    _, sub, info, _ = await connection_info_with(connection_info_shape=shape)
    if shape == "pods":
        assert [p["pod_name"] for p in info["pods"]] == [f"pod-{sub}"]
    elif shape == "subscriptions":
        assert [(e["id"], [p["pod_name"] for p in e["pods"]]) for e in info] == [(sub, [f"pod-{sub}"])]
    elif shape == "bare":
        assert [p["pod_name"] for p in info] == [f"pod-{sub}"]
    else:
        assert len(info) == 3 and all(set(e) == {"id", "name"} for e in info)


async def test_a_server_discovered_under_another_name_is_listed_and_a_second_expose_refused():
    state, sub, info, exposed = await connection_info_with(discovered_as="vllm-openai", business_in_2xx_rate=0)
    services = info["pods"][0]["discovered_services"]
    assert [s["name"] for s in services] == ["jupyter", "vllm-openai"]
    assert services[1]["url"].endswith(f"/pods/pod-{sub}/{state.subs[sub].service_key}")
    assert exposed.status_code == 500 and "already exposed" in exposed.json()["message"]
    assert state.calls_by_route["POST /pods/expose-service"] == 1


async def test_every_service_can_be_listed_at_a_url_of_the_panels_choosing():
    _, _, info, _ = await connection_info_with(service_url="http://169.254.169.254", discovered_as="x")
    assert {s["url"] for s in info["pods"][0]["discovered_services"]} == {"http://169.254.169.254"}


async def test_the_first_n_reads_answer_an_error_in_the_body_then_the_reads_go_through():
    config = default_config().model_copy(
        update={"faults": Faults(body_error_reads=2, body_error_message="no permission right now")}
    )
    app = create_app(config, model_endpoint=lambda name: None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emulator") as http:
        answers = [
            await http.get(
                "/gpuaas/available-regions", params={"team_id": TEAM.id}, headers={"X-API-Key": TEAM.api_key}
            )
            for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json() for a in answers[:2]] == [
        {"code": 12370004, "message": "no permission right now", "errors": []}
    ] * 2
    assert answers[2].json() == CONFIG.regions
    assert app.state.emulator.fired["body_error_read"] == 2
    assert Faults.parse("body_error_reads=3,service_url=http://127.0.0.1:4200").service_url == "http://127.0.0.1:4200"
