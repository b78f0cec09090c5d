"""The OpenAI-compatible front door (`apps.api`): the request's parsing and its mapping onto the
flow, errors in OpenAI's shape, and, on a real server on loopback with the session's PostgreSQL,
Prefect server and echo model, the real `openai` client: an answer with its headers, usage and
provenance, `/v1/models` as the covenant allows, and each error as the SDK's exception class."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from apps.api import (
    UnknownModelName,
    completion,
    error_of,
    flow_arguments,
    model_seconds,
    parse_request,
)
from connectors.tokens import TokenStore
from homeskillet.errors import CapacityTimeout, CovenantViolation, InvalidRequest, TooManyRequests
from homeskillet.schemas import FragmentResult, FusionResult
from homeskillet.settings import get_settings
from tests.support import fragment_result, write_catalog

USER = [{"role": "user", "content": "What is the capital of France? Who wrote Hamlet?"}]


def test_a_field_that_is_not_served_is_refused_by_name():
    for extra, named in (
        ({"tools": [{"type": "function"}]}, "tools: is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format: is not supported"),
        ({"n": 2}, r"n: one answer per request \(n=1\) is served"),
        ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ):
        with pytest.raises(InvalidRequest, match=named):
            parse_request({"model": "homeskillet/auto", "messages": USER, **extra})
    with pytest.raises(InvalidRequest, match="the last message must be the user's, not the assistant's"):
        parse_request({"model": "homeskillet/auto", "messages": [*USER, {"role": "assistant", "content": "Paris."}]})
    with pytest.raises(InvalidRequest, match="messages: "):
        parse_request({"model": "homeskillet/auto", "messages": []})


def test_the_model_names_the_strategy_or_pins_a_catalog_model_and_turns_before_the_last_are_context():
    chat = parse_request(
        {
            "model": "homeskillet/cascade",
            "messages": [
                {"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Name a river."}]},
            ],
            "max_tokens": 9,
            "max_completion_tokens": 7,
        }
    )
    assert flow_arguments(chat, {"echo"}) == {
        "prompt": "Name a river.",
        "strategy": "cascade",
        "constraints": {"max_tokens": 7},  # max_completion_tokens wins, as in OpenAI's API
        "context": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"},
        ],
    }
    pinned = flow_arguments(parse_request({"model": "echo", "messages": USER}), {"echo"})
    assert (pinned["strategy"], pinned["constraints"]) == ("single", {"allowed_models": ["echo"]})
    for unknown in ("gpt-4o", "homeskillet/fastest"):
        with pytest.raises(UnknownModelName, match=repr(unknown)):
            flow_arguments(parse_request({"model": unknown, "messages": USER}), {"echo"})


def test_errors_get_the_status_codes_the_sdk_maps_to_its_exceptions():
    cases = [
        (InvalidRequest("bad"), 400, "invalid_request_error", None),
        (UnknownModelName("no such model"), 404, "invalid_request_error", "model_not_found"),
        (CovenantViolation("t", "allowed_models", ["echo"], "asked"), 403, "permission_error", "allowed_models"),
        (
            CovenantViolation("t", "budget_usd_per_day", "$1", "$1 spent"),
            429,
            "insufficient_quota",
            "insufficient_quota",
        ),
        (TooManyRequests("slow down", 3.2), 429, "rate_limit_error", "rate_limit_exceeded"),
        (CapacityTimeout("pool x: 0 TFLOPS free of 8"), 503, "server_error", "no_capacity"),
        (RuntimeError("upstream said secret things"), 500, "server_error", None),
    ]
    for exc, status, kind, code in cases:
        got, body, headers = error_of(exc, "api-1")
        assert (got, body["error"]["type"], body["error"]["code"]) == (status, kind, code), exc
        assert set(body["error"]) == {"message", "type", "param", "code"}
    assert error_of(TooManyRequests("x", 3.2), "r")[2] == {"Retry-After": "4"}
    message = error_of(CapacityTimeout("pool x: 0 TFLOPS free of 8"), "api-1")[1]["error"]["message"]
    assert "TFLOPS" not in message and "api-1" in message  # no pool fill, the request id
    assert "secret" not in error_of(RuntimeError("upstream said secret things"), "api-1")[1]["error"]["message"]


def fragment(fid: str, infer_s: float) -> FragmentResult:
    return fragment_result(fid, fid, cost=0.001, infer_s=infer_s, tokens=(5, 7))


def test_model_time_counts_fragments_that_run_at_once_once_and_chains_in_full():
    maps = [fragment("f1", 2.0), fragment("f2", 3.0)]
    reduce = fragment("f3", 1.5)
    result = FusionResult(
        request_id="r", tenant="t", fusion="reduce", answer="a", fragments=[*maps, reduce], cost_usd=0.003, wall_s=5
    )
    assert model_seconds(result) == pytest.approx(4.5)  # the slower map, then the combining fragment
    assert model_seconds(result.model_copy(update={"fusion": "ordered"})) == pytest.approx(3.0)  # all at once
    body = completion(parse_request({"model": "homeskillet/auto", "messages": USER}), result, 1)
    assert body["usage"] == {"prompt_tokens": 15, "completion_tokens": 21, "total_tokens": 36}
    assert [f["allocation_id"] for f in body["homeskillet"]["fragments"]] == ["alloc-f1", "alloc-f2", "alloc-f3"]


# --- through a real server and the real openai client ------------------------------------------------


@pytest.fixture(scope="module")
def api(test_catalog, tmp_path_factory):
    """A server of its own (every surface, as `homeskillet serve`), on a catalog where globex may
    run echo-lite only and has a day budget of nothing; its base URL and a token per tenant."""
    import asyncio

    from apps.mcp_server import create_app
    from tests.apps.test_mcp_server import serving

    path = write_catalog(
        Path(tmp_path_factory.mktemp("api")) / "catalog.yaml",
        test_catalog,
        {"acme": {}, "globex": {"allowed_models": ["echo-lite"]}, "initech": {"budget_usd_per_day": 0}},
    )

    async def tokens() -> dict[str, str]:
        store = await TokenStore.open(get_settings().pgdata)
        return {t: (await store.create(t))[1] for t in ("acme", "globex", "initech")}

    made = asyncio.run(tokens())
    with serving(create_app(path)) as where:
        yield f"http://{where}/v1", made


def client(api, tenant: str = "acme", key: str | None = None) -> openai.AsyncOpenAI:
    base, tokens = api
    return openai.AsyncOpenAI(base_url=base, api_key=key or tokens[tenant], max_retries=0)


@pytest.mark.usefixtures("local_services")
async def test_the_openai_client_gets_a_fused_answer_with_its_route_usage_and_overhead(api, assert_no_leaks):
    prompt = "Say alpha. Say beta."  # two fragments on the echo model
    raw = await client(api).chat.completions.with_raw_response.create(
        model="echo",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}],
        max_tokens=16,
    )
    answer = raw.parse()
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content and answer.usage.total_tokens > 0
    extension = answer.model_extra["homeskillet"]
    assert answer.id == f"chatcmpl-{extension['request_id']}"
    assert all(f["model"] == "echo" and f["allocation_id"].startswith("alloc-") for f in extension["fragments"])
    headers = raw.headers
    assert headers["x-homeskillet-request-id"] == extension["request_id"]
    assert headers["x-homeskillet-route"] == ",".join(f"{f['id']}=echo" for f in extension["fragments"])
    assert float(headers["x-homeskillet-overhead-ms"]) > 0


@pytest.mark.usefixtures("local_services")
async def test_models_are_what_the_covenant_allows(api):
    acme = {m.id async for m in client(api).models.list()}
    globex = {m.id async for m in client(api, "globex").models.list()}
    assert {"homeskillet/auto", "homeskillet/single", "echo", "echo-lite"} <= acme
    assert "echo-lite" in globex and "echo" not in globex


@pytest.mark.usefixtures("local_services")
async def test_each_refusal_is_the_sdks_exception_and_carries_the_headers(api, assert_no_leaks):
    messages = [{"role": "user", "content": "Say hi."}]
    for tenant, key, kwargs, kind, status in (
        ("acme", "hs_made-up", {"model": "echo"}, openai.AuthenticationError, 401),
        ("acme", None, {"model": "gpt-4o"}, openai.NotFoundError, 404),
        ("acme", None, {"model": "echo", "extra_body": {"tools": []}}, openai.BadRequestError, 400),
        ("globex", None, {"model": "echo"}, openai.PermissionDeniedError, 403),
        ("initech", None, {"model": "echo"}, openai.RateLimitError, 429),
    ):
        with pytest.raises(kind) as refused:
            await client(api, tenant, key).chat.completions.create(messages=messages, max_tokens=4, **kwargs)
        assert refused.value.status_code == status
        error = refused.value.body if isinstance(refused.value.body, dict) else {}
        assert {"message", "type", "param", "code"} <= set(error), error
        if status != 401:
            assert refused.value.response.headers["x-homeskillet-request-id"].startswith("api-")
    assert refused.value.code == "insufficient_quota"


@pytest.mark.usefixtures("local_services")
async def test_curl_shaped_requests_and_a_health_check(api):
    base, tokens = api
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.get(base.removesuffix("/v1") + "/healthz")).json() == {"status": "ok"}
        bad = await http.post(
            f"{base}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {tokens['acme']}"}
        )
        assert bad.status_code == 400 and json.loads(bad.text)["error"]["message"].endswith("the body is not JSON")


@pytest.mark.usefixtures("local_services")
async def test_a_streamed_answer_is_the_same_answer_in_chunks_ending_with_usage_and_done(api, assert_no_leaks):
    messages = [{"role": "user", "content": "Say alpha. Say beta."}]
    whole = await client(api).chat.completions.create(model="echo", messages=messages, max_tokens=16)
    chunks = [
        c
        async for c in await client(api).chat.completions.create(
            model="echo", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    ]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(finished) == 1 and finished[0].model_extra["homeskillet"]["route"].startswith("f1=echo")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


@pytest.mark.usefixtures("local_services")
async def test_curl_sees_server_sent_events_ending_with_done(api):
    base, tokens = api
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
    headers = {"Authorization": f"Bearer {tokens['acme']}"}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{base}/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-homeskillet-request-id"].startswith("api-")
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line.removeprefix("data: "))["object"] == "chat.completion.chunk" for line in lines[:-1])


@pytest.mark.usefixtures("local_services")
async def test_a_refusal_before_any_text_is_a_plain_http_error_even_when_streaming(api):
    with pytest.raises(openai.RateLimitError) as refused:
        await client(api, "initech").chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "Say hi."}], stream=True
        )
    assert refused.value.code == "insufficient_quota"


@pytest.mark.usefixtures("local_services")
async def test_a_client_that_goes_away_mid_stream_cancels_the_run_and_releases_its_slices(
    api, monkeypatch, assert_no_leaks
):
    import asyncio

    from tasks import runtime

    monkeypatch.setenv("ECHO_DELAY_S", "0.5")  # each echo answer takes a while: the stream is open meanwhile
    base, tokens = api
    body = {
        "model": "echo",
        "stream": True,
        "messages": [{"role": "user", "content": "1. Say one.\n2. Say two.\n3. Say three.\n4. Say four."}],
    }
    headers = {"Authorization": f"Bearer {tokens['acme']}"}
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{base}/chat/completions", json=body, headers=headers) as response,
    ):
        request_id = response.headers["x-homeskillet-request-id"]
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # the first chunk: then the client goes away
    services = runtime.services()
    for _ in range(100):
        held = [a for a in await services.held("acme") if a.request_id == request_id]
        if not held:
            break
        await asyncio.sleep(0.1)
    assert not held


@pytest.mark.usefixtures("local_services")
async def test_the_concurrency_cap_holds_across_two_server_processes(
    test_catalog, tmp_path, monkeypatch, assert_no_leaks
):
    """Two `homeskillet serve` processes on the session's PostgreSQL and Prefect: acme's covenant
    allows 2 requests at once, counted in the ledger over both, so of 6 slow requests sent at once,
    3 to each process, 2 run and 4 are refused at once (429, Retry-After), and the refused leave
    no running request behind. (A cap per process would have let 4 run.)"""
    import asyncio
    import os
    import subprocess
    import sys

    import asyncpg

    from connectors import postgres
    from connectors.processes import free_port

    path = write_catalog(tmp_path / "catalog.yaml", test_catalog, {"acme": {"max_concurrent_requests": 2}})
    store = await TokenStore.open(get_settings().pgdata)
    headers = {"Authorization": f"Bearer {(await store.create('acme'))[1]}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "Say one."}], "max_tokens": 8}
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"serve-{port}.log" for port in ports]
    servers = []
    for port, log_path in zip(ports, logs, strict=True):
        with open(log_path, "wb") as log:
            command = [sys.executable, "-m", "apps.cli", "serve", "--port", str(port), "--catalog", path]
            root = Path(__file__).parents[2]
            servers.append(subprocess.Popen(command, cwd=root, env=os.environ.copy(), stdout=log, stderr=log))
    try:
        async with httpx.AsyncClient(timeout=120) as http:
            for server, port, log_path in zip(servers, ports, logs, strict=True):
                for _ in range(600):  # listening
                    assert server.poll() is None, log_path.read_text()[-2000:]
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                # a first request warms the process (its flow's clients), so that all six are admitted at once
                warm = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers)
                assert warm.status_code == 200, warm.text
            monkeypatch.setenv("ECHO_DELAY_S", "5")  # each admitted request runs for seconds
            answers = await asyncio.gather(
                *(
                    http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers)
                    for port in ports
                    for _ in range(3)
                )
            )
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429, 429, 429], [a.text for a in answers]
    refused = [a for a in answers if a.status_code == 429]
    for answer in refused:
        assert int(answer.headers["Retry-After"]) >= 1
        error = answer.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "max_concurrent_requests: limit 2 at once" in error["message"]
    ids = [a.headers["x-homeskillet-request-id"] for a in answers]
    conn = await asyncpg.connect(postgres.dsn(get_settings().pgdata, "homeskillet"))
    try:
        rows = await conn.fetch("SELECT request_id, ended_at FROM requests WHERE request_id = ANY($1::text[])", ids)
    finally:
        await conn.close()
    admitted = [a.headers["x-homeskillet-request-id"] for a in answers if a.status_code == 200]
    assert sorted(r["request_id"] for r in rows) == sorted(admitted)  # the refused were never admitted
    assert all(r["ended_at"] is not None for r in rows)  # the admitted ended with their answers


def test_temperature_and_stop_go_in_the_constraints_and_out_of_bounds_are_refused_by_name():
    chat = parse_request({"model": "echo", "messages": USER, "temperature": 0.2, "stop": "beta"})
    assert flow_arguments(chat, {"echo"})["constraints"] == {
        "allowed_models": ["echo"],
        "temperature": 0.2,
        "stop": ["beta"],  # a string is one stop sequence
    }
    chat = parse_request({"model": "homeskillet/auto", "messages": USER, "temperature": 0, "stop": ["a", "b"]})
    assert flow_arguments(chat, {"echo"})["constraints"] == {"temperature": 0, "stop": ["a", "b"]}
    chat = parse_request({"model": "homeskillet/auto", "messages": USER, "stop": None})
    assert flow_arguments(chat, {"echo"})["constraints"] == {}
    for wrong, named in (
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop: List should have at most 4 items"),
        ({"stop": ["a", ""]}, r"stop: stop\[1\] is 0 characters; each stop sequence is 1 to 64"),
        ({"stop": "x" * 65}, r"stop: stop\[0\] is 65 characters"),
        ({"temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
        ({"temperature": -0.1}, "temperature: Input should be greater than or equal to 0"),
    ):
        with pytest.raises(InvalidRequest, match=named) as refused:
            parse_request({"model": "echo", "messages": USER, **wrong})
        assert error_of(refused.value, "api-1")[0] == 400


@pytest.mark.usefixtures("local_services")
async def test_the_openai_clients_temperature_and_stop_reach_every_model_call(api, echo_server, assert_no_leaks):
    before = len(echo_server.seen)
    answer = await client(api).chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Say alpha. Say beta."}],
        max_tokens=16,
        temperature=0.2,
        stop=["beta"],
    )
    assert answer.choices[0].message.content
    calls = echo_server.seen[before:]
    assert calls and all(c["model"] == "echo-1" for c in calls)
    assert all(c["temperature"] == 0.2 and c["stop"] == ["beta"] for c in calls), calls
    with pytest.raises(openai.BadRequestError, match="stop: List should have at most 4 items") as refused:
        await client(api).chat.completions.create(
            model="echo", messages=USER, max_tokens=4, stop=["a", "b", "c", "d", "e"]
        )
    assert refused.value.status_code == 400
    assert len(echo_server.seen) == before + len(calls)  # refused before any model call
