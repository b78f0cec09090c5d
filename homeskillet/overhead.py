"""Orchestration overhead: the same fragments through `fuse_request` and as direct llama.cpp calls.

Both sides use the same plans, the same routing, the same warm model servers and the same
concurrency (a plan's independent fragments run at once), so the difference is what the flow
adds: Prefect task runs, the ledger's allocate and release, artifacts.
"""

from __future__ import annotations

import asyncio
import time

from connectors import openai_client
from flows.fusion import fuse_request
from homeskillet import catalog as cat
from homeskillet.schemas import Constraints, Plan
from tasks import runtime
from tasks.decompose import decompose_prompt
from tasks.resources import render
from tasks.routing import max_context, route_plan

PROMPTS = [
    "What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea.",
    "1. What is the capital of Japan?\n2. Name three primary colors.\n3. Write one sentence about autumn.",
]


async def _direct(plan: Plan, choices: dict, endpoints: dict[str, str], max_tokens: int) -> None:
    catalog = runtime.catalog()

    async def one(fragment):
        model = cat.model(catalog, choices[fragment.id].model)
        await openai_client.complete(endpoints[model.name], model.name, max_tokens=max_tokens, **render(model, fragment.text))

    assert all(not f.depends_on for f in plan.fragments), "the benchmark prompts have independent fragments"
    await asyncio.gather(*(one(f) for f in plan.fragments))


async def run_benchmark(repeats: int = 3, max_tokens: int = 48) -> str:
    catalog = runtime.catalog()
    local = runtime.backend()
    # the dedicated pool holds every fragment of a request at once: no capacity queueing in the figures
    limits = Constraints(max_tokens=max_tokens, tier="dedicated")
    work = []
    for i, prompt in enumerate(PROMPTS):
        plan = decompose_prompt(prompt, f"bench-{i}", max_context(catalog, limits), max_tokens)
        work.append((prompt, plan, route_plan(plan, catalog, limits)))
    models = {c.model for _, _, choices in work for c in choices.values()}
    endpoints = {m: await asyncio.to_thread(local.model_endpoint, cat.model(catalog, m)) for m in models}
    flow_s = direct_s = 0.0
    for round_ in range(repeats + 1):  # round 0 warms both paths and is not counted
        for prompt, plan, choices in work:
            t0 = time.perf_counter()
            await fuse_request(prompt=prompt, tenant="demo", constraints=limits)
            t1 = time.perf_counter()
            await _direct(plan, choices, endpoints, max_tokens)
            t2 = time.perf_counter()
            if round_:
                flow_s += t1 - t0
                direct_s += t2 - t1
    fragments = sum(len(plan.fragments) for _, plan, _ in work) * repeats
    lines = [
        f"{repeats} rounds x {len(PROMPTS)} requests = {fragments} fragments, max_tokens {max_tokens}",
        f"through fuse_request: {flow_s:.2f}s   direct llama.cpp calls: {direct_s:.2f}s",
        f"orchestration overhead ratio (flow / direct): {flow_s / direct_s:.2f}x, "
        f"{(flow_s - direct_s) / fragments * 1000:.0f} ms per fragment",
    ]
    for name in sorted(models):
        lines.append(await _decode_speed(cat.model(catalog, name), repeats))
        lines.append(await _throughput(cat.model(catalog, name)))
    return "\n".join(lines)


STORY_PROMPTS = [f"Once upon a time, {topic}" for topic in (
    "a lighthouse keeper", "a lost cat", "a rainy market", "an old clock",
    "a mountain village", "a paper boat", "a night train", "a garden robot",
)]  # fmt: skip


async def _throughput(model, tokens: int = 64) -> str:
    """Tokens/s of one model's server for the same 8 plain completions one after another and all
    at once (llama-server batches concurrent sequences into one decode step)."""
    endpoint = await asyncio.to_thread(runtime.backend().model_endpoint, model)

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
    endpoint = await asyncio.to_thread(runtime.backend().model_endpoint, model)
    decoded = seconds = first = 0.0
    for _ in range(repeats):
        out = await openai_client.complete(endpoint, model.name, prompt="Once upon a time", max_tokens=tokens, stream=True)
        decoded += out.tokens_out - 1
        seconds += out.total_s - out.first_token_s
        first += out.first_token_s
    return (
        f"{model.name}: {decoded / seconds:.1f} tokens/s decoding alone "
        f"({repeats} x {tokens}-token completions, first token after {first / repeats * 1000:.0f} ms)"
    )
