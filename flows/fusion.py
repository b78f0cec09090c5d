"""`fuse_request`: prepare (covenant, decompose, route) → per fragment, `tasks.routing.route` →
one `tasks.model_call.call_model` per model call (allocate → infer → spend → release) → fuse.

Composition only: fragments whose dependencies are done run concurrently, the first failure
cancels the rest, and the request is admitted to the ledger (concurrency cap, quota) for its run.

Progress events (`tasks.progress`, by request id): each model call's `allocated`/`completed`
and, for a request that streams (`stream=True`; listeners of other requests expect only those two):
- `planned` once the plan is made: `fusion` ("ordered" | "reduce") and `fragments`, a list of
  {"id", "text", "depends_on"} in plan order;
- `token` (fragments routed to one model call): `fragment_id`, `text`, the next piece of that
  fragment's answer, in order, carried across a failed call's re-run;
- `answered` when a fragment's route returns: `fragment_id`, `text` (its `FragmentResult.text`);
  a streamed fragment's `token` pieces, joined, are a start of it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.context import FlowRunContext

from connectors.telemetry import REQUESTS
from homeskillet.schemas import (
    Constraints,
    Fragment,
    FragmentResult,
    FusionResult,
    InferenceRequest,
    ModelChoice,
    Plan,
    Strategy,
)
from tasks import progress, runtime
from tasks.context import RunContext
from tasks.covenant import within_budget
from tasks.decompose import decompose, fill
from tasks.fusion import fragment_row, fuse
from tasks.model_call import call_model
from tasks.preparation import make_request, prepare
from tasks.routing import Stream, route
from tasks.telemetry import record_telemetry


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
    context: list[dict] | None = None,
    admitted: str | None = None,
    stream: bool = False,
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
        context: The conversation before the prompt, in order: turns {"role": "system" | "user" |
            "assistant", "content": ...}. Every fragment's model call sees them before its own
            text; they count against the prompt's size limit.
        admitted: The ledger key of a request its caller admitted already (`Ledger.admit`: the
            concurrency cap, quota synced) and ends itself, so that a refusal makes no flow run;
            default: the run admits the request and ends it.
        stream: The caller wants each answer's text as it is made: progress events of the request
            id say the plan (`planned`), each piece of a fragment's answer as it comes (`token`,
            for fragments routed to one model call: single, or auto choosing single) and each
            fragment's answer (`answered`); a call that fails after some of its text was sent is
            re-run to continue that text. The result is the same as without.
    """
    started = time.perf_counter()
    request = make_request(prompt, tenant, strategy, constraints, request_id, context)
    services = runtime.services(catalog_path)
    prepared = await prepare(request, services, get_run_logger(), routing_stats, decomposer=decompose)
    plan, ctx = prepared.plan, prepared.ctx
    ctx.stream = stream
    if stream:
        progress.emit(
            request.request_id,
            "planned",
            fusion=plan.fusion,
            fragments=[{"id": f.id, "text": f.text, "depends_on": list(f.depends_on)} for f in plan.fragments],
        )
    await within_budget(ctx, min(c.est_cost_usd for c in prepared.choices.values()))  # early refusal; calls reserve
    ledger = await services.ledger()
    running = admitted or await ledger.admit(request.tenant, request.request_id, ctx.covenant)  # cap, quota synced
    try:
        results = await run_plan(plan, ctx)
    except BaseException:
        REQUESTS.labels("error").inc()
        await _record(ctx)
        raise
    finally:
        if admitted is None:
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
    blocks the event loop while it does.)"""
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
        await record_telemetry(ctx.services, ctx.records, ctx.routes)
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
    model call on its own allocation; a streamed call's pieces go out as `token` events."""
    answers = {r.fragment_id: r.text.strip() for r in await asyncio.gather(*upstream)}
    request_id = ctx.request.request_id

    async def call(
        choice: ModelChoice, text: str, number: int, stream: Stream | None, temperature: float | None = None
    ) -> FragmentResult:
        if temperature is not None:  # a sample, at its own temperature (the run's records are shared)
            constraints = ctx.constraints.model_copy(update={"temperature": temperature})
            sampled = replace(ctx, request=ctx.request.model_copy(update={"constraints": constraints}))
            return await call_model(fragment, text, choice, sampled, number)
        if stream is None:
            return await call_model(fragment, text, choice, ctx, number)

        def on_text(piece: str) -> None:
            stream.add(piece)
            progress.emit(request_id, "token", fragment_id=fragment.id, text=piece)

        return await call_model(
            fragment, text, choice, ctx, number, stream=True, on_text=on_text, prefill=stream.prefill
        )

    result = await route(fragment, fill(fragment, answers), ctx, call)
    if ctx.stream:
        progress.emit(request_id, "answered", fragment_id=fragment.id, text=result.text)
    return result


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
