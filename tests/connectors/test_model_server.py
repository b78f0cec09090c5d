"""Model servers are machine-wide services: shared by every process, replaced when they die,
stopped when idle or by `homeskillet server stop`. Real llama-server processes with SmolLM2,
under a state folder of their own so that the session's servers are not touched."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest

from connectors.model_server import (
    API_KEY_FILE,
    ModelServers,
    auth_headers,
    check_build,
    ensure_api_key,
    gguf_path,
    read_record,
    slots_for,
    threads_for,
)
from homeskillet import catalog as cat
from homeskillet.catalog import load_catalog
from homeskillet.errors import ServiceError
from homeskillet.schemas import OpenAIServing
from homeskillet.settings import PACKAGED_CATALOG

SMOL = cat.model(load_catalog(PACKAGED_CATALOG), "smollm2-135m")
ASK = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from connectors.model_server import ModelServers
    from homeskillet import catalog as cat
    from homeskillet.catalog import load_catalog
    from homeskillet.settings import PACKAGED_CATALOG
    servers = ModelServers(Path(sys.argv[1]), idle_s=300)
    endpoint = servers.endpoint(cat.model(load_catalog(PACKAGED_CATALOG), "smollm2-135m"), slots=2)
    print(json.dumps({"endpoint": endpoint, "pids": [r.server_pid for r in servers.running()]}), flush=True)
    """
)


@pytest.fixture
def servers(tmp_path, llama_server):
    servers = ModelServers(tmp_path, idle_s=300)
    yield servers
    servers.stop_all()
    assert servers.running() == []


def ask_in_another_process(home) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ASK, str(home)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())


def chat(endpoint: str, text: str = "Say hello.", **extra) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0, **extra}
    response = httpx.post(f"{endpoint}/chat/completions", json=body, headers=auth_headers(endpoint), timeout=120)
    response.raise_for_status()
    return response.json()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.2)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_server_outlives_the_process_that_started_it_and_serves_the_next(servers, tmp_path):
    starter = ask_in_another_process(tmp_path)
    started = json.loads(starter.stdout.readline())
    assert starter.wait(30) == 0  # the process that started it has exited
    (record,) = servers.running()
    assert record.server_pid == started["pids"][0] and record.model == SMOL.name and record.slots == 2
    assert servers.endpoint(SMOL, slots=2) == started["endpoint"]  # reused, not restarted
    assert chat(started["endpoint"])["usage"]["completion_tokens"] > 1
    assert [r.server_pid for r in servers.running()] == started["pids"]


def test_two_processes_asking_for_a_cold_model_at_once_start_one_server(servers, tmp_path):
    askers = [ask_in_another_process(tmp_path) for _ in range(2)]
    answers = [json.loads(p.stdout.readline()) for p in askers]
    assert [p.wait(30) for p in askers] == [0, 0]
    assert answers[0]["endpoint"] == answers[1]["endpoint"]
    assert len(servers.running()) == 1
    assert (
        len(
            [
                p
                for p in psutil.process_iter(["name"])
                if p.info["name"] == "llama-server" and p.pid == servers.running()[0].server_pid
            ]
        )
        == 1
    )


def test_a_server_that_died_is_noticed_and_replaced(servers):
    endpoint = servers.endpoint(SMOL, slots=2)
    (first,) = servers.running()
    os.kill(first.server_pid, signal.SIGKILL)  # llama-server crashes
    wait_for(lambda: gone(first.pid), 10, "its supervisor noticed and exited")
    assert read_record(servers.dir / f"{first.key}.json") is None  # the record went with it
    replacement = servers.endpoint(SMOL, slots=2)
    (second,) = servers.running()
    assert second.server_pid != first.server_pid and replacement != endpoint
    assert chat(replacement)["usage"]["completion_tokens"] > 1

    os.kill(second.pid, signal.SIGKILL)  # the supervisor dies: its llama-server goes with it
    wait_for(lambda: gone(second.server_pid), 10, "llama-server died with its supervisor")
    assert servers.running() == []
    servers.endpoint(SMOL, slots=2)
    assert servers.running()[0].server_pid not in (first.server_pid, second.server_pid)


def test_an_idle_server_stops_and_a_busy_one_does_not(tmp_path, llama_server):
    servers = ModelServers(tmp_path, idle_s=2.0)
    try:
        endpoint = servers.endpoint(SMOL)
        (record,) = servers.running()
        # one request that decodes for longer than the idle time: the server must not stop under it
        started = time.monotonic()
        out = chat(endpoint, "Count from one to one hundred.", max_tokens=300, ignore_eos=True)
        assert out["usage"]["completion_tokens"] == 300 and time.monotonic() - started > 2.0
        assert servers.running() == [record]
        wait_for(lambda: servers.running() == [], 15, "the idle server stopped")
        wait_for(lambda: gone(record.server_pid) and gone(record.pid), 10, "its processes exited")
    finally:
        servers.stop_all()


def test_a_model_server_wants_its_key_and_serves_no_slots(servers, tmp_path):
    """Anyone on the machine reaches loopback: without the state folder's key a call is refused
    (401), `/slots` (the prompts in flight) is not served even with it, and the key stays in its
    0600 file: not on a command line, in the record, the log, a repr or the endpoint."""
    endpoint = servers.endpoint(SMOL, slots=2)
    base = endpoint.removesuffix("/v1")
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    assert httpx.post(f"{endpoint}/chat/completions", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.post(f"{endpoint}/chat/completions", json=body, headers=wrong, timeout=60).status_code == 401
    assert httpx.get(f"{base}/slots", timeout=10).status_code == 401
    assert httpx.get(f"{base}/slots", headers=auth_headers(endpoint), timeout=10).status_code in (404, 501)
    assert httpx.get(f"{endpoint}/models", headers=auth_headers(endpoint), timeout=10).status_code == 200
    assert chat(endpoint)["usage"]["completion_tokens"] > 1  # with the key

    key = servers.api_key.get_secret_value()
    assert (servers.dir / API_KEY_FILE).stat().st_mode & 0o777 == 0o600
    (record,) = servers.running()
    seen = [
        endpoint,
        repr(servers.api_key),
        repr(record),
        (servers.dir / f"{record.key}.json").read_text(),
        (tmp_path / "logs" / f"model-{SMOL.name}.log").read_text(),
        *(" ".join(psutil.Process(pid).cmdline()) for pid in (record.pid, record.server_pid)),
    ]
    assert not [s for s in seen if key in s]
    assert auth_headers("http://127.0.0.1:9/v1") == {}  # another address on loopback gets no key


def test_the_api_key_is_made_once_private_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "servers" / API_KEY_FILE
    key = ensure_api_key(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(key.get_secret_value()) >= 32
    assert ensure_api_key(path) == key  # the same on every later use
    assert key.get_secret_value() not in repr(key) + str(key)
    path.chmod(0o644)
    with pytest.raises(ServiceError, match=r"open to other users \(mode 644\)"):
        ensure_api_key(path)


def test_the_build_smoke_check_answers_and_refuses_a_call_without_the_key(llama_server, tmp_path):
    answer = check_build(llama_server, gguf_path(SMOL.serving, tmp_path / "models"))
    assert answer.strip()


def test_server_status_lists_model_servers_and_server_stop_stops_them(servers, tmp_path):
    servers.endpoint(SMOL, slots=2)
    (record,) = servers.running()
    env = {**os.environ, "HOMESKILLET_HOME": str(tmp_path)}
    cli = [sys.executable, "-m", "apps.cli"]
    status = subprocess.run([*cli, "server", "status", "--json"], env=env, capture_output=True, text=True)
    assert status.returncode == 1  # no Prefect server in this state folder
    (listed,) = json.loads(status.stdout)["model_servers"]
    assert listed["model"] == SMOL.name and listed["pid"] == record.server_pid and listed["port"] == record.port
    assert listed["idle_s"] >= 0 and listed["slots"] == 2
    stop = subprocess.run([*cli, "server", "stop"], env=env, capture_output=True, text=True)
    assert stop.returncode == 0 and SMOL.name in stop.stdout
    assert servers.running() == [] and gone(record.server_pid) and gone(record.pid)


def test_threads_are_shared_out_among_local_models_and_slots_follow_pool_capacity():
    catalog = load_catalog(PACKAGED_CATALOG)
    assert (
        threads_for(catalog.models, cores=2) == 1
    )  # SmolLM2 and Gemma decode at once without spinning over each other
    assert threads_for(catalog.models, cores=16) == 8
    remote = catalog.models[0].model_copy(update={"serving": OpenAIServing(base_url="http://x/v1", model="m")})
    assert threads_for([catalog.models[1], remote], cores=4) == 4  # remote models use no local cores
    local_pools = [p for p in catalog.pools if p.backend == "local"]
    # dedicated 8 TFLOPS / 4 GB and preemptible 4 / 2 hold 8 + 4 SmolLM2 slices (1 / 0.5) and 4 + 2 Gemma ones (2 / 0.75)
    assert slots_for(SMOL, local_pools) == 12
    assert slots_for(cat.model(catalog, "gemma3-270m"), local_pools) == 6
    tiny = local_pools[0].model_copy(update={"tflops": 0.5})
    assert slots_for(SMOL, [tiny]) == 1


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_the_llama_server_build_uses_no_instruction_beyond_avx2(llama_server):
    """The set-up's build runs on any x86-64 CPU with AVX2: no AMX (crashed on CPUs with it), no
    AVX-512 (illegal instruction on CPUs without it), whatever CPU built it."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(llama_server)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    beyond = re.findall(r"\b(?:ldtilecfg|tdpb\w+|tileloadd\w*|tilestored)\b|%zmm\d+|\{%k[1-7]\}", listing.stdout)
    assert beyond == [], sorted(set(beyond))[:10]
    assert "%ymm" in listing.stdout  # and it does use AVX2
