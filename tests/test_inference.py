"""The inference client and the local model servers, with the real SmolLM2 on llama.cpp."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from connectors import openai_client
from connectors.model_server import ModelServers
from homeskillet import catalog as cat
from homeskillet.errors import InferenceError
from homeskillet.settings import get_settings
from tasks import runtime

SMOL = cat.model(runtime.catalog(), "smollm2-135m")


@pytest.fixture(scope="module")
def smol_endpoint():
    servers = runtime.backend().servers
    endpoint = servers.acquire(SMOL, "test-inference")
    yield endpoint
    servers.done("test-inference")


async def test_chat_completion_reports_text_and_usage(smol_endpoint):
    out = await openai_client.complete(
        smol_endpoint, SMOL.name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    assert out.text.strip()
    assert out.tokens_in > 0 and 0 < out.tokens_out <= 16
    assert out.first_token_s is None and out.total_s > 0


async def test_streaming_measures_time_to_first_token(smol_endpoint):
    out = await openai_client.complete(smol_endpoint, SMOL.name, prompt="The sea is", max_tokens=12, stream=True)
    assert out.text.strip()
    assert 0 < out.first_token_s <= out.total_s
    assert 0 < out.tokens_out <= 12


async def test_same_answer_streaming_or_not(smol_endpoint):
    kwargs = dict(messages=[{"role": "user", "content": "Name a color."}], max_tokens=10)
    plain = await openai_client.complete(smol_endpoint, SMOL.name, **kwargs)
    streamed = await openai_client.complete(smol_endpoint, SMOL.name, stream=True, **kwargs)
    assert plain.text == streamed.text


async def test_http_errors_and_dead_endpoints_are_inference_errors(echo_server):
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    with pytest.raises(InferenceError, match="HTTP 500.*model crashed"):
        await openai_client.complete(base, "echo-1", messages=[{"role": "user", "content": "FAIL"}])
    with pytest.raises(InferenceError, match="ConnectError"):
        await openai_client.complete("http://127.0.0.1:9/v1", "x", prompt="hi")


async def test_api_key_is_sent_as_bearer(echo_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    await openai_client.complete(base, "echo-1", prompt="hi", api_key="sk-test")
    assert echo_server.seen[-1]["auth"] == "Bearer sk-test"


def test_idle_model_servers_stop_and_busy_ones_do_not(tmp_path):
    servers = ModelServers(get_settings().home / "models", tmp_path, idle_s=1.0)
    servers.acquire(SMOL, "a")
    time.sleep(3.0)
    assert SMOL.name in servers.running()  # in use: kept
    servers.done("a")
    deadline = time.monotonic() + 15
    while SMOL.name in servers.running() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert SMOL.name not in servers.running()
    servers.stop_all()


def test_a_model_server_exits_with_the_process_that_started_it():
    script = textwrap.dedent(
        """
        import os
        from connectors.model_server import ModelServers
        from tasks import runtime
        from homeskillet import catalog as cat
        from pathlib import Path
        servers = ModelServers(Path(os.environ["HOMESKILLET_HOME"]) / "models", Path(os.environ["HOMESKILLET_HOME"]), 300)
        servers.acquire(cat.model(runtime.catalog(), "smollm2-135m"), "x")
        print([s.proc.pid for s in servers._servers.values()][0], flush=True)
        import time; time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    child = int(parent.stdout.readline())
    assert psutil.pid_exists(child)
    parent.send_signal(signal.SIGKILL)  # no atexit, no cleanup
    parent.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "model server outlived its parent"
        time.sleep(0.2)


def test_completion_prompts_end_with_one_answer_cue():
    from tasks.resources import render

    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    assert render(gemma, "What is 2 + 2?")["prompt"] == "Question: What is 2 + 2?\nAnswer:"
    few_shot = "Which is a gas?\nA) ice\nB) steam\nAnswer:"  # brings its own cue: no second one
    assert render(gemma, few_shot + "\n")["prompt"] == f"Question: {few_shot}"
    assert render(SMOL, few_shot) == {"messages": [{"role": "user", "content": few_shot}]}


def test_a_cost_the_provider_reports_is_kept():
    body = {"choices": [{"message": {"content": "B"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
    assert openai_client._parse(body, True, "u", 0.1).cost_usd is None
    assert openai_client._parse({**body, "usage": {"cost_usd": 0.0021}}, True, "u", 0.1).cost_usd == 0.0021
    assert openai_client._parse({**body, "usage": {"cost": "0.5"}}, True, "u", 0.1).cost_usd == 0.5  # OpenRouter
    assert openai_client._parse({**body, "usage": {"cost_usd": "n/a"}}, True, "u", 0.1).cost_usd is None
