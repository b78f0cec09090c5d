"""The `homeskillet` command, run as a user runs it (a separate process)."""

import asyncio
import json
import os
import signal
import subprocess
import time
from datetime import UTC, datetime

import httpx
import pytest

from homeskillet.settings import RECORDINGS
from tests.support import HOMESKILLET, free_port

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HOMESKILLET, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_run_prints_the_fusion_result_as_json():
    done = cli("run", "What is the capital of France? Write a haiku about the sea.", "--json", "--max-tokens", "32")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["fragments"]) == 2
    assert {f["model"] for f in result["fragments"]} == {"gemma3-270m", "smollm2-135m"}
    assert all(f["allocation_id"].startswith("alloc-") for f in result["fragments"])
    assert result["answer"]


def test_model_servers_outlive_a_run_and_serve_the_next():
    """A run's model servers stay up after its process exits; the next run uses the same ones."""
    question = ("What is the capital of France?", "--json", "--max-tokens", "8", "--model", "smollm2-135m")
    first = cli("run", *question)
    assert first.returncode == 0, first.stderr
    status = json.loads(cli("server", "status", "--json").stdout)
    (smol,) = [m for m in status["model_servers"] if m["model"] == "smollm2-135m"]
    second = cli("run", *question)
    assert second.returncode == 0, second.stderr
    (again,) = [
        m for m in json.loads(cli("server", "status", "--json").stdout)["model_servers"] if m["model"] == "smollm2-135m"
    ]
    assert again["pid"] == smol["pid"] and again["port"] == smol["port"]
    assert json.loads(first.stdout)["answer"] == json.loads(second.stdout)["answer"]  # same answer, same server


def test_run_prints_answer_and_fragment_table():
    done = cli("run", "1. Who wrote Hamlet?\n2. Name a planet.", "--tenant", "acme", "--max-tokens", "24")
    assert done.returncode == 0, done.stderr
    assert "1. Who wrote Hamlet?" in done.stdout
    for column in ("model", "pool", "allocation_id", "latency_s", "cost_usd"):
        assert column in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", ""), "prompt is empty"),
        (("run", "hi?", "--tenant", "nobody"), "unknown tenant 'nobody'"),
        (("run", "hi?", "--model", "gpt-9"), "unknown model 'gpt-9'"),
        (("run", "hi?", "--tier", "spot"), "constraints.tier"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(args, message):
    done = cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_allocations_lists_what_is_held():
    done = cli("allocations", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_server_status_reports_the_running_server():
    done = cli("server", "status")
    assert done.returncode == 0
    assert "prefect: running" in done.stdout and "postgres: running" in done.stdout


@pytest.fixture
def emulator_process(tmp_path):
    """`homeskillet emulator` as a user starts it, on a free port."""
    import time

    import httpx

    port = free_port()
    log = open(tmp_path / "emulator.log", "w")
    proc = subprocess.Popen([HOMESKILLET, "emulator", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(f"{url}/openapi.json", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def test_run_on_hostedai_against_a_running_emulator(emulator_process):
    import httpx

    env = os.environ | {
        "HOMESKILLET_HOSTEDAI_URL": emulator_process,
        "HOMESKILLET_HOSTEDAI_TEAM_ID": "00000000-0000-0000-0000-000000000001",
        "HOMESKILLET_HOSTEDAI_API_KEY": "hai-emulator-demo-key",
        "HOMESKILLET_HOSTEDAI_TENANT": "demo",
    }
    done = subprocess.run(
        [HOMESKILLET, "run", "--backend", "hostedai", "--json", "--max-tokens", "16", "What is the capital of France?"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "paris" in result["answer"].lower()
    assert result["fragments"][0]["backend"] == "hostedai"
    assert "hai-emulator-demo-key" not in done.stdout + done.stderr
    assert httpx.get(f"{emulator_process}/_emulator/state").json()["subscriptions"] == 0


def test_loadtest_on_recordings_prints_its_figures_and_exits_0():
    recordings = RECORDINGS / "arc_challenge_train.csv"
    done = cli(
        "loadtest",
        "--backend",
        "replay",
        "--recordings",
        str(recordings),
        "--requests",
        "3",
        "--concurrency",
        "3",
        "--tenants",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["ok"] == 3 and figures["leaked_allocations"] == 0 and figures["errors"] == {}


def test_emulator_refuses_unknown_faults():
    done = cli("emulator", "--faults", "meteor_rate=1")
    assert done.returncode == 2 and "unknown fault" in done.stderr


async def _held_by(catalog: str, tenant: str, count: int, proc: subprocess.Popen, timeout_s: float = 60) -> list:
    """The tenant's allocations once it holds `count` (the run is mid-inference)."""
    from tasks import runtime

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        held = await runtime.services(catalog).held(tenant)
        if len(held) >= count:
            return held
        await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run never held {count} allocation(s): {proc.communicate()}")


async def _runs_since(name: str, since: datetime) -> list[dict]:
    """The flow runs of that name created since then, through the REST API the UI uses."""
    body = {"flow_runs": {"name": {"any_": [name]}, "expected_start_time": {"after_": since.isoformat()}}}
    async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"], timeout=30) as api:
        return (await api.post("/flow_runs/filter", json=body)).raise_for_status().json()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_mid_inference_cancels_the_run_and_releases(signum, test_catalog, ended_as, monkeypatch):
    """SIGTERM or SIGINT while the run holds its slices: the process says so in one line and exits
    non-zero, its rollback hooks release every slice (not the ledger's dead-holder check), and the
    flow run is not left Running."""
    monkeypatch.setenv("ECHO_DELAY_S", "30")  # the echo double answers only after the signal
    since = datetime.now(UTC)
    proc = subprocess.Popen(
        [HOMESKILLET, "run", "1. Say one.\n2. Say two.", "--tenant", "acme", "--model", "echo", "--pool", "roomy"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"HOMESKILLET_CATALOG": test_catalog},
    )
    held = await _held_by(test_catalog, "acme", 2, proc)
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running 30 s after {signum.name}: {proc.communicate()}") from None
    assert proc.returncode == 128 + signum, err
    assert err.strip() == f"error: interrupted by {signum.name}: the request was cancelled"
    assert await ended_as([a.allocation_id for a in held]) == {"released"}  # by its rollback hooks
    (flow_run,) = await _runs_since("fuse-acme", since)
    assert flow_run["state"]["type"] in ("CANCELLED", "CRASHED"), flow_run["state"]


def test_bench_overhead_via_the_api_adds_its_figures_to_the_json_line_and_revokes_its_token():
    done = cli("bench-overhead", "--via", "api", "--repeats", "1", "--max-tokens", "8", "--concurrency", "2", "--json")
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"overhead_ratio", "overhead_ms_p50", "concurrent"} <= line.keys()  # the flow's figures stay
    api = line["api"]
    assert api["requests"] == 2 and api["max_tokens"] == 8
    assert api["ratio"] > 0 and api["ttft_ms_p50"] > 0 and api["direct_ttft_ms_p50"] > 0
    assert api["completion_tokens"]["api"] > 0 and api["completion_tokens"]["direct"] > 0
    cpu = api["cpu_ms_per_fragment"]
    assert cpu["flow_process"] > 0 and cpu["prefect_server"] > 0  # the Prefect server's pid was found
    assert "through the API" in done.stdout
    tokens = json.loads(cli("tokens", "list", "--tenant", "demo", "--json").stdout)
    assert tokens and all(t["revoked_at"] for t in tokens)  # the run's token lived for the run only
