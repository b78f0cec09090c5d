"""Orchestration overhead: the same fragments through `fuse_request` and as direct llama.cpp calls.

Both sides use the same plans, the same models and pools (`tasks.routing.preview`, what the flow's
router picks), the same warm model servers and the same concurrency, so the difference is what
the flow adds: Prefect flow and task runs, the ledger's allocate and release, telemetry, artifacts.

1. Concurrency 1: multi-fragment requests one after another (a plan's independent fragments run
   at once on both sides): the wall-time ratio and the overhead per fragment.
2. Concurrency C: C single-fragment requests at once against C direct calls at once: tokens/s
   through the flow over tokens/s direct.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time

from connectors import openai_client
from flows.clients import lend_clients
from flows.fusion import fuse_request
from homeskillet import catalog as cat
from homeskillet.schemas import Constraints, Fragment, Plan
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
            if choice.model not in self.endpoints:
                model = cat.model(self.services.catalog, choice.model)
                await self.services.local.warm_up(model)
                self.endpoints[model.name] = await asyncio.to_thread(self.services.local.model_endpoint, model)
        return prepared.plan, prepared.choices

    async def call(self, fragment: Fragment, model_name: str) -> int:
        model = cat.model(self.services.catalog, model_name)
        out = await openai_client.complete(
            self.endpoints[model.name],
            model.name,
            max_tokens=self.constraints.max_tokens,
            **render(model, fragment.text),
        )
        return out.tokens_out


async def run_benchmark(repeats: int = 3, max_tokens: int = 48, concurrency: int = 8) -> dict:
    """The figures, as a dict (`report` prints them). The flow runs share one Prefect client, as
    in any long-lived process that runs requests (`flows.clients.lend_clients`)."""
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
        ]
    )


def summary_line(figures: dict) -> str:
    """The one JSON line `--json` ends with."""
    c = figures["concurrent"]
    return json.dumps(
        {
            "overhead_ratio": figures["overhead_ratio"],
            "overhead_ms_p50": figures["overhead_ms_p50"],
            "concurrent": {"concurrency": c["concurrency"], "tokens_per_s_ratio": c["tokens_per_s_ratio"]},
        }
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
