"""End to end with real processes, as Prefect users run it: a process work pool, `prefect deploy`,
a worker, and runs started through the REST API and through run_deployment."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from connectors.ledger import new_allocation_id
from connectors.processes import terminate
from connectors.telemetry import read_records
from homeskillet.settings import RECORDINGS as ROUTERBENCH
from homeskillet.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
RECORDINGS = ROUTERBENCH / "arc_challenge_train.csv"
BIN = Path(sys.executable).parent
API = os.environ["PREFECT_API_URL"]
pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")


def prefect(*args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    prefect("work-pool", "create", "homeskillet-process", "--type", "process", "--overwrite")
    prefect("deploy", "-n", "fuse-request", "-n", "benchmark", "-n", "cost-report", HOMESKILLET_CHECKOUT=str(ROOT))
    log = open(tmp_path_factory.mktemp("worker") / "worker.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "homeskillet-process", "--limit", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
        env=os.environ | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"},
    )
    yield proc
    terminate(proc.pid, grace_s=20, group=True)  # a run still in it is killed with it; leases end it


async def start_via_rest(name: str, parameters: dict) -> str:
    async with httpx.AsyncClient(base_url=API, timeout=30) as api:
        deployment = (await api.get(f"/deployments/name/{name}")).raise_for_status().json()
        run = await api.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})
        return run.raise_for_status().json()["id"]


async def wait_done(flow_run_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=API, timeout=30) as api:
        while time.monotonic() < deadline:
            run = (await api.get(f"/flow_runs/{flow_run_id}")).raise_for_status().json()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            await asyncio.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout_s}s")


async def result_of(flow_run_id: str):
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
    return await run.state.aresult()


async def artifacts_of(flow_run_id: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=API) as api:
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 50}
        return (await api.post("/artifacts/filter", json=body)).raise_for_status().json()


async def test_fuse_request_started_through_the_rest_api(worker):
    run_id = await start_via_rest(
        "fuse-request/fuse-request",
        {"prompt": "1. Who wrote Hamlet?\n2. Name a planet.", "tenant": "acme", "constraints": {"max_tokens": 16}},
    )
    run = await wait_done(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    result = await result_of(run_id)
    assert len(result.fragments) == 2 and result.answer.startswith("1. Who wrote Hamlet?")
    assert {a["key"] for a in await artifacts_of(run_id)} >= {"fragments"}
    records = read_records(get_settings().telemetry)
    assert sorted(records[records.request_id == result.request_id].allocation_id) == sorted(
        f.allocation_id for f in result.fragments
    )


async def test_fuse_request_started_with_run_deployment(worker):
    flow_run = await run_deployment(
        "fuse-request/fuse-request",
        parameters={"prompt": "What is the capital of France?", "tenant": "globex", "constraints": {"max_tokens": 8}},
        timeout=300,
    )
    assert flow_run.state.is_completed(), flow_run.state
    result = await flow_run.state.aresult()
    assert "paris" in result.answer.lower()


@pytest.mark.usefixtures("routing_measurements_restored")
async def test_benchmark_and_cost_report_deployments(worker):
    bench_id = await start_via_rest(
        "benchmark/benchmark", {"models": ["smollm2-135m"], "repetitions": 1, "concurrency": [1], "max_tokens": 8}
    )
    assert (await wait_done(bench_id))["state"]["type"] == "COMPLETED"
    bench = await result_of(bench_id)
    assert Path(bench["chart"]).exists() and Path(bench["parquet"]).exists()
    assert {"benchmark", "benchmark-files"} <= {a["key"] for a in await artifacts_of(bench_id)}

    report_id = await start_via_rest("cost-report/cost-report", {"since_days": 1})
    assert (await wait_done(report_id))["state"]["type"] == "COMPLETED"
    path = await result_of(report_id)
    assert "smollm2-135m" in Path(path).read_text()
    assert "cost-report" in {a["key"] for a in await artifacts_of(report_id)}


def _kill_tree(pid: int) -> None:
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _start_worker(pool: str, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"],
        stdout=open(log_path, "a"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
        env=os.environ | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"},
    )


async def test_a_worker_killed_mid_flow_crashes_its_run_ends_its_leases_and_a_resubmitted_run_completes(
    worker, test_catalog, monkeypatch, tmp_path
):
    """SIGKILL to a process worker and its flow run while two fragments hold slices: the holder
    check ends the leases at once, the server's heartbeat automation marks the run Crashed, and
    the same request submitted again completes."""
    import uuid

    from tasks import runtime

    pool = "homeskillet-crash-test"
    prefect("work-pool", "create", pool, "--type", "process", "--overwrite")
    async with httpx.AsyncClient(base_url=API, timeout=30) as api:
        source = (await api.get("/deployments/name/fuse-request/fuse-request")).raise_for_status().json()
        keep = ("flow_id", "entrypoint", "path", "pull_steps", "job_variables", "parameter_openapi_schema")
        body = {k: source[k] for k in keep} | {"name": "fuse-request-crash-test", "work_pool_name": pool}
        deployment_id = (await api.post("/deployments/", json=body)).raise_for_status().json()["id"]

        async def submit(request_id: str) -> str:
            parameters = {
                "prompt": "1. Say one.\n2. Say two.",
                "tenant": "acme",
                "request_id": request_id,
                "catalog_path": test_catalog,
                "constraints": {"allowed_models": ["echo"], "pool": "roomy"},
            }
            run = await api.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
            return run.raise_for_status().json()["id"]

        monkeypatch.setenv("ECHO_DELAY_S", "600")  # the echo double answers only after the kill
        request_id = "crash-" + uuid.uuid4().hex[:8]
        doomed = _start_worker(pool, tmp_path / "worker-1.log")
        run_id = await submit(request_id)
        local = runtime.backend(test_catalog)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if len([a for a in await local.held("acme") if a.request_id == request_id]) == 2:
                break
            await asyncio.sleep(0.5)
        else:
            _kill_tree(doomed.pid)
            raise AssertionError(
                "the run never held its two slices; worker log:\n" + (tmp_path / "worker-1.log").read_text()[-3000:]
            )
        _kill_tree(doomed.pid)  # the worker and the flow run's process, without a chance to clean up

        assert [a for a in await local.held("acme") if a.request_id == request_id] == []  # their holder is gone
        crashed = await wait_done(run_id, timeout_s=300)
        assert crashed["state"]["type"] == "CRASHED", crashed["state"]
        assert "No heartbeat" in (crashed["state"]["message"] or "")

        monkeypatch.setenv("ECHO_DELAY_S", "0")
        again = _start_worker(pool, tmp_path / "worker-2.log")
        try:
            done = await wait_done(await submit(request_id), timeout_s=300)
        finally:
            _kill_tree(again.pid)
        assert done["state"]["type"] == "COMPLETED", done["state"]


async def _held_by(backend, request_id: str, count: int, flow_run_id: str, timeout_s: float = 180) -> list:
    """The request's allocations once it holds `count` (its run is mid-inference)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = [a for a in await backend.held("acme") if a.request_id == request_id]
        if len(held) == count:
            return held
        await asyncio.sleep(0.5)
    raise AssertionError(f"run {flow_run_id} never held {count} slices: {(await wait_done(flow_run_id, 1))['state']}")


async def test_a_run_cancelled_through_the_api_mid_inference_releases_its_slices(
    worker, test_catalog, ended_as, monkeypatch
):
    """Cancel, as the UI does, a deployment run whose two fragments hold slices: the worker stops
    its process, the rollback hooks release both slices, the run ends Cancelled and the pool is
    whole again."""
    import uuid

    from prefect.states import Cancelling

    from homeskillet import catalog as cat
    from tasks import runtime

    monkeypatch.setenv("ECHO_DELAY_S", "600")  # the echo double answers only after the cancellation
    request_id = "cancel-" + uuid.uuid4().hex[:8]
    run_id = await start_via_rest(
        "fuse-request/fuse-request",
        {
            "prompt": "1. Say one.\n2. Say two.",
            "tenant": "acme",
            "request_id": request_id,
            "catalog_path": test_catalog,
            "constraints": {"allowed_models": ["echo"], "pool": "roomy"},
        },
    )
    backend = runtime.backend(test_catalog)
    held = await _held_by(backend, request_id, 2, run_id)
    async with get_client() as client:
        await client.set_flow_run_state(run_id, Cancelling())
    run = await wait_done(run_id, timeout_s=120)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert await ended_as([a.allocation_id for a in held]) == {"released"}  # by its rollback hooks
    roomy = cat.pool(runtime.catalog(test_catalog), "roomy")
    ledger = await backend.ledger()
    whole = await ledger.reserve(  # the pool's whole capacity, at once
        allocation_id=new_allocation_id(),
        tenant="acme",
        request_id=request_id,
        pool=roomy.id,
        model="echo",
        tflops=roomy.tflops,
        vram_gb=roomy.vram_gb,
        wait_s=0,
    )
    await ledger.release(whole.allocation_id, "acme")


@pytest.mark.parametrize("recordings", [None, RECORDINGS], ids=["local", "replay"])
async def test_the_workers_benchmark_completes_its_runs_and_reports_figures(worker, tmp_path, recordings):
    from apps.scaling import run_scaling

    (row,) = await run_scaling(API, [1], requests=2, limit=2, max_tokens=4, log_dir=tmp_path, recordings=recordings)
    assert (row["workers"], row["requests"], row["completed"]) == (1, 2, 2)
    assert row["answers"] == ("replay" if recordings else "local")
    assert row["rps"] > 0 and 0 < row["latency_p50_s"] <= row["latency_p95_s"] <= row["wall_s"] + 1


async def test_a_deployment_run_on_hostedai_retires_its_subscription_when_it_ends(worker, hostedai_tenants):
    """A worker's run is its own process: what it subscribed to must not outlive it, even with an
    idle period that would keep it for a next request in a long-lived process."""
    async with httpx.AsyncClient(base_url=API, timeout=30) as api:
        deployment = (await api.get("/deployments/name/fuse-request/fuse-request")).raise_for_status().json()
        run = await api.post(
            f"/deployments/{deployment['id']}/create_flow_run",
            json={
                "parameters": {
                    "prompt": "What is the capital of France?",
                    "tenant": "globex",
                    "constraints": {"backend": "hostedai", "max_tokens": 8},
                },
                "job_variables": {"env": {"HOMESKILLET_HOSTEDAI_IDLE_S": "60"}},
            },
        )
        run_id = run.raise_for_status().json()["id"]
    run = await wait_done(run_id)
    assert run["state"]["type"] == "COMPLETED", run["state"]["message"]
    assert (await result_of(run_id)).fragments[0].backend == "hostedai"
    team = hostedai_tenants.teams["globex"].id
    assert [s for s in hostedai_tenants.state.subs.values() if s.team_id == team and s.unsubscribed is None] == []
