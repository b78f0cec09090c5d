"""`homeskillet loadtest`: many requests from several tenants at once through the real flow, with
the guarantees checked while it runs.

Requests go through `fuse_request` in this process (its own Prefect flow runs, the real ledger and
backends), at most `concurrency` at a time and no more of a tenant's than its covenant's
max_concurrent_requests, tenants taking turns. A sampler reads the ledger every
`sample_s` and checks, at each moment:
- capacity: no pool's active slices add up to more than the pool holds;
- isolation: every active allocation belongs to the tenant whose request made it;
- hosted·ai: no tenant holds two live subscriptions in the same hosted·ai pool.
Afterwards no allocation of the run may be left. With `--backend hostedai` the run starts the
hosted·ai emulator in this process (with `--faults`), gives each tenant the emulator's team
credentials, and retires every subscription at the end. With `--backend replay` the models are
RouterBench recordings served on loopback (`flows.eval_routing.replay_load`): no model compute,
so the figures are the orchestration's own ceiling.

With `via="api"` the requests go through `POST /v1/chat/completions` of the API server
(`apps.mcp_server.create_app`), started in this process on loopback, each tenant with a token
created for the run and revoked after it. They are streamed, so that the request id (the
`x-homeskillet-request-id` header, sent with the first text) is known while the request still
holds its slices, and the sampler checks those too. The API carries the prompt and `max_tokens`
only, so `via="api"` runs on the local backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flows.clients import lend_clients
from flows.eval_routing import replay_load
from flows.fusion import fuse_request
from homeskillet.errors import HomeskilletError, InvalidRequest
from homeskillet.schemas import EPS
from homeskillet.settings import get_settings
from tasks import runtime

log = logging.getLogger(__name__)
BACKENDS = ("local", "hostedai", "replay")
VIAS = ("flow", "api")
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "1. What is the capital of Japan?\n2. Write one sentence about autumn.",
    "Who wrote Romeo and Juliet? What is 12 times 12?",
    "Write a haiku about the sea.",
]


@dataclass
class Run:
    tenant_of: dict[str, str] = field(default_factory=dict)  # request id → tenant
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    capacity_violations: list[str] = field(default_factory=list)
    cross_tenant: list[str] = field(default_factory=list)
    duplicate_subscriptions: list[str] = field(default_factory=list)
    samples: int = 0


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile by rank (a latency that was seen, not an interpolation)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


async def run_load(
    requests: int,
    concurrency: int,
    tenants: int,
    backend: str = "local",
    faults: str = "",
    max_tokens: int = 16,
    sample_s: float = 0.2,
    emulator_state=None,
    recordings: Path | None = None,
    via: str = "flow",
) -> dict:
    """Run the load and return the figures (see `summary`). With backend hostedai it starts its own
    emulator, unless given the state of one that the tenants' credentials already point to; with
    backend replay it serves the recordings (a RouterBench file) as the models. `via`: "flow"
    (`fuse_request` in this process) or "api" (the API server, in this process on loopback)."""
    if requests < 1 or concurrency < 1 or tenants < 1:
        raise InvalidRequest("requests, concurrency and tenants must each be at least 1")
    if backend not in BACKENDS:
        raise InvalidRequest(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if via not in VIAS:
        raise InvalidRequest(f"unknown way in {via!r}; known: {', '.join(VIAS)}")
    if via == "api" and backend != "local":
        raise InvalidRequest(
            f"--via api runs on the local backend: the API carries the prompt and max_tokens, not "
            f"--backend {backend}'s constraints"
        )
    if (backend == "replay") != (recordings is not None):
        raise InvalidRequest("--backend replay takes --recordings FILE (a RouterBench file), and only it does")
    serving = contextlib.nullcontext()
    if backend == "replay":
        names = [f"tenant-{i + 1}" for i in range(tenants)]
        serving = replay_load(recordings, names, get_settings().home / "loadtest-replay")
    with serving as replay:
        return await _load(
            requests, concurrency, tenants, backend, faults, max_tokens, sample_s, emulator_state, replay, via
        )


async def _load(
    requests, concurrency, tenants, backend, faults, max_tokens, sample_s, emulator_state, replay, via
) -> dict:
    services = runtime.services(replay.catalog_path if replay else None)
    names = [t.id for t in services.catalog.tenants]
    if tenants > len(names):
        raise InvalidRequest(f"--tenants {tenants}: the catalog has {len(names)} tenants ({', '.join(names)})")
    names = names[:tenants]
    if faults and (backend != "hostedai" or emulator_state is not None):
        raise InvalidRequest("--faults needs --backend hostedai (they are the faults of the emulator it starts)")
    emulator = None
    if backend == "hostedai":
        emulator = await start_emulator(faults, names) if emulator_state is None else _Emulator(emulator_state, [])
    run = Run()
    stop = asyncio.Event()
    gate = asyncio.Semaphore(concurrency)
    # a client that honours each tenant's covenant cap: a request the cap would refuse waits here,
    # so the figures count what the orchestrator got wrong, not the covenant doing its job
    caps = {t: services.covenant(t).max_concurrent_requests for t in names}
    own = {t: asyncio.Semaphore(cap) if cap else contextlib.nullcontext() for t, cap in caps.items()}

    def arguments(i: int) -> dict:
        if replay is not None:
            asked = replay.request(i, max_tokens)
            asked["constraints"]["capacity_wait_s"] = 60
            return asked
        constraints = {"max_tokens": max_tokens, "backend": backend, "capacity_wait_s": 60}
        return {"prompt": PROMPTS[i % len(PROMPTS)], "constraints": constraints}

    async def one(i: int) -> None:
        tenant = names[i % len(names)]
        async with own[tenant], gate:
            if via == "api":
                return await through_api(i, tenant)
            request_id = f"load-{i}-{time.monotonic_ns() % 10**9}"
            run.tenant_of[request_id] = tenant
            started = time.perf_counter()
            try:
                result = await fuse_request(tenant=tenant, request_id=request_id, **arguments(i))
            except HomeskilletError as exc:
                run.errors[type(exc).__name__] += 1
                return
            except Exception as exc:  # anything else is a bug the figures must show, not hide
                log.exception("request %s failed unexpectedly", request_id)
                run.errors[f"unexpected {type(exc).__name__}"] += 1
                return
            run.latencies.append(time.perf_counter() - started)
            if result.tenant != tenant:
                run.cross_tenant.append(f"request {request_id} of {tenant} answered as {result.tenant}")

    async def through_api(i: int, tenant: str) -> None:
        """One streamed request as the tenant's client, read to its end."""
        body = {
            "model": "homeskillet/auto",
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        started = time.perf_counter()
        headers = {"Authorization": f"Bearer {api_tokens[tenant]}"}
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                run.tenant_of[response.headers.get("x-homeskillet-request-id", "")] = tenant
                if response.status_code != 200:
                    error = json.loads(await response.aread()).get("error", {})
                    run.errors[f"HTTP {response.status_code} {error.get('code') or error.get('type')}"] += 1
                    return
                problem = await streamed_problem(response.aiter_lines())
        except httpx.HTTPError as exc:
            problem = f"unexpected {type(exc).__name__}"
        if problem:
            run.errors[problem] += 1
            return
        run.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        await lend_clients()
        async with contextlib.AsyncExitStack() as api:
            if via == "api":
                url, api_tokens = await api.enter_async_context(api_server(names, str(services.catalog_path)))
                http = await api.enter_async_context(httpx.AsyncClient(base_url=url, timeout=600))
            sampler = asyncio.create_task(_sample(services, run, emulator, stop, sample_s))
            try:
                await asyncio.gather(*(one(i) for i in range(requests)))
            finally:
                stop.set()
                await sampler
        wall = time.perf_counter() - started
        leaked = [a for a in await services.held() if a.request_id in run.tenant_of]
        for allocation in leaked:  # reported, then cleaned up so that the next run starts clean
            await services.backend_of(allocation).release(allocation.allocation_id, allocation.tenant)
    finally:
        await services.shutdown()
        if emulator is not None:
            await emulator.stop()
    return {
        "requests": requests,
        "ok": len(run.latencies),
        "errors": dict(run.errors),
        "rps": round(requests / wall, 2),
        "latency_s": {
            "p50": quantile(run.latencies, 0.5),
            "p95": quantile(run.latencies, 0.95),
            "p99": quantile(run.latencies, 0.99),
        },
        "leaked_allocations": len(leaked),
        "capacity_violations": len(run.capacity_violations),
        "cross_tenant": len(run.cross_tenant),
        "duplicate_subscriptions": len(run.duplicate_subscriptions),
        "backend": backend,
        "via": via,
        "concurrency": concurrency,
        "tenants": names,
        "samples": run.samples,
        "wall_s": round(wall, 2),
        "faults_fired": emulator.fired() if emulator is not None else {},
        "examples": (run.capacity_violations + run.cross_tenant + run.duplicate_subscriptions)[:5],
    }


async def streamed_problem(lines: AsyncIterator[str]) -> str | None:
    """Why a streamed answer failed (its error event, no text, or no `[DONE]`), or None."""
    text = ""
    async for line in lines:
        data = sse_data(line)
        if data == "[DONE]":
            return None if text.strip() else "empty answer"
        if isinstance(data, dict):
            if "error" in data:
                return f"stream error {data['error'].get('type')}"
            text += chunk_text(data)
    return "stream ended before [DONE]"


def sse_data(line: str) -> dict | str | None:
    """A Server-Sent Events line's data: the JSON object, "[DONE]", or None for any other line."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return data if data == "[DONE]" else json.loads(data)


def chunk_text(chunk: dict) -> str:
    """The content a `chat.completion.chunk` adds ("" for the role, the last and the usage chunk)."""
    return "".join(choice.get("delta", {}).get("content") or "" for choice in chunk.get("choices", []))


@contextlib.asynccontextmanager
async def api_server(tenants: list[str], catalog_path: str | None = None) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """The API server (every surface, as `homeskillet serve`) on a loopback port in a thread of
    this process, and a token per tenant: (base URL, tenant → token). The tokens are revoked on
    the way out, whatever happened."""
    from apps.mcp_server import create_app
    from connectors.processes import serve_in_thread
    from connectors.tokens import TokenStore

    store = await TokenStore.open(get_settings().pgdata)
    made: list[str] = []
    serving = contextlib.ExitStack()
    try:
        tokens = {}
        for tenant in tenants:
            token_id, tokens[tenant] = await store.create(tenant)
            made.append(token_id)
        url = await asyncio.to_thread(serving.enter_context, serve_in_thread(create_app(catalog_path), "API server"))
        yield url, tokens
    finally:
        await asyncio.to_thread(serving.close)
        for token_id in made:
            await store.revoke(token_id)
        await store.close()


async def _sample(services, run: Run, emulator, stop: asyncio.Event, every_s: float) -> None:
    """Check the invariants on what the ledger (and the emulator) hold, until stopped."""
    ledger = await services.local.ledger()
    while not stop.is_set():
        capacity = await ledger.capacities()
        held = await services.held()
        used: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        for a in held:
            used[a.pool][0] += a.tflops
            used[a.pool][1] += a.vram_gb
            owner = run.tenant_of.get(a.request_id)
            if owner is not None and owner != a.tenant:
                run.cross_tenant.append(f"{a.allocation_id} of request {a.request_id} ({owner}) held by {a.tenant}")
        for pool, (tflops, vram) in used.items():
            cap = capacity.get(pool)
            if cap is not None and (tflops > cap[0] + EPS or vram > cap[1] + EPS):
                run.capacity_violations.append(
                    f"{pool}: {tflops:g} TFLOPS / {vram:g} GB held of {cap[0]:g} / {cap[1]:g}"
                )
        if emulator is not None:
            run.duplicate_subscriptions += emulator.duplicates()
        run.samples += 1
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


class _Emulator:
    """The hosted·ai emulator on a loopback port, in a thread of this process."""

    def __init__(self, state, tenants: list[str], serving: contextlib.ExitStack | None = None):
        self.state, self.tenants, self.serving = state, tenants, serving

    def duplicates(self) -> list[str]:
        live = collections.Counter(
            (s.team_id, s.pool_id) for s in list(self.state.subs.values()) if s.unsubscribed is None
        )
        return [f"team {team} holds {n} live subscriptions in pool {pool}" for (team, pool), n in live.items() if n > 1]

    def fired(self) -> dict:
        return dict(getattr(self.state, "fired", {}) or {})

    async def stop(self) -> None:
        """Take back the credentials the run lent, and stop the emulator (if the run started it)."""
        from tasks.credentials import delete_hostedai_credentials

        for tenant in self.tenants:
            await delete_hostedai_credentials(tenant)
        if self.serving is not None:
            await asyncio.to_thread(self.serving.close)


async def start_emulator(faults: str, tenants: list[str]) -> _Emulator:
    """The hosted·ai emulator on loopback, each tenant lent its team as its Secret block for the
    run (the load test's, the isolation report's); refused where a tenant has credentials already."""
    from connectors.processes import serve_in_thread
    from doubles.hostedai_emulator import Faults, create_app, default_config
    from homeskillet.schemas import HostedAICredentials
    from tasks.credentials import block_name, has_credentials_block, save_hostedai_credentials

    try:
        config = default_config().model_copy(update={"faults": Faults.parse(faults)})
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    for tenant in tenants:  # the run lends each tenant the emulator's team: never over real credentials
        if await has_credentials_block(tenant):
            raise InvalidRequest(
                f"tenant {tenant!r} already has hosted·ai credentials (Secret block {block_name(tenant)!r}); "
                "lending it the emulator's team would replace them: run this with its own HOMESKILLET_HOME (and HOMESKILLET_PREFECT_PORT)"
            )
    app = create_app(config)
    serving = contextlib.ExitStack()
    url = await asyncio.to_thread(serving.enter_context, serve_in_thread(app, "hosted·ai emulator"))
    teams = {team.name: team for team in config.teams}
    lent = _Emulator(app.state.emulator, [], serving)
    try:
        for tenant in tenants:
            if tenant not in teams:
                raise InvalidRequest(f"the emulator has no team for tenant {tenant!r}")
            team = teams[tenant]
            credentials = HostedAICredentials(url=url, api_key=team.api_key, team_id=team.id)
            await save_hostedai_credentials(tenant, credentials)
            lent.tenants.append(tenant)
    except BaseException:
        await lent.stop()  # what was lent so far, and the emulator
        raise
    return lent


def report(figures: dict) -> str:
    lat = figures["latency_s"]
    lines = [
        f"{figures['requests']} requests, {figures['concurrency']} at once, tenants {', '.join(figures['tenants'])}, "
        f"backend {figures['backend']}, via {figures['via']}: {figures['ok']} answered in {figures['wall_s']:.1f}s ({figures['rps']} req/s)",
        f"latency p50 {lat['p50']}s  p95 {lat['p95']}s  p99 {lat['p99']}s",
        f"errors: {figures['errors'] or 'none'}",
        f"invariants over {figures['samples']} samples: leaked {figures['leaked_allocations']}, capacity violations "
        f"{figures['capacity_violations']}, cross-tenant {figures['cross_tenant']}, duplicate subscriptions "
        f"{figures['duplicate_subscriptions']}",
    ]
    if figures["faults_fired"]:
        lines.append(f"emulator faults fired: {figures['faults_fired']}")
    lines += [f"  e.g. {example}" for example in figures["examples"]]
    return "\n".join(lines)


def summary(figures: dict) -> str:
    """The one JSON line `--json` ends with."""
    keys = (
        "requests",
        "ok",
        "errors",
        "rps",
        "latency_s",
        "leaked_allocations",
        "capacity_violations",
        "cross_tenant",
        "duplicate_subscriptions",
    )
    return json.dumps({k: figures[k] for k in keys})


def violated(figures: dict) -> bool:
    return any(
        figures[k] for k in ("leaked_allocations", "capacity_violations", "cross_tenant", "duplicate_subscriptions")
    )
