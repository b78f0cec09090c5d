"""`homeskillet bench-workers`: requests per second through Prefect deployments with 1, 2, 4…
process workers, the way production runs requests (a worker process starts each flow run in its
own Python process).

It registers the fuse-request deployment of this checkout on a work pool of its own, starts K
workers for each K, submits N runs through the REST API at once, and times them to their last
final state. Figures per K: requests/s, median and p95 seconds from submission to completion, and
how many completed. The ceiling it finds is the machine's: each flow run is a new Python process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from connectors.processes import terminate
from flows.eval_routing import replay_load
from homeskillet.errors import InvalidRequest, ServiceError

POOL = "homeskillet-scaling"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
CHECKOUT = Path(__file__).resolve().parents[1]
REPLAY_TENANT = "demo"


async def _deployment(api: httpx.AsyncClient) -> str:
    """A fuse-request deployment of this checkout on the scaling pool (made or updated)."""
    await api.post("/work_pools/", json={"name": POOL, "type": "process"})  # 409 when it exists: fine
    flow = (await api.post("/flows/", json={"name": "fuse-request"})).raise_for_status().json()
    body = {
        "name": "scaling",
        "flow_id": flow["id"],
        "entrypoint": "flows/fusion.py:fuse_request",
        "work_pool_name": POOL,
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(CHECKOUT)}}],
        "job_variables": {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}},
    }
    return (await api.post("/deployments/", json=body)).raise_for_status().json()["id"]


def _workers(count: int, limit: int, log_dir: Path) -> list[subprocess.Popen]:
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    return [
        subprocess.Popen(
            [prefect, "worker", "start", "--pool", POOL, "--limit", str(limit)],
            stdout=open(log_dir / f"worker-{i}.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=CHECKOUT,
        )
        for i in range(count)
    ]


def _parameters(i: int, max_tokens: int, replay) -> dict:
    """The i-th run's parameters: one factual question for the local models, or the i-th record."""
    if replay is not None:
        return {"tenant": REPLAY_TENANT, **replay.request(i, max_tokens)}
    return {
        "prompt": "What is the capital of France?",
        "tenant": "demo",
        "constraints": {"max_tokens": max_tokens, "split": False, "task_type": "factual_qa"},
    }


async def _round(api: httpx.AsyncClient, deployment_id: str, requests: int, max_tokens: int, replay=None) -> dict:
    submitted: dict[str, float] = {}
    for i in range(requests):
        parameters = _parameters(i, max_tokens, replay)
        run = await api.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters})
        submitted[run.raise_for_status().json()["id"]] = time.perf_counter()
    started = min(submitted.values())
    finished: dict[str, tuple[str, float]] = {}
    while len(finished) < len(submitted):
        body = {"flow_runs": {"id": {"any_": [r for r in submitted if r not in finished]}}}
        for run in (await api.post("/flow_runs/filter", json=body)).raise_for_status().json():
            if run["state"]["type"] in FINAL:
                finished[run["id"]] = (run["state"]["type"], time.perf_counter())
        await asyncio.sleep(0.5)
    wall = max(t for _, t in finished.values()) - started
    latencies = sorted(t - submitted[r] for r, (_, t) in finished.items())
    return {
        "completed": sum(state == "COMPLETED" for state, _ in finished.values()),
        "rps": round(requests / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        "wall_s": round(wall, 1),
    }


async def run_scaling(
    api_url: str,
    workers: list[int],
    requests: int,
    limit: int,
    max_tokens: int,
    log_dir: Path,
    recordings: Path | None = None,
) -> list[dict]:
    """One row per worker count; with `recordings`, the runs answer from them (served here, on
    loopback, for the workers' flow runs to reach): the orchestration's own ceiling."""
    if not workers or min(workers) < 1 or requests < 1 or limit < 1:
        raise InvalidRequest("workers, requests and limit must be at least 1")
    log_dir.mkdir(parents=True, exist_ok=True)
    serving = replay_load(recordings, [REPLAY_TENANT], log_dir / "replay") if recordings else contextlib.nullcontext()
    with serving as replay:
        return await _rows(api_url, workers, requests, limit, max_tokens, log_dir, replay)


async def _rows(api_url, workers, requests, limit, max_tokens, log_dir, replay) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as api:
        deployment_id = await _deployment(api)
        for count in workers:
            procs = _workers(count, limit, log_dir)
            try:
                await asyncio.sleep(3)  # the workers register and start polling
                if any(p.poll() is not None for p in procs):
                    raise ServiceError(f"a worker exited at start-up; see {log_dir}")
                rows.append(
                    {
                        "workers": count,
                        "limit": limit,
                        "requests": requests,
                        "max_tokens": max_tokens,
                        "answers": "replay" if replay else "local",
                        **await _round(api, deployment_id, requests, max_tokens, replay),
                    }
                )
            finally:
                for p in procs:  # a worker and the flow runs it still runs, SIGKILLed after the grace
                    terminate(p.pid, grace_s=20, group=True)
    return rows
