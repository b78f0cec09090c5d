"""`POST /v1/feedback` on a real server on loopback (every surface, as `homeskillet serve`), with the
session's PostgreSQL for tokens and real Parquet under the session's state folder: the token's
tenant rates its own finished request, another tenant's is a 404 exactly like an unknown one, bad
input is a 400 naming it, and each call counts against the tenant's rate."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime

import httpx
import pytest

from apps.api import FEEDBACK_MAX_BODY_BYTES, parse_feedback
from connectors.feedback import read_feedback
from connectors.telemetry import write_records
from connectors.tokens import TokenStore
from homeskillet.errors import InvalidRequest
from homeskillet.settings import get_settings
from tests.support import telemetry_record

SERVED = pytest.mark.usefixtures("local_services")


def finished(tenant: str, fragments: tuple[str, ...] = ("f1", "f2")) -> str:
    """A new request id of `tenant`'s, finished: its fragments' records in the telemetry dataset
    the server reads, as the flow writes them."""
    request_id = "fb-" + uuid.uuid4().hex[:12]
    records = [
        telemetry_record(
            request_id,
            tenant,
            fragment,
            model="echo",
            pool="roomy",
            tier="preemptible",
            allocation_id=f"alloc-{uuid.uuid4().hex[:8]}",
        )
        for fragment in fragments
    ]
    write_records(get_settings().telemetry, records)
    return request_id


def stored(request_id: str) -> list[dict]:
    """Every feedback record of the request, whoever's it is."""
    frame = read_feedback(get_settings().feedback)
    return frame[frame.request_id == request_id][["tenant", "fragment_id", "score"]].to_dict("records")


async def made_tokens(*tenants: str) -> dict[str, str]:
    store = await TokenStore.open(get_settings().pgdata)
    return {t: (await store.create(t))[1] for t in tenants}


@pytest.fixture(scope="module")
def api(test_catalog):
    """A server of its own on the test catalog: its base URL and a token of acme's and globex's."""
    from apps.mcp_server import create_app
    from tests.apps.test_mcp_server import serving

    tokens = asyncio.run(made_tokens("acme", "globex"))
    with serving(create_app(test_catalog)) as where:
        yield f"http://{where}/v1", tokens


async def rate(api, tenant: str, body: dict | bytes, **headers: str) -> httpx.Response:
    base, tokens = api
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        auth = {"Authorization": f"Bearer {tokens[tenant]}"}
        if isinstance(body, bytes):
            return await http.post("/feedback", content=body, headers=auth | {"Content-Type": "application/json"})
        return await http.post("/feedback", json=body, headers=auth | headers)


def test_the_body_is_two_bounded_ids_and_a_finite_score_and_nothing_else():
    asked = parse_feedback({"request_id": "api-1", "score": 1, "fragment": "f2"})
    assert (asked.request_id, asked.score, asked.fragment) == ("api-1", 1.0, "f2")
    for body, named in (
        ({"request_id": "r", "score": 1.5}, "score: Input should be less than or equal to 1"),
        ({"request_id": "r", "score": "0.5"}, "score: Input should be a valid number"),
        ({"request_id": "r", "score": True}, "score: Input should be a valid number"),
        ({"request_id": "r", "score": float("nan")}, "score: Input should be a finite number"),
        ({"request_id": "r" * 65, "score": 0}, "request_id: String should have at most 64 characters"),
        ({"request_id": "r", "score": 0, "tenant": "acme"}, "tenant: is not supported"),
        ({"score": 0}, "request_id: Field required"),
        ([], "body: Input should be a valid dictionary"),
    ):
        with pytest.raises(InvalidRequest, match=named):
            parse_feedback(body)


@SERVED
async def test_the_owner_rates_its_request_and_one_fragment(api):
    request_id = finished("acme")
    whole = await rate(api, "acme", {"request_id": request_id, "score": 0.75})
    assert whole.status_code == 200, whole.text
    record = whole.json()
    assert {k: record[k] for k in ("request_id", "tenant", "fragment_id", "score")} == {
        "request_id": request_id,
        "tenant": "acme",
        "fragment_id": None,
        "score": 0.75,
    }
    assert datetime.fromisoformat(record["ts"]).tzinfo is not None
    one = await rate(api, "acme", {"request_id": request_id, "score": 0, "fragment": "f2"})
    assert one.status_code == 200 and one.json()["fragment_id"] == "f2"
    assert sorted(stored(request_id), key=str) == sorted(
        [{"tenant": "acme", "fragment_id": None, "score": 0.75}, {"tenant": "acme", "fragment_id": "f2", "score": 0.0}],
        key=str,
    )


@SERVED
async def test_another_tenants_request_is_a_404_exactly_like_an_unknown_one(api):
    request_id = finished("acme")
    unknown = "fb-" + uuid.uuid4().hex[:12]
    theirs = await rate(api, "globex", {"request_id": request_id, "score": 1})
    none = await rate(api, "globex", {"request_id": unknown, "score": 1})
    assert theirs.status_code == none.status_code == 404
    assert theirs.json()["error"]["code"] == "request_not_found" and theirs.json()["error"]["param"] == "request_id"
    assert theirs.text.replace(request_id, "ID") == none.text.replace(unknown, "ID")
    with_fragment = await rate(api, "globex", {"request_id": request_id, "score": 1, "fragment": "f1"})
    assert with_fragment.status_code == 404 and with_fragment.text == theirs.text
    assert stored(request_id) == []
    owner = await rate(api, "acme", {"request_id": request_id, "score": 1})  # the control: it is acme's
    assert owner.status_code == 200


@SERVED
async def test_bad_input_is_a_400_naming_it_and_nothing_is_written(api):
    request_id = finished("acme")
    for body, named in (
        ({"request_id": request_id, "score": 2}, "score: Input should be less than or equal to 1"),
        ({"request_id": request_id, "score": 0.5, "fragment": "f9"}, f"request '{request_id}' has no fragment 'f9'"),
        ({"request_id": "../" + request_id, "score": 0.5}, "request_id may hold letters, digits"),
        ({"request_id": request_id, "score": 0.5, "tenant": "globex"}, "tenant: is not supported"),
        (b"{not json", "the body is not JSON"),
        (b'{"request_id": "' + b"r" * FEEDBACK_MAX_BODY_BYTES + b'", "score": 1}', "bytes; at most 4096"),
    ):
        answer = await rate(api, "acme", body)
        assert answer.status_code == 400, (body, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and named in error["message"], error
    assert stored(request_id) == []
    unauthenticated = await rate((api[0], {"acme": "hs_" + "x" * 43}), "acme", {"request_id": request_id, "score": 1})
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["type"] == "authentication_error"


@SERVED
async def test_each_feedback_counts_against_the_tenants_rate(test_catalog):
    from apps.mcp_server import create_app
    from tests.apps.test_mcp_server import serving

    settings = get_settings().model_copy(update={"tenant_rate": "2/minute"})
    tokens = await made_tokens("acme", "globex")
    request_id = finished("acme")
    with serving(create_app(test_catalog, settings=settings)) as where:
        api = (f"http://{where}/v1", tokens)
        answers = [await rate(api, "acme", {"request_id": request_id, "score": 1}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert (
            answers[2].json()["error"]["code"] == "rate_limit_exceeded" and int(answers[2].headers["Retry-After"]) > 0
        )
        assert (await rate(api, "globex", {"request_id": request_id, "score": 1})).status_code == 404  # its own share
    assert len(stored(request_id)) == 2


@SERVED
async def test_an_answer_of_the_api_is_rated_by_its_request_id_and_fragment(api, assert_no_leaks):
    base, tokens = api
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        answer = await http.post(
            "/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "Say alpha. Say beta."}], "max_tokens": 8},
            headers={"Authorization": f"Bearer {tokens['acme']}"},
        )
    assert answer.status_code == 200, answer.text
    extension = answer.json()["homeskillet"]
    request_id, fragment = extension["request_id"], extension["fragments"][-1]["id"]
    rated = await rate(api, "acme", {"request_id": request_id, "score": 0.5, "fragment": fragment})
    assert rated.status_code == 200, rated.text
    assert stored(request_id) == [{"tenant": "acme", "fragment_id": fragment, "score": 0.5}]
    assert (await rate(api, "globex", {"request_id": request_id, "score": 0})).status_code == 404
