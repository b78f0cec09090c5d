"""`fuse_request`: decompose → per fragment, route (`tasks.routing.route`) → (allocate → infer →
release) per model call → fuse.

Fragments whose dependencies are done run concurrently. Each fragment's allocate → infer →
release runs inside a Prefect transaction: if anything fails or is cancelled before release,
the allocate task's rollback hook releases the slice. A crashed process runs no hooks; the
ledger's lease expiry and holder check are the backstop.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.context import FlowRunContext
from prefect.transactions import atransaction
from pydantic import ValidationError

from connectors.ledger import new_allocation_id
from connectors.telemetry import HELD, REQUESTS, TENANT_HELD, observe
from homeskillet import catalog as cat
from homeskillet.errors import InvalidRequest
from homeskillet.schemas import (
    Constraints,
    Fragment,
    FragmentResult,
    FusionResult,
    InferenceRequest,
    ModelChoice,
    Plan,
    Strategy,
    TelemetryRecord,
    Timings,
)
from tasks import progress, runtime
from tasks.context import RunContext
from tasks.covenant import check_request, check_size, restrict, within_budget
from tasks.decompose import decompose, estimate_tokens, fill
from tasks.fusion import fuse
from tasks.resources import allocate, infer, release, release_if_reserved
from tasks.routing import fragment_budget, fragment_cost, max_context, preview, route
from tasks.telemetry import record_telemetry


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
            f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
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
    strategy: Strategy = "single",
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
            moa (proposers, then an aggregator that sees their answers), auto (per fragment: a
            cascade where the figures learned one or answers are closed, else single).
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
    services = runtime.services(catalog_path)
    covenant = services.covenant(request.tenant)  # the tenant's covenant now (an unknown tenant fails here)
    check_request(request, covenant, services.catalog)  # asks for nothing the covenant forbids
    catalog, terms = restrict(services.catalog, covenant)  # routed only where the covenant allows
    limits = request.constraints
    learned = runtime.routing_stats(routing_stats) if routing_stats is not None else None  # a bad file fails here
    plan = await decompose(
        request.prompt,
        request.request_id,
        max_context(catalog, limits),
        limits.max_tokens,
        limits.split,
        limits.task_type,
    )
    check_size(request.tenant, covenant, estimate_tokens(request.prompt), plan)
    ctx = RunContext(
        request,
        services,
        catalog,
        get_run_logger(),
        fragment_budget(plan, limits),
        learned,
        covenant=covenant,
        covenant_terms=terms,
    )
    choices = preview(plan, ctx)  # every fragment has a model within the constraints, before anything is allocated
    await within_budget(ctx, min(c.est_cost_usd for c in choices.values()))  # the budget has room for a call
    ledger = await services.ledger()
    running = await ledger.admit(request.tenant, request.request_id, covenant)  # concurrency cap, quota synced
    try:
        results = await run_plan(plan, ctx)
    except BaseException:
        REQUESTS.labels("error").inc()
        await _record(ctx)
        raise
    finally:
        await ledger.end_request(running)
        if _deployment_run():  # a worker's run: this process ends with the flow
            await _give_back(ctx)
    REQUESTS.labels("ok").inc()
    # the answer and its artifact while the telemetry is written (awaited all the same: never lost)
    fused, _ = await asyncio.gather(_fuse(plan, results, request, started), _record(ctx))
    return fused


def _deployment_run() -> bool:
    """Whether this flow run was started from a deployment, read from the run's own context.
    (`prefect.runtime.deployment.id` reads the flow run back over the API with a new client, and
    blocks the event loop while it does: 11 % of the process's CPU in `bench-overhead`.)"""
    run = FlowRunContext.get()
    return run is not None and run.flow_run is not None and run.flow_run.deployment_id is not None


async def _give_back(ctx: RunContext) -> None:
    """Retire what this process holds (idle hosted·ai subscriptions): a deployment's run is its own
    process, so nothing would ever reuse them. In-process callers (CLI, MCP server) keep theirs
    warm for their next request and retire them on their own schedule."""
    try:
        await ctx.services.shutdown()
    except Exception as exc:  # the request's own outcome matters more; the idle check retries later
        ctx.log.warning("hosted·ai subscriptions not retired at the end of the run: %s", exc)


async def _fuse(
    plan: Plan, results: dict[str, FragmentResult], request: InferenceRequest, started: float
) -> FusionResult:
    fused = await fuse(plan, results, request.tenant, time.perf_counter() - started)
    await acreate_table_artifact(
        key="fragments",
        table=[fragment_row(r) for r in fused.fragments],
        description=f"Request {fused.request_id} of tenant {fused.tenant}: {len(fused.fragments)} fragment(s), "
        f"${fused.cost_usd:.6f}, {fused.wall_s:.2f}s",
    )
    return fused


async def _record(ctx: RunContext) -> None:
    """The request's fragment records to the telemetry dataset; a failure is logged, never raised
    (telemetry must not hide the request's own outcome)."""
    try:
        await record_telemetry(ctx.services, ctx.records)
    except Exception as exc:
        ctx.log.warning("telemetry not written: %s", exc)


async def run_plan(plan: Plan, ctx: RunContext) -> dict[str, FragmentResult]:
    """Run every fragment once its dependencies are done; the first failure cancels the rest."""
    running: dict[str, asyncio.Task[FragmentResult]] = {}
    try:
        async with asyncio.TaskGroup() as group:
            for fragment in plan.fragments:  # topological order: dependencies are already scheduled
                upstream = [running[dep] for dep in fragment.depends_on]
                running[fragment.id] = group.create_task(run_fragment(fragment, upstream, ctx))
    except BaseExceptionGroup as group_error:
        raise _first_cause(group_error) from None
    return {fid: task.result() for fid, task in running.items()}


async def run_fragment(
    fragment: Fragment, upstream: list[asyncio.Task[FragmentResult]], ctx: RunContext
) -> FragmentResult:
    """One fragment, once the answers it depends on are in: routed by `tasks.routing.route`, each
    model call on its own allocation."""
    answers = {r.fragment_id: r.text.strip() for r in await asyncio.gather(*upstream)}

    async def attempt(choice: ModelChoice, text: str, number: int) -> FragmentResult:
        return await attempt_fragment(fragment, text, choice, ctx, number)

    return await route(fragment, fill(fragment, answers), ctx, attempt)


async def attempt_fragment(
    fragment: Fragment, text: str, choice: ModelChoice, ctx: RunContext, attempt: int = 1, stream: bool = False
) -> FragmentResult:
    """allocate → infer → release for one fragment on one choice, inside a transaction whose
    rollback releases; `stream` measures time to first token (and counts tokens from chunks)."""
    request, services = ctx.request, ctx.services
    pool = cat.pool(ctx.catalog, choice.pool)
    record = dict(
        ts=datetime.now(UTC),
        request_id=request.request_id,
        tenant=request.tenant,
        fragment_id=fragment.id,
        task_type=fragment.task_type,
        strategy=request.strategy,
        model=choice.model,
        backend=pool.backend,
        pool=pool.id,
        tier=pool.tier,
        allocation_id=None,
        tflops=choice.tflops,
        vram_gb=choice.vram_gb,
    )
    allocation_id = new_allocation_id()
    t0 = time.perf_counter()
    held, tenant_held = HELD.labels(pool.backend), TENANT_HELD.labels(request.tenant)
    allocation = None
    try:
        async with atransaction():
            allocation = await allocate(services, request.tenant, request.request_id, choice, ctx.wait_s, allocation_id)
            held_from = time.perf_counter()
            held.inc()
            tenant_held.inc()
            # before each model call, once its slice is held (calls waiting for room see the spend
            # of those before them): would it overrun the budget? If so the rollback releases it
            await within_budget(ctx, choice.est_cost_usd)
            ctx.log.info(
                "fragment %s: allocated %s on %s (%g TFLOPS, %g GB)",
                fragment.id,
                allocation.allocation_id,
                allocation.pool,
                allocation.tflops,
                allocation.vram_gb,
            )
            progress.emit(
                request.request_id,
                "allocated",
                fragment_id=fragment.id,
                model=allocation.model,
                pool=allocation.pool,
                allocation_id=allocation.allocation_id,
            )
            record["allocation_id"] = allocation.allocation_id
            record["queue_s"] = max(0.0, (allocation.created_at - record["ts"]).total_seconds())
            t1 = time.perf_counter()
            completion = await infer(services, allocation, text, request.constraints.max_tokens, stream)
            t2 = time.perf_counter()
            # billed while the slice is still held, so a call waiting for this room checks the
            # budget with this call's spend counted (released first, it could slip in before it)
            tokens = completion.tokens_in + completion.tokens_out
            model = cat.model(ctx.catalog, choice.model)
            record.update(
                tokens_in=completion.tokens_in,
                tokens_out=completion.tokens_out,
                cost_usd=fragment_cost(model, pool, time.perf_counter() - held_from, tokens, completion.cost_usd),
            )
            await (await services.ledger()).record_spend(
                allocation.allocation_id, request.tenant, request.request_id, record["cost_usd"]
            )
            t3 = time.perf_counter()
            ended_at = await release(services, allocation)
            t4 = time.perf_counter()
            ctx.log.info(
                "fragment %s: released %s after %.2fs",
                fragment.id,
                allocation.allocation_id,
                (ended_at - allocation.created_at).total_seconds(),
            )
            progress.emit(
                request.request_id,
                "completed",
                fragment_id=fragment.id,
                model=allocation.model,
                pool=allocation.pool,
                allocation_id=allocation.allocation_id,
                tokens_out=completion.tokens_out,
            )
    except BaseException as exc:
        if allocation is None:
            # allocate did not hand its slice back (it failed, or was cancelled after reserving and
            # then crashed, and a crashed task stages no rollback hook): release it here, if reserved
            await release_if_reserved(services, choice.backend, allocation_id, request.tenant)
        _keep(
            ctx.records,
            TelemetryRecord(
                **record, allocate_s=time.perf_counter() - t0, outcome="error", error_class=type(exc).__name__
            ),
        )
        raise
    finally:
        if allocation is not None:
            held.dec()  # released by the release task or, on failure, by the rollback hook
            tenant_held.dec()
    timings = Timings(allocate_s=t1 - t0, first_token_s=completion.first_token_s, infer_s=t2 - t1, release_s=t4 - t3)
    _keep(ctx.records, TelemetryRecord(**record, **timings.model_dump(), outcome="ok"))
    return FragmentResult(
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
        cost_usd=record["cost_usd"],
        reason=choice.reason,
        attempts=attempt,
    )


def _keep(records: list[TelemetryRecord], record: TelemetryRecord) -> None:
    observe(record)
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
