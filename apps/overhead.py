"""Orchestration overhead: the same fragments through `fuse_request` and as direct llama.cpp calls.

Both sides use the same plans, the same models and pools (`tasks.routing.preview`, what the flow's
router picks), the same warm model servers and the same concurrency, so the difference is what
the flow adds: Prefect flow and task runs, the ledger's allocate and release, telemetry, artifacts.

1. Concurrency 1: multi-fragment requests one after another (a plan's independent fragments run
   at once on both sides): the wall-time ratio and the overhead per fragment.
2. Concurrency C: C single-fragment requests at once against C direct calls at once: tokens/s
   through the flow over tokens/s direct.
3. With `via="api"`: each prompt through `POST /v1/chat/completions` of the API server, started
   in this process on loopback with a token of the tenant's for the run, and then its fragments
   as direct calls (all at once) on the models the API's run routed them to; once answered whole,
   once streamed (time to first content token against the first fragment's first token direct).
   And the CPU the orchestration spends per fragment: this process's (the API server, the flow
   runs; the direct calls' own CPU taken out) and the Prefect server's, deltas over the counted
   rounds, which the machine's other work does not move the way it moves wall time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time

import httpx
import psutil

from apps.loadtest import api_server, chunk_text, sse_data
from connectors import openai_client
from connectors.prefect_server import running_server
from flows.clients import lend_clients
from flows.fusion import fuse_request
from homeskillet import catalog as cat
from homeskillet.errors import ServiceError
from homeskillet.schemas import Completion, Constraints, Fragment, Plan
from homeskillet.settings import get_settings
from tasks import runtime
from tasks.preparation import make_request, prepare
from tasks.resources import render

PROMPTS = [
    "What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea.",
    "1. What is the capital of Japan?\n2. Name three primary colors.\n3. Write one sentence about autumn.",
]
log = logging.getLogger(__name__)


class _Direct:
    """The flow's routing for a plan, and direct calls to the same warm servers."""

    def __init__(self, constraints: Constraints):
        self.services = runtime.services()
        self.constraints = constraints
        self.endpoints: dict[str, str] = {}

    async def plan(self, prompt: str, request_id: str) -> tuple[Plan, dict]:
        request = make_request(prompt, "demo", constraints=self.constraints, request_id=request_id)
        prepared = await prepare(request, self.services, log)
        for choice in prepared.choices.values():
            await self.warm(choice.model)
        return prepared.plan, prepared.choices

    async def warm(self, model_name: str) -> None:
        if model_name not in self.endpoints:
            model = cat.model(self.services.catalog, model_name)
            await self.services.local.warm_up(model)
            self.endpoints[model.name] = await asyncio.to_thread(self.services.local.model_endpoint, model)

    async def call(self, fragment: Fragment, model_name: str) -> int:
        return (await self.complete(fragment, model_name)).tokens_out

    async def complete(self, fragment: Fragment, model_name: str, stream: bool = False) -> Completion:
        model = cat.model(self.services.catalog, model_name)
        return await openai_client.complete(
            self.endpoints[model.name],
            model.name,
            max_tokens=self.constraints.max_tokens,
            stream=stream,
            **render(model, fragment.text),
        )


async def run_benchmark(repeats: int = 3, max_tokens: int = 48, concurrency: int = 8, via: str = "flow") -> dict:
    """The figures, as a dict (`report` prints them). The flow runs share one Prefect client, as
    in any long-lived process that runs requests (`flows.clients.lend_clients`). `via="api"` adds
    the API's figures (`api`)."""
    await lend_clients()
    # the dedicated pool holds a request's fragments at once: no capacity queueing in the figures
    constraints = Constraints(max_tokens=max_tokens, tier="dedicated")
    direct = _Direct(constraints)
    work = [(prompt, *await direct.plan(prompt, f"bench-{i}")) for i, prompt in enumerate(PROMPTS)]
    for plan, _ in [w[1:] for w in work]:
        assert all(not f.depends_on for f in plan.fragments), "the benchmark prompts have independent fragments"
    flow_s = direct_s = 0.0
    per_fragment_ms: list[float] = []
    for round_ in range(repeats + 1):  # round 0 warms both paths and is not counted
        for prompt, plan, choices in work:
            t0 = time.perf_counter()
            await fuse_request(prompt=prompt, tenant="demo", constraints=constraints)
            t1 = time.perf_counter()
            await asyncio.gather(*(direct.call(f, choices[f.id].model) for f in plan.fragments))
            t2 = time.perf_counter()
            if round_:
                flow_s += t1 - t0
                direct_s += t2 - t1
                per_fragment_ms.append(((t1 - t0) - (t2 - t1)) / len(plan.fragments) * 1000)
    fragments = sum(len(plan.fragments) for _, plan, _ in work) * repeats
    figures = {
        "repeats": repeats,
        "max_tokens": max_tokens,
        "fragments": fragments,
        "flow_s": round(flow_s, 3),
        "direct_s": round(direct_s, 3),
        "overhead_ratio": round(flow_s / direct_s, 3),
        "overhead_ms_p50": round(statistics.median(per_fragment_ms), 1),
        "concurrent": await _concurrent(direct, concurrency, repeats),
        "models": [],
    }
    if via == "api":
        figures["api"] = await _via_api(repeats, max_tokens)
    for name in sorted(direct.endpoints):  # each routed model alone, and its server one by one vs at once
        model = cat.model(direct.services.catalog, name)
        figures["models"] += [await _decode_speed(model, repeats), await _throughput(model)]
    return figures


async def _concurrent(direct: _Direct, concurrency: int, repeats: int) -> dict:
    """C single-fragment requests at once through the flow, and C direct calls at once."""
    constraints = direct.constraints.model_copy(update={"split": False, "task_type": "chat"})
    one = _Direct(constraints)
    one.endpoints = direct.endpoints
    texts = [STORY_PROMPTS[i % len(STORY_PROMPTS)] for i in range(concurrency)]
    planned = [await one.plan(text, f"bench-c{i}") for i, text in enumerate(texts)]
    flow_tokens = direct_tokens = 0
    flow_s = direct_s = 0.0
    for round_ in range(repeats + 1):
        t0 = time.perf_counter()
        results = await asyncio.gather(*(fuse_request(prompt=t, tenant="demo", constraints=constraints) for t in texts))
        t1 = time.perf_counter()
        tokens = await asyncio.gather(
            *(one.call(plan.fragments[0], choices[plan.fragments[0].id].model) for plan, choices in planned)
        )
        t2 = time.perf_counter()
        if round_:
            flow_tokens += sum(f.tokens_out for r in results for f in r.fragments)
            direct_tokens += sum(tokens)
            flow_s += t1 - t0
            direct_s += t2 - t1
    flow_rate, direct_rate = flow_tokens / flow_s, direct_tokens / direct_s
    return {
        "concurrency": concurrency,
        "flow_tokens_per_s": round(flow_rate, 1),
        "direct_tokens_per_s": round(direct_rate, 1),
        "tokens_per_s_ratio": round(flow_rate / direct_rate, 3),
    }


def report(figures: dict) -> str:
    c = figures["concurrent"]
    return "\n".join(
        [
            f"{figures['repeats']} rounds x {len(PROMPTS)} requests = {figures['fragments']} fragments, "
            f"max_tokens {figures['max_tokens']}",
            f"through fuse_request: {figures['flow_s']:.2f}s   direct llama.cpp calls: {figures['direct_s']:.2f}s",
            f"orchestration overhead ratio (flow / direct): {figures['overhead_ratio']:.2f}x, "
            f"{figures['overhead_ms_p50']:.0f} ms per fragment (p50)",
            f"{c['concurrency']} single-fragment requests at once: {c['flow_tokens_per_s']:.1f} tokens/s through the flow, "
            f"{c['direct_tokens_per_s']:.1f} direct ({c['tokens_per_s_ratio']:.2f}x)",
            *figures["models"],
            *([api_report(figures["api"])] if "api" in figures else []),
        ]
    )


def summary_line(figures: dict) -> str:
    """The one JSON line `--json` ends with."""
    c = figures["concurrent"]
    line = {
        "overhead_ratio": figures["overhead_ratio"],
        "overhead_ms_p50": figures["overhead_ms_p50"],
        "concurrent": {"concurrency": c["concurrency"], "tokens_per_s_ratio": c["tokens_per_s_ratio"]},
    }
    if "api" in figures:
        line["api"] = figures["api"]
    return json.dumps(line)


# --- through the API ------------------------------------------------------------------------------


def median_gap_ms(through: list[float], direct: list[float]) -> float:
    """The median of the per-request differences (each request less its direct twin), in ms."""
    if not through or len(through) != len(direct):
        raise ValueError(f"{len(through)} requests paired with {len(direct)} direct ones")
    return round(statistics.median(t - d for t, d in zip(through, direct, strict=True)) * 1000, 1)


def median_ratio(through: list[float], direct: list[float]) -> float:
    """The median wall time of one side over the other's."""
    return round(statistics.median(through) / statistics.median(direct), 3)


def per_fragment_ms(cpu_s: float | None, fragments: int) -> float | None:
    """CPU seconds spread over the fragments, in ms (None when it could not be read)."""
    return None if cpu_s is None else round(cpu_s / fragments * 1000, 2)


def routed(route: str) -> dict[str, str]:
    """`f1=model,f2=model` (the API's route) as fragment id → model."""
    return dict(pair.split("=", 1) for pair in route.split(",") if "=" in pair)


def server_cpu_s(pid: int | None) -> float | None:
    """User and system CPU seconds of a process and its children so far (None: not readable)."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in (process, *process.children(recursive=True)))
    except psutil.Error:
        return None


async def _via_api(repeats: int, max_tokens: int, tenant: str = "demo") -> dict:
    """Each prompt through the API (answered whole, then streamed), each time followed by its
    fragments as direct calls all at once, on the models the API's run routed them to."""
    direct = _Direct(Constraints(max_tokens=max_tokens))  # what an API request carries
    plans = [(await direct.plan(prompt, f"bench-api-{i}"))[0] for i, prompt in enumerate(PROMPTS)]
    seen: dict[str, list[float]] = {"api": [], "direct": [], "api_ttft": [], "direct_ttft": [], "direct_cpu": []}
    tokens = {"api": 0, "direct": 0}
    server = running_server(get_settings().home)
    pid = server.pid if server else None
    async with api_server([tenant]) as (url, made):
        auth = {"Authorization": f"Bearer {made[tenant]}"}
        async with httpx.AsyncClient(base_url=url + "/v1", headers=auth, timeout=600) as http:
            for round_ in range(repeats + 1):  # round 0 warms both paths and is not counted
                if round_ == 1:
                    own_cpu, prefect_cpu = time.process_time(), server_cpu_s(pid)
                for prompt, plan in zip(PROMPTS, plans, strict=True):
                    body = {"model": "homeskillet/auto", "messages": [{"role": "user", "content": prompt}]}
                    body["max_tokens"] = max_tokens
                    api_s, api_tokens, route = await _answered(http, body)
                    direct_s, outs, cpu_whole = await _direct(direct, plan, route, stream=False)
                    api_ttft, route = await _streamed(http, body)
                    _, firsts, cpu_streamed = await _direct(direct, plan, route, stream=True)
                    if round_:
                        for key, value in (
                            ("api", api_s),
                            ("direct", direct_s),
                            ("api_ttft", api_ttft),
                            ("direct_ttft", firsts[0].first_token_s),  # the first fragment's text leads
                            ("direct_cpu", cpu_whole + cpu_streamed),
                        ):
                            seen[key].append(value)
                        tokens["api"] += api_tokens
                        tokens["direct"] += sum(o.tokens_out for o in outs)
            own_cpu, prefect_cpu = time.process_time() - own_cpu, _less(server_cpu_s(pid), prefect_cpu)
    direct_cpu = sum(seen["direct_cpu"])
    fragments = sum(len(plan.fragments) for plan in plans) * repeats * 2  # answered whole and streamed
    return {
        "max_tokens": max_tokens,
        "requests": len(seen["api"]),
        "overhead_ms_p50": median_gap_ms(seen["api"], seen["direct"]),
        "ratio": median_ratio(seen["api"], seen["direct"]),
        "ttft_overhead_ms_p50": median_gap_ms(seen["api_ttft"], seen["direct_ttft"]),
        "api_s_p50": round(statistics.median(seen["api"]), 3),
        "direct_s_p50": round(statistics.median(seen["direct"]), 3),
        "ttft_ms_p50": round(statistics.median(seen["api_ttft"]) * 1000, 1),
        "direct_ttft_ms_p50": round(statistics.median(seen["direct_ttft"]) * 1000, 1),
        "completion_tokens": tokens,
        "cpu_ms_per_fragment": {
            "flow_process": per_fragment_ms(own_cpu - direct_cpu, fragments),
            "prefect_server": per_fragment_ms(prefect_cpu, fragments),
            "direct_calls": per_fragment_ms(direct_cpu, fragments),
        },
    }


def _less(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


async def _answered(http: httpx.AsyncClient, body: dict) -> tuple[float, int, str]:
    """(wall seconds, completion tokens, route) of one request answered whole."""
    started = time.perf_counter()
    response = await http.post("/chat/completions", json=body)
    wall = time.perf_counter() - started
    if response.status_code != 200:
        raise ServiceError(f"the API answered HTTP {response.status_code}: {response.text[:300]}")
    return wall, response.json()["usage"]["completion_tokens"], response.headers["x-homeskillet-route"]


async def _streamed(http: httpx.AsyncClient, body: dict) -> tuple[float, str]:
    """(seconds to the first content token, route) of one streamed request, read to `[DONE]`."""
    started, first, route = time.perf_counter(), None, ""
    async with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            raise ServiceError(f"the API answered HTTP {response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            data = sse_data(line)
            if data == "[DONE]":
                break
            if isinstance(data, dict):
                if "error" in data:
                    raise ServiceError(f"the API's stream ended with an error: {data['error'].get('message')}")
                if first is None and chunk_text(data):
                    first = time.perf_counter() - started
                route = data.get("homeskillet", {}).get("route", route)
    if first is None:
        raise ServiceError("the API's stream carried no text")
    return first, route


async def _direct(direct: _Direct, plan: Plan, route: str, stream: bool) -> tuple[float, list[Completion], float]:
    """The plan's fragments as direct calls all at once, each on the model the API routed it to:
    (wall seconds, the completions in plan order, this process's CPU seconds meanwhile)."""
    models = routed(route)
    if set(models) != {f.id for f in plan.fragments}:
        raise ServiceError(f"the API's run planned {route!r}; the direct plan has {[f.id for f in plan.fragments]}")
    for name in models.values():
        await direct.warm(name)
    started, cpu = time.perf_counter(), time.process_time()
    outs = await asyncio.gather(*(direct.complete(f, models[f.id], stream) for f in plan.fragments))
    return time.perf_counter() - started, list(outs), time.process_time() - cpu


def api_report(api: dict) -> str:
    cpu = api["cpu_ms_per_fragment"]
    return (
        f"through the API ({api['requests']} requests, max_tokens {api['max_tokens']}): "
        f"p50 {api['api_s_p50']:.2f}s vs {api['direct_s_p50']:.2f}s direct ({api['ratio']:.2f}x, "
        f"{api['overhead_ms_p50']:.0f} ms more); first token after {api['ttft_ms_p50']:.0f} ms vs "
        f"{api['direct_ttft_ms_p50']:.0f} ms direct ({api['ttft_overhead_ms_p50']:.0f} ms more); CPU per fragment: "
        f"{cpu['flow_process']} ms this process, {cpu['prefect_server']} ms the Prefect server"
    )


STORY_PROMPTS = [
    f"Once upon a time, {topic}"
    for topic in (
        "a lighthouse keeper",
        "a lost cat",
        "a rainy market",
        "an old clock",
        "a mountain village",
        "a paper boat",
        "a night train",
        "a garden robot",
    )
]


async def _throughput(model, tokens: int = 64) -> str:
    """Tokens/s of one model's server for the same 8 plain completions one after another and all
    at once (llama-server batches concurrent sequences into one decode step)."""
    endpoint = await asyncio.to_thread(runtime.services().local.model_endpoint, model)

    async def one(text: str) -> int:
        return (await openai_client.complete(endpoint, model.name, prompt=text, max_tokens=tokens)).tokens_out

    started = time.perf_counter()
    sequential = [await one(p) for p in STORY_PROMPTS]
    sequential_s = time.perf_counter() - started
    started = time.perf_counter()
    concurrent = await asyncio.gather(*(one(p) for p in STORY_PROMPTS))
    concurrent_s = time.perf_counter() - started
    seq_rate, conc_rate = sum(sequential) / sequential_s, sum(concurrent) / concurrent_s
    return (
        f"{model.name}: {len(STORY_PROMPTS)} x {tokens}-token requests: {seq_rate:.1f} tokens/s one after another, "
        f"{conc_rate:.1f} tokens/s all at once ({conc_rate / seq_rate:.2f}x)"
    )


async def _decode_speed(model, repeats: int, tokens: int = 64) -> str:
    """Tokens/s of one model alone: streamed completions of a fixed length, one at a time."""
    endpoint = await asyncio.to_thread(runtime.services().local.model_endpoint, model)
    decoded = seconds = first = 0.0
    for _ in range(repeats):
        out = await openai_client.complete(
            endpoint, model.name, prompt="Once upon a time", max_tokens=tokens, stream=True
        )
        decoded += out.tokens_out - 1
        seconds += out.total_s - out.first_token_s
        first += out.first_token_s
    return (
        f"{model.name}: {decoded / seconds:.1f} tokens/s decoding alone "
        f"({repeats} x {tokens}-token completions, first token after {first / repeats * 1000:.0f} ms)"
    )
