"""fuse_request (`flows.fusion`) end to end: a real Prefect server, real PostgreSQL ledger, real models."""

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import yaml
from prefect import flow

from connectors.ledger import new_allocation_id
from flows.fusion import _deployment_run, fuse_request
from homeskillet import catalog as cat
from homeskillet.errors import (
    CapacityTimeout,
    InferenceError,
    InvalidRequest,
    NoRoute,
    UnknownModel,
    UnknownTenant,
)
from tasks import runtime
from tests.support import JSONHandler

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")

THREE_PARTS = "What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea."


async def test_only_a_deployment_run_is_taken_for_one():
    """In-process runs (CLI, MCP server) keep their hosted·ai subscriptions warm for the next
    request; only a deployment's run retires them (tests/deployments/test_e2e.py covers that side)."""

    @flow
    async def probe() -> bool:
        return _deployment_run()

    assert _deployment_run() is False
    assert await probe() is False


async def test_a_three_part_question_runs_on_real_models_and_releases_everything():
    state = await fuse_request(prompt=THREE_PARTS, tenant="demo", return_state=True)
    result = await state.result()
    assert [f.fragment_id for f in result.fragments] == ["f1", "f2", "f3"]
    assert len({f.allocation_id for f in result.fragments}) == 3
    assert {f.model for f in result.fragments} == {"gemma3-270m", "smollm2-135m"}
    assert "paris" in result.fragments[0].text.lower()
    assert all(f.text.strip() and f.tokens_out > 0 and f.cost_usd > 0 for f in result.fragments)
    assert result.answer.startswith("1. What is the capital of France?")
    assert result.cost_usd == pytest.approx(sum(f.cost_usd for f in result.fragments))

    flow_run_id = str(state.state_details.flow_run_id)
    async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"]) as api:
        response = await api.post(
            "/artifacts/filter",
            json={"artifacts": {"key": {"any_": ["fragments"]}, "flow_run_id": {"any_": [flow_run_id]}}, "limit": 10},
        )
    artifacts = response.raise_for_status().json()
    assert len(artifacts) == 1 and artifacts[0]["type"] == "table"
    rows = json.loads(artifacts[0]["data"])
    assert [r["allocation_id"] for r in rows] == [f.allocation_id for f in result.fragments]


async def test_a_failing_fragment_fails_the_request_and_releases_every_allocation(test_catalog, echo_server):
    seen = len(echo_server.seen)
    with pytest.raises(InferenceError, match="HTTP 500"):
        await fuse_request(
            prompt="1. Say one #fail3.\n2. FAIL now #fail3.\n3. Say three #fail3.",
            tenant="acme",
            constraints={"allowed_models": ["echo"], "pool": "roomy"},
            catalog_path=test_catalog,
        )
    # all three were allocated and sent; two were still running when the third failed
    assert len(echo_server.seen) - seen == 3


async def test_cancelling_a_request_mid_inference_releases_its_allocations(test_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "5")
    backend = runtime.backend(test_catalog)
    run = asyncio.create_task(
        fuse_request(
            prompt="1. Say one.\n2. Say two.",
            tenant="acme",
            constraints={"allowed_models": ["echo"], "pool": "roomy"},
            catalog_path=test_catalog,
        )
    )
    for _ in range(200):
        if len(await backend.held("acme")) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(await backend.held("acme")) == 2
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_a_request_that_does_not_fit_fails_clearly_after_the_wait(test_catalog):
    with pytest.raises(CapacityTimeout, match="pool 'tiny' had no room for echo"):
        await fuse_request(
            prompt="1. Say one.\n2. Say two.\n3. Say three.",
            tenant="acme",
            constraints={"allowed_models": ["echo"], "pool": "tiny", "capacity_wait_s": 0.2},
            catalog_path=test_catalog,
        )


async def test_fragments_queue_for_a_small_pool_and_all_complete(test_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0.2")
    result = await fuse_request(
        prompt="1. Say one.\n2. Say two.\n3. Say three.",
        tenant="acme",
        constraints={"allowed_models": ["echo"], "pool": "tiny", "capacity_wait_s": 30},
        catalog_path=test_catalog,
    )
    assert [f.text for f in result.fragments] == ["echo: Say one.", "echo: Say two.", "echo: Say three."]


async def test_map_reduce_feeds_chunk_answers_into_the_reduce_step(test_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    body = "\n\n".join(f"Part {i} " + "lorem ipsum dolor " * 250 for i in range(3))
    result = await fuse_request(
        prompt="Summarize the following:\n" + body,
        tenant="acme",
        constraints={"allowed_models": ["echo"], "pool": "roomy", "max_tokens": 64},
        catalog_path=test_catalog,
    )
    *maps, reduce = result.fragments
    assert result.fusion == "reduce" and len(maps) >= 2
    assert all(m.text.strip() in reduce.text for m in maps)  # the reduce prompt carried every chunk's answer
    assert result.answer == reduce.text.strip()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompt": "   "}, InvalidRequest, "prompt is empty"),
        ({"prompt": "Why " + "so " * 4000 + "?"}, InvalidRequest, "beyond every allowed model's context"),
        ({"tenant": "nobody"}, UnknownTenant, "unknown tenant 'nobody'"),
        ({"constraints": {"allowed_models": ["gpt-9"]}}, UnknownModel, "unknown model 'gpt-9'"),
        ({"constraints": {"max_cost_usd": 1e-12}}, NoRoute, "no model fits max_cost"),
        ({"constraints": {"pool": "micro"}}, NoRoute, "micro .* too small for any allowed model"),
        ({"constraints": {"max_tokens": 0}}, InvalidRequest, "constraints.max_tokens"),
    ],
)
async def test_bad_input_is_named_and_nothing_is_held(test_catalog, kwargs, error, message):
    args = {"prompt": "What is 2 + 2?", "tenant": "acme", "catalog_path": test_catalog, **kwargs}
    with pytest.raises(error, match=message):
        await fuse_request(**args)


async def test_the_run_log_says_each_routing_decision_allocation_and_release(test_catalog):
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    flow_runs = logging.getLogger("prefect.flow_runs")
    level = flow_runs.level
    flow_runs.addHandler(handler)
    flow_runs.setLevel(logging.INFO)
    try:
        result = await fuse_request(
            prompt="1. Say one.\n2. Say two.",
            tenant="acme",
            catalog_path=test_catalog,
            constraints={"allowed_models": ["echo"], "pool": "roomy"},
        )
    finally:
        flow_runs.removeHandler(handler)
        flow_runs.setLevel(level)
    for fragment in result.fragments:
        mine = [line for line in lines if line.startswith(f"fragment {fragment.fragment_id}:")]
        assert any(f"echo on {fragment.tier} pool roomy (" in line for line in mine), mine
        assert any(f"allocated {fragment.allocation_id} on roomy (" in line for line in mine), mine
        assert any(f"released {fragment.allocation_id} after" in line for line in mine), mine
        assert any("single answer of echo stands" in line for line in mine), mine


async def test_a_model_server_killed_mid_inference_fails_the_request_clearly_and_the_next_one_runs():
    """The machine-wide llama-server dies under a fragment: a clear InferenceError, the slice
    released by the rollback, and the next request starts a fresh server."""
    import signal

    services = runtime.services()
    local = services.local
    smol = next(m for m in services.catalog.models if m.name == "smollm2-135m")
    endpoint = await asyncio.to_thread(local.model_endpoint, smol)
    (record,) = [r for r in local.servers.running() if r.endpoint == endpoint]  # this catalog's server
    run = asyncio.create_task(
        fuse_request(
            prompt="Write a long story about the sea.",
            tenant="demo",
            constraints={"allowed_models": [smol.name], "max_tokens": 1500, "split": False},
        )
    )
    for _ in range(400):
        if await local.held("demo"):
            break
        await asyncio.sleep(0.025)
    assert await local.held("demo"), "the fragment never got its allocation"
    await asyncio.sleep(0.3)  # decoding now
    os.kill(record.server_pid, signal.SIGKILL)
    with pytest.raises(InferenceError, match=rf"127\.0\.0\.1:{record.port}/v1/chat/completions failed"):
        await run
    assert await local.held("demo") == []
    again = await fuse_request(
        prompt="Say hello.", tenant="demo", constraints={"allowed_models": [smol.name], "max_tokens": 8}
    )
    assert again.fragments[0].tokens_out > 0


@pytest.fixture
def own_ledger_postgres():
    """A state folder of this test's own, so that the ledger's PostgreSQL is not the one the
    session's Prefect server runs on (restarting that would test Prefect, not the ledger): yields
    a function that restarts it the way an operator would, from another process. The folder is
    not under pytest's tmp_path: each pytest session on the machine chmods /tmp/pytest-of-<user>
    back to 0700, which locks PostgreSQL's own user out of it."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from homeskillet.settings import get_settings

    home = Path(tempfile.mkdtemp(prefix="hs-pg-restart-"))
    pgdata = home / "pgdata"

    def pg(action: str) -> None:
        code = f"from pathlib import Path; from connectors import postgres; postgres.{action}_postgres(Path({str(pgdata)!r}))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{action} PostgreSQL: {done.stderr[-2000:]}"

    async def restart(down_s: float) -> None:
        await asyncio.to_thread(pg, "stop")
        await asyncio.sleep(down_s)
        await asyncio.to_thread(pg, "ensure")

    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOMESKILLET_HOME", str(home))
        get_settings.cache_clear()
        try:
            yield restart
        finally:
            get_settings.cache_clear()  # the session's settings again, once the variable is restored
    get_settings.cache_clear()
    pg("stop")
    shutil.rmtree(home, ignore_errors=True)


async def _watch_capacity(ledger, seen: list[str], stop: asyncio.Event) -> None:
    """Until stopped: every pool's active slices fit in the pool (each over-commit seen is noted)."""
    capacity = await ledger.capacities()
    while not stop.is_set():
        used: dict[str, float] = {}
        for a in await ledger.held():
            used[a.pool] = used.get(a.pool, 0.0) + a.tflops
        seen += [
            f"{pool}: {t:g} TFLOPS held of {capacity[pool][0]:g}"
            for pool, t in used.items()
            if t > capacity[pool][0] + 1e-9
        ]
        await asyncio.sleep(0.1)


async def test_a_postgresql_restart_under_concurrent_requests_leaves_the_ledger_consistent(
    test_catalog, own_ledger_postgres, monkeypatch
):
    """Six two-fragment requests on a pool with room for eight slices, and the ledger's PostgreSQL
    restarted while they hold and wait for slices: each request completes or fails with a clear
    HomeskilletError, no slice is left, the pool is never over-committed and it is whole after."""
    from homeskillet.errors import HomeskilletError
    from homeskillet.schemas import FusionResult

    monkeypatch.setenv("ECHO_DELAY_S", "1.5")
    services = runtime.services(test_catalog)
    ledger = await services.ledger()
    roomy = cat.pool(services.catalog, "roomy")
    room = int(roomy.tflops / cat.model(services.catalog, "echo").tflops)  # 8 slices of 1 TFLOPS
    over_commits: list[str] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_capacity(ledger, over_commits, stop))
    requests = [
        asyncio.create_task(
            fuse_request(
                prompt=f"1. Say one ({i}).\n2. Say two ({i}).",
                tenant="acme",
                constraints={"allowed_models": ["echo"], "pool": "roomy", "capacity_wait_s": 60},
                catalog_path=test_catalog,
            )
        )
        for i in range(6)
    ]
    for _ in range(300):  # the pool is full and fragments wait for room
        if len(await ledger.held("acme")) == room:
            break
        await asyncio.sleep(0.05)
    assert len(await ledger.held("acme")) == room
    await own_ledger_postgres(down_s=2.0)
    outcomes = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 80)
    stop.set()
    await watcher

    unclear = [o for o in outcomes if not isinstance(o, FusionResult | HomeskilletError)]
    assert unclear == [], unclear
    assert over_commits == []
    assert await ledger.held() == []
    assert (await ledger.usage("acme"))["requests_running"] == 0
    whole = await ledger.reserve(
        allocation_id=new_allocation_id(),
        tenant="acme",
        request_id="after-restart",
        pool=roomy.id,
        model="echo",
        tflops=roomy.tflops,
        vram_gb=roomy.vram_gb,
        wait_s=0,
    )
    await ledger.release(whole.allocation_id, "acme")


CONVERSATION = [
    {"role": "system", "content": "You count in French."},
    {"role": "user", "content": "Count to one."},
    {"role": "assistant", "content": "Un."},
]


@pytest.fixture
def context_catalog(test_catalog, echo_server, serve_http, tmp_path):
    """The test catalog with two more models: `recorder`, a chat model behind a loopback endpoint
    that keeps every request body it gets, and `echo-completion`, the echo double as a
    completion-style model. Returns (catalog path, the bodies the recorder got)."""
    bodies: list[dict] = []

    class Recorder(JSONHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append({"path": self.path, **body})
            reply = {"message": {"role": "assistant", "content": f"heard {body['messages'][-1]['content']}"}}
            self._send(200, {"choices": [{"index": 0, "finish_reason": "stop", **reply}], "usage": {}})

    host, port = serve_http(Recorder)
    raw = yaml.safe_load(Path(test_catalog).read_text())
    echo = next(m for m in raw["models"] if m["name"] == "echo")
    recorder = {
        **echo,
        "name": "recorder",
        "serving": {"kind": "openai", "base_url": f"http://{host}:{port}/v1", "model": "rec"},
    }
    raw["models"] += [recorder, {**echo, "name": "echo-completion", "prompt_style": "completion"}]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path), bodies


async def test_every_fragment_of_a_chat_request_is_sent_the_conversation_before_its_own_text(context_catalog):
    path, bodies = context_catalog
    result = await fuse_request(
        prompt="1. Say one.\n2. Say two.",
        tenant="acme",
        constraints={"allowed_models": ["recorder"], "pool": "roomy"},
        catalog_path=path,
        context=CONVERSATION,
    )
    assert [f.text for f in result.fragments] == ["heard Say one.", "heard Say two."]
    assert all(b["path"] == "/v1/chat/completions" for b in bodies)
    sent = sorted((b["messages"] for b in bodies), key=lambda m: m[-1]["content"])
    assert sent == [
        [*CONVERSATION, {"role": "user", "content": "Say one."}],
        [*CONVERSATION, {"role": "user", "content": "Say two."}],
    ]


async def test_a_completion_model_reads_the_conversation_as_lines_before_the_question(context_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    path, _ = context_catalog
    result = await fuse_request(
        prompt="1. Say one.\n2. Say two.",
        tenant="acme",
        constraints={"allowed_models": ["echo-completion"], "pool": "roomy"},
        catalog_path=path,
        context=CONVERSATION,
    )
    lines = "System: You count in French.\nUser: Count to one.\nAssistant: Un.\n"
    assert [f.text for f in result.fragments] == [
        f"echo: {lines}Question: Say one.\nAnswer:",
        f"echo: {lines}Question: Say two.\nAnswer:",
    ]
