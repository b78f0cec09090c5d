"""The OpenAI-compatible API under stress: a model server that dies while the API streams its
answer (the fragment goes on on a fresh server, given the text already sent as the start of its
answer, and the client's stream continues without an error: real llama-servers, the real `openai`
client), and a body too large to read."""

from __future__ import annotations

import asyncio
import os
import signal

import openai
import pytest

from connectors.tokens import TokenStore
from homeskillet.settings import get_settings
from tasks import runtime


@pytest.mark.usefixtures("local_services")
async def test_a_model_server_killed_mid_stream_does_not_end_the_clients_stream(local_models, assert_no_leaks):
    from apps.mcp_server import create_app
    from tests.apps.test_mcp_server import serving

    services = runtime.services()
    smol = next(m for m in services.catalog.models if m.name == "smollm2-135m")
    endpoint = await asyncio.to_thread(local_models.model_endpoint, smol)
    (record,) = [r for r in local_models.servers.running() if r.endpoint == endpoint]
    store = await TokenStore.open(get_settings().pgdata)
    token_id, token = await store.create("demo")
    try:
        with serving(create_app()) as where:
            client = openai.AsyncOpenAI(base_url=f"http://{where}/v1", api_key=token, max_retries=0, timeout=300)
            stream = await client.chat.completions.create(
                model=smol.name,
                messages=[{"role": "user", "content": "Write a long story about the sea."}],
                max_tokens=200,
                stream=True,
            )
            pieces, before, finish = [], None, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                    if len(pieces) == 6:  # some of the answer is out: its server dies
                        os.kill(record.server_pid, signal.SIGKILL)
                        before = "".join(pieces)
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk
    finally:
        await store.revoke(token_id)
    text = "".join(pieces)
    assert before is not None and text.startswith(before) and len(text) > len(before)
    assert finish.choices[0].finish_reason == "stop"
    (fragment,) = finish.model_extra["homeskillet"]["fragments"]
    assert "the next try continues them" in fragment["reason"]
    assert record.server_pid not in {r.server_pid for r in local_models.servers.running()}


@pytest.mark.usefixtures("local_services")
async def test_a_body_over_the_limit_is_refused_without_being_read_whole(test_catalog):
    import httpx

    from apps.api import MAX_BODY_BYTES
    from apps.mcp_server import create_app
    from tests.apps.test_mcp_server import serving

    store = await TokenStore.open(get_settings().pgdata)
    token_id, token = await store.create("acme")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def endless():  # no Content-Length: the server must stop reading on its own
        for _ in range(MAX_BODY_BYTES // 2**16 + 2):
            yield b" " * 2**16

    try:
        with serving(create_app(test_catalog)) as where:
            async with httpx.AsyncClient(timeout=60) as http:
                url = f"http://{where}/v1/chat/completions"
                declared = await http.post(url, content=b" " * (MAX_BODY_BYTES + 1), headers=headers)
                streamed = await http.post(url, content=endless(), headers=headers)
    finally:
        await store.revoke(token_id)
    assert declared.status_code == 400 and f"at most {MAX_BODY_BYTES}" in declared.json()["error"]["message"]
    assert streamed.status_code == 400 and "is over" in streamed.json()["error"]["message"]


@pytest.mark.usefixtures("local_services")
async def test_a_client_that_goes_away_before_a_whole_answer_cancels_the_run(
    test_catalog, monkeypatch, assert_no_leaks
):
    """Not streamed: the client gives up while the fragments run; the run is cancelled and its
    slices are released at once, not when the answer would have come."""
    import httpx

    from apps.mcp_server import create_app
    from tests.apps.test_mcp_server import serving

    monkeypatch.setenv("ECHO_DELAY_S", "20")
    store = await TokenStore.open(get_settings().pgdata)
    token_id, token = await store.create("acme")
    body = {"model": "echo", "messages": [{"role": "user", "content": "Say one. Say two."}]}
    try:
        with serving(create_app(test_catalog)) as where:
            async with httpx.AsyncClient() as http:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post(
                        f"http://{where}/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=3,
                    )
            services = runtime.services(test_catalog)
            for _ in range(100):  # released well before the 20 s answers
                if not await services.held("acme"):
                    break
                await asyncio.sleep(0.1)
            assert await services.held("acme") == []
    finally:
        await store.revoke(token_id)


@pytest.mark.usefixtures("local_services")
async def test_each_api_call_counts_against_the_tenants_rate_and_a_server_cap_holds_without_a_covenant_one(
    test_catalog, monkeypatch, assert_no_leaks
):
    from apps.mcp_server import create_app
    from homeskillet.settings import Settings
    from tests.apps.test_mcp_server import serving

    store = await TokenStore.open(get_settings().pgdata)
    token_id, token = await store.create("acme")  # acme's covenant sets no max_concurrent_requests
    tight = Settings(tenant_rate="3/minute", tenant_max_requests=1)
    messages = [{"role": "user", "content": "Say hi."}]
    try:
        with serving(create_app(test_catalog, settings=tight)) as where:
            client = openai.AsyncOpenAI(base_url=f"http://{where}/v1", api_key=token, max_retries=0, timeout=60)
            monkeypatch.setenv("ECHO_DELAY_S", "2")
            outcomes = await asyncio.gather(
                *(client.chat.completions.create(model="echo", messages=messages, max_tokens=4) for _ in range(2)),
                return_exceptions=True,
            )
            refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
            assert len(refused) == 1 and "max_concurrent_requests: limit 1 at once" in str(refused[0])
            with pytest.raises(openai.RateLimitError, match="over its rate of 3/minute"):
                await client.models.list()  # the third and fourth calls of the minute
                await client.models.list()
    finally:
        await store.revoke(token_id)
