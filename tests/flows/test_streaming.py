"""A request that streams (`fuse_request(stream=True)`): its plan, each fragment's answer as its
model makes it and each fragment's final text, as progress events of its request id; a model
server killed mid-answer does not end the client's text: the next try continues it. Real Prefect,
PostgreSQL and llama.cpp model servers; the echo double where a model's words do not matter."""

import asyncio
import os
import signal
import uuid

import pytest

from flows.fusion import fuse_request
from tasks import progress, runtime

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


def of(events: list[dict], kind: str, fragment_id: str | None = None) -> list[dict]:
    return [e for e in events if e["event"] == kind and fragment_id in (None, e.get("fragment_id"))]


def streamed(events: list[dict], fragment_id: str) -> str:
    return "".join(e["text"] for e in of(events, "token", fragment_id))


async def test_each_fragments_tokens_arrive_in_order_within_its_call_and_start_its_answer(local_models):
    request_id = f"stream-{uuid.uuid4().hex[:8]}"
    events: list[dict] = []
    with progress.listening(request_id, events.append):
        result = await fuse_request(
            prompt="What is the capital of France? Describe the sea in two sentences.",
            tenant="demo",
            request_id=request_id,
            constraints={"max_tokens": 16},
            stream=True,
        )
    assert events[0]["event"] == "planned" and events[0]["fusion"] == "ordered"
    assert [f["id"] for f in events[0]["fragments"]] == ["f1", "f2"]
    assert {m.model for m in result.fragments} == {"gemma3-270m", "smollm2-135m"}  # both prompt styles
    for fragment in result.fragments:
        fid = fragment.fragment_id
        (answered,) = of(events, "answered", fid)
        tokens = of(events, "token", fid)
        assert tokens, f"{fid} streamed nothing"
        assert answered["text"] == fragment.text
        assert fragment.text.startswith(streamed(events, fid)) and streamed(events, fid).strip()
        # every piece between its call's allocation and its release, before the fragment's answer
        where = [events.index(e) for e in tokens]
        assert events.index(of(events, "allocated", fid)[0]) < min(where)
        assert max(where) < events.index(of(events, "completed", fid)[0]) < events.index(answered)


async def test_a_request_that_does_not_stream_sends_only_allocations_and_releases(test_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    request_id = f"plain-{uuid.uuid4().hex[:8]}"
    events: list[dict] = []
    with progress.listening(request_id, events.append):
        await fuse_request(
            prompt="1. Say one.\n2. Say two.",
            tenant="acme",
            request_id=request_id,
            constraints={"allowed_models": ["echo"], "pool": "roomy"},
            catalog_path=test_catalog,
        )
    assert sorted(e["event"] for e in events) == ["allocated", "allocated", "completed", "completed"]


async def test_an_ordered_plan_and_a_reduce_plan_say_their_plan_and_each_fragments_answer(test_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    body = "\n\n".join(f"Part {i} " + "lorem ipsum dolor " * 250 for i in range(3))
    echo = {"allowed_models": ["echo"], "pool": "roomy", "max_tokens": 64}
    for prompt, fusion in [("1. Say one.\n2. Say two.", "ordered"), ("Summarize the following:\n" + body, "reduce")]:
        request_id = f"{fusion}-{uuid.uuid4().hex[:8]}"
        events: list[dict] = []
        with progress.listening(request_id, events.append):
            result = await fuse_request(
                prompt=prompt,
                tenant="acme",
                request_id=request_id,
                constraints=echo,
                catalog_path=test_catalog,
                stream=True,
            )
        (planned,) = of(events, "planned")
        assert events[0] is planned and planned["fusion"] == fusion == result.fusion
        assert [f["id"] for f in planned["fragments"]] == [f.fragment_id for f in result.fragments]
        assert all(set(f) == {"id", "text", "depends_on"} for f in planned["fragments"])
        answered = {e["fragment_id"]: e["text"] for e in of(events, "answered")}
        assert answered == {f.fragment_id: f.text for f in result.fragments}
        for fragment in result.fragments:  # the echo double answers in one piece: the whole text
            assert streamed(events, fragment.fragment_id) == fragment.text
        if fusion == "reduce":
            *maps, reduce = planned["fragments"]
            assert len(maps) >= 2 and reduce["depends_on"] == [m["id"] for m in maps]
            # the reduce step is answered after every chunk it reads
            order = [e["fragment_id"] for e in of(events, "answered")]
            assert order[-1] == reduce["id"]


async def test_a_model_server_killed_mid_stream_is_continued_and_the_client_text_goes_on(local_models):
    """The llama-server of a streaming fragment dies after its first tokens: the request succeeds,
    its answer starts with what was streamed before the kill, tokens keep coming from the next
    try (a fresh server, given that text as the start of its answer), and nothing stays held."""
    services = runtime.services()
    local = services.local
    assert local is local_models
    smol = next(m for m in services.catalog.models if m.name == "smollm2-135m")
    endpoint = await asyncio.to_thread(local.model_endpoint, smol)
    (record,) = [r for r in local.servers.running() if r.endpoint == endpoint]
    request_id = f"killed-{uuid.uuid4().hex[:8]}"
    events: list[dict] = []
    with progress.listening(request_id, events.append):
        run = asyncio.create_task(
            fuse_request(
                prompt="Write a long story about the sea.",
                tenant="demo",
                request_id=request_id,
                constraints={"allowed_models": [smol.name], "max_tokens": 200, "split": False},
                stream=True,
            )
        )
        for _ in range(3000):
            if len(of(events, "token")) >= 4 or run.done():
                break
            await asyncio.sleep(0.01)
        assert len(of(events, "token")) >= 4, "no tokens streamed"
        os.kill(record.server_pid, signal.SIGKILL)
        before = streamed(events, "f1")
        sent_before = len(of(events, "token"))
        result = await run
    (fragment,) = result.fragments
    assert fragment.text.startswith(before)
    assert len(of(events, "token")) > sent_before, "no tokens after the kill"
    assert streamed(events, "f1") == fragment.text and fragment.text.strip() != before.strip()
    (answered,) = of(events, "answered", "f1")
    assert answered["text"] == fragment.text
    assert "characters were streamed; the next try continues them" in fragment.reason
    assert fragment.attempts == 2
    assert record.server_pid not in {r.server_pid for r in local.servers.running()}  # a fresh server answered
    assert await local.held("demo") == []
