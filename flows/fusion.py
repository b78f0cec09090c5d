"""`fuse_request`: decompose → route → (allocate → infer → release) per fragment → fuse.

Fragments whose dependencies are done run concurrently. Each fragment's allocate → infer →
release runs inside a Prefect transaction: if anything fails or is cancelled before release,
the allocate task's rollback hook releases the slice. A crashed process runs no hooks; the
ledger's lease expiry and holder check are the backstop.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.transactions import atransaction
from pydantic import ValidationError

from homeskillet import catalog as cat
from homeskillet.errors import CircuitOpen, HostedAIUnavailable, InvalidRequest, Preempted
from homeskillet.schemas import (
    Constraints,
    Fragment,
    FragmentResult,
    FusionResult,
    InferenceRequest,
    ModelChoice,
    Plan,
    TelemetryRecord,
    Timings,
)
from connectors.telemetry import HELD, REQUESTS, observe
from tasks import progress, runtime
from tasks.telemetry import record_telemetry
from tasks.decompose import decompose, fill
from tasks.fusion import fuse
from tasks.resources import allocate, infer, release
from tasks.policy import decide
from tasks.routing import candidates, fragment_budget, fragment_cost, live_stats, max_context, reroute, route, route_fragment

MAX_ATTEMPTS = 3  # per model call: the first try and two re-runs after preemption or fallback
MAX_CALLS = {"single": 1, "cascade": 3, "ensemble": 3, "moa": 4}  # model calls a strategy may make


def make_request(
    prompt: str,
    tenant: str,
    strategy: str = "single",
    constraints: Constraints | dict | None = None,
    request_id: str | None = None,
) -> InferenceRequest:
    """The validated request, or InvalidRequest naming each problem."""
    fields = {"prompt": prompt, "tenant": tenant, "strategy": strategy, "constraints": constraints or {}}
    if request_id:
        fields["request_id"] = request_id
    try:
        return InferenceRequest.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise InvalidRequest(f"invalid request: {problems}") from None


@flow(
    name="fuse-request",
    flow_run_name="fuse-{tenant}",
    validate_parameters=False,  # make_request validates, with messages that name each problem
    persist_result=True,  # runs started from deployments hand their result back through the API
    result_serializer="json",
)
async def fuse_request(
    prompt: str,
    tenant: str = "demo",
    strategy: Literal["single", "cascade", "ensemble", "moa"] = "single",
    constraints: Constraints | None = None,
    request_id: str | None = None,
    catalog_path: str | None = None,
    routing_stats: str | None = None,
) -> FusionResult:
    """Answer one inference request: split it, run each fragment on its own GPU share, fuse.

    Args:
        prompt: The request; numbered items and several questions become separate fragments.
        tenant: The tenant it belongs to (a catalog tenant); its allocations are its own.
        strategy: single (cheapest model near the best quality), cascade (cheap models first,
            escalate when they disagree or the answer is open), ensemble (vote of cheap models),
            moa (proposers, then an aggregator that sees their answers).
        constraints: max_tokens, max_cost_usd, allowed_models, tier, pool, backend ("local" or
            "hostedai"), fallback_backend, on_preemption, capacity_wait_s, split (False keeps the
            prompt as one fragment), task_type (skip the classifier).
        request_id: An id of your own for the request (default: a new one).
        catalog_path: Another catalog file (default: HOMESKILLET_CATALOG or the packaged one).
        routing_stats: A file of learned quality and cost per task type and model
            (`homeskillet learn-routing`); default: the catalog's quality (measured, else its
            prior) and cost estimates.
    """
    started = time.perf_counter()
    request = make_request(prompt, tenant, strategy, constraints, request_id)
    catalog_path = str(runtime.catalog_path(catalog_path))
    catalog = runtime.catalog(catalog_path)
    cat.check_tenant(catalog, request.tenant)
    limits = request.constraints
    if routing_stats is not None:
        runtime.routing_stats(routing_stats)  # a bad file fails the request before anything is allocated
    plan = await decompose(request.prompt, request.request_id, max_context(catalog, limits), limits.max_tokens,
                           limits.split, limits.task_type)  # fmt: skip
    await route(plan, catalog, limits)  # every fragment has a model within the constraints, before any allocation
    records: list[TelemetryRecord] = []
    try:
        results = await run_plan(plan, request, catalog_path, records, routing_stats)
    except BaseException:
        REQUESTS.labels("error").inc()
        raise
    finally:
        try:
            await record_telemetry(records)
        except Exception as exc:  # telemetry must never hide the request's own outcome
            get_run_logger().warning("telemetry not written: %s", exc)
    REQUESTS.labels("ok").inc()
    fused = await fuse(plan, results, request.tenant, time.perf_counter() - started)
    await acreate_table_artifact(
        key="fragments",
        table=[fragment_row(r) for r in fused.fragments],
        description=f"Request {fused.request_id} of tenant {fused.tenant}: {len(fused.fragments)} fragment(s), "
        f"${fused.cost_usd:.6f}, {fused.wall_s:.2f}s",
    )
    return fused


async def run_plan(
    plan: Plan,
    request: InferenceRequest,
    catalog_path: str,
    records: list[TelemetryRecord] | None = None,
    routing_stats: str | None = None,
) -> dict[str, FragmentResult]:
    """Run every fragment once its dependencies are done; the first failure cancels the rest."""
    budget = fragment_budget(plan, request.constraints)
    running: dict[str, asyncio.Task[FragmentResult]] = {}
    try:
        async with asyncio.TaskGroup() as group:
            for fragment in plan.fragments:  # topological order: dependencies are already scheduled
                upstream = [running[dep] for dep in fragment.depends_on]
                running[fragment.id] = group.create_task(
                    run_fragment(fragment, upstream, request, catalog_path, budget, records, routing_stats)
                )
    except BaseExceptionGroup as group_error:
        raise _first_cause(group_error) from None
    return {fid: task.result() for fid, task in running.items()}


async def run_fragment(
    fragment: Fragment,
    upstream: list[asyncio.Task[FragmentResult]],
    request: InferenceRequest,
    catalog_path: str,
    budget_usd: float | None = None,
    records: list[TelemetryRecord] | None = None,
    routing_stats: str | None = None,
) -> FragmentResult:
    """One fragment under the request's strategy: the policy decides which models to ask (each
    call its own allocation) and whose answer stands; provenance keeps every call."""
    answers = {r.fragment_id: r.text.strip() for r in await asyncio.gather(*upstream)}
    text = fill(fragment, answers)
    limits = request.constraints
    catalog = runtime.catalog(catalog_path)
    stats = live_stats(fragment, catalog, limits)
    if routing_stats is not None:  # learned figures, for the allowed models that have them
        stats = runtime.routing_stats(routing_stats).only(fragment.task_type, list(stats.quality[fragment.task_type]))
    per_call = None if budget_usd is None else budget_usd / MAX_CALLS[request.strategy]
    calls: list[FragmentResult] = []

    async def ask(model: str, prompt: str | None = None) -> str:
        only = limits.model_copy(update={"allowed_models": [model]})
        model_choice = route_fragment(fragment, *candidates(catalog, only), limits.max_tokens, per_call)
        result = await run_model(fragment, prompt or text, model_choice, request, only, catalog_path, per_call, records)
        calls.append(result)
        return result.text

    decision = await decide(request.strategy, fragment.task_type, text, stats, list(stats.quality[fragment.task_type]), ask)
    chosen = next(c for c in reversed(calls) if c.text == decision.answer)
    return chosen.model_copy(
        update={
            "tokens_in": sum(c.tokens_in for c in calls),
            "tokens_out": sum(c.tokens_out for c in calls),
            "cost_usd": sum(c.cost_usd for c in calls),
            "strategy": request.strategy,
            "models_called": decision.models,
            "allocation_ids": [c.allocation_id for c in calls],
            "confidence": decision.confidence,
            "reason": f"{decision.why}; {chosen.reason}",
        }
    )


async def run_model(
    fragment: Fragment,
    text: str,
    choice: ModelChoice,
    request: InferenceRequest,
    limits: Constraints,
    catalog_path: str,
    budget_usd: float | None = None,
    records: list[TelemetryRecord] | None = None,
) -> FragmentResult:
    """One model's answer to a fragment; re-run elsewhere when its share is preempted, or on the
    fallback backend when its backend is unavailable (retries spent, or circuit open)."""
    catalog = runtime.catalog(catalog_path)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return await attempt_fragment(fragment, text, choice, request, catalog_path, attempt, records)
        except Preempted:
            if attempt == MAX_ATTEMPTS:
                raise
            tier = "dedicated" if limits.on_preemption == "dedicated" else choice.tier
            backend = cat.pool(catalog, choice.pool).backend
            why = f"attempt {attempt} on {choice.pool} was preempted; re-run on {tier}"
            choice = reroute(fragment, catalog, limits, budget_usd, why, tier=tier, backend=backend)
        except HostedAIUnavailable as exc:  # retries exhausted, or the circuit is open
            fallback = limits.fallback_backend
            if fallback is None or fallback == cat.pool(catalog, choice.pool).backend or attempt == MAX_ATTEMPTS:
                raise
            state = "circuit open" if isinstance(exc, CircuitOpen) else "unavailable"
            why = f"{cat.pool(catalog, choice.pool).backend} {state}; fell back to {fallback}"
            choice = reroute(fragment, catalog, limits, budget_usd, why, backend=fallback)
    raise AssertionError("unreachable")


async def attempt_fragment(
    fragment: Fragment,
    text: str,
    choice: ModelChoice,
    request: InferenceRequest,
    catalog_path: str,
    attempt: int = 1,
    records: list[TelemetryRecord] | None = None,
    stream: bool = False,
) -> FragmentResult:
    """allocate → infer → release for one fragment on one choice, inside a transaction whose
    rollback releases; `stream` measures time to first token (and counts tokens from chunks)."""
    limits = request.constraints
    catalog = runtime.catalog(catalog_path)
    pool = cat.pool(catalog, choice.pool)
    wait_s = runtime.settings().capacity_wait_s if limits.capacity_wait_s is None else limits.capacity_wait_s
    record = dict(
        ts=datetime.now(timezone.utc), request_id=request.request_id, tenant=request.tenant, fragment_id=fragment.id,
        task_type=fragment.task_type, strategy=request.strategy, model=choice.model, backend=pool.backend,
        pool=pool.id, tier=pool.tier, allocation_id=None, tflops=choice.tflops, vram_gb=choice.vram_gb,
    )  # fmt: skip
    t0 = time.perf_counter()
    held = HELD.labels(pool.backend)
    allocation = None
    try:
        async with atransaction():
            allocation = await allocate(request.tenant, request.request_id, choice, catalog_path, wait_s)
            held.inc()
            progress.emit(request.request_id, "allocated", fragment_id=fragment.id, model=allocation.model,
                          pool=allocation.pool, allocation_id=allocation.allocation_id)  # fmt: skip
            record["allocation_id"] = allocation.allocation_id
            record["queue_s"] = max(0.0, (allocation.created_at - record["ts"]).total_seconds())
            t1 = time.perf_counter()
            completion = await infer(allocation, text, limits.max_tokens, catalog_path, stream)
            t2 = time.perf_counter()
            ended_at = await release(allocation, catalog_path)
            t3 = time.perf_counter()
            progress.emit(request.request_id, "completed", fragment_id=fragment.id, model=allocation.model,
                          pool=allocation.pool, allocation_id=allocation.allocation_id,
                          tokens_out=completion.tokens_out)  # fmt: skip
    except BaseException as exc:
        _keep(records, TelemetryRecord(**record, allocate_s=time.perf_counter() - t0, outcome="error",
                                       error_class=type(exc).__name__))  # fmt: skip
        raise
    finally:
        if allocation is not None:
            held.dec()  # released by the release task or, on failure, by the rollback hook
    held_s = (ended_at - allocation.created_at).total_seconds()
    tokens = completion.tokens_in + completion.tokens_out
    timings = Timings(allocate_s=t1 - t0, first_token_s=completion.first_token_s, infer_s=t2 - t1, release_s=t3 - t2)
    result = FragmentResult(
        fragment_id=fragment.id,
        task_type=fragment.task_type,
        text=completion.text,
        model=allocation.model,
        backend=pool.backend,
        pool=pool.id,
        tier=pool.tier,
        allocation_id=allocation.allocation_id,
        tokens_in=completion.tokens_in,
        tokens_out=completion.tokens_out,
        timings=timings,
        cost_usd=fragment_cost(cat.model(catalog, choice.model), pool, held_s, tokens, completion.cost_usd),
        reason=choice.reason,
        attempts=attempt,
    )
    _keep(records, TelemetryRecord(
        **record, **timings.model_dump(), tokens_in=result.tokens_in, tokens_out=result.tokens_out,
        cost_usd=result.cost_usd, outcome="ok",
    ))  # fmt: skip
    return result


def _keep(records: list[TelemetryRecord] | None, record: TelemetryRecord) -> None:
    observe(record)
    if records is not None:
        records.append(record)


def fragment_row(result: FragmentResult) -> dict:
    """One row of the fragments table (artifact and CLI)."""
    return {
        "fragment": result.fragment_id,
        "task_type": result.task_type,
        "model": result.model,
        "backend": result.backend,
        "pool": result.pool,
        "tier": result.tier,
        "allocation_id": result.allocation_id,
        "latency_s": round(result.timings.allocate_s + result.timings.infer_s + result.timings.release_s, 3),
        "tokens_in": result.tokens_in,
        "tokens_out": result.tokens_out,
        "attempts": result.attempts,
        "strategy": result.strategy,
        "models_called": ",".join(result.models_called),
        "confidence": result.confidence,
        "cost_usd": round(result.cost_usd, 8),
    }


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The error that failed the group, rather than the cancellations it caused."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
    return (real or leaves)[0]
