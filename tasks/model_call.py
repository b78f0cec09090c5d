"""One model call, the unit of work every fragment is made of: allocate a GPU share → reserve
its worst-case cost → infer → settle the spend → release.

It runs inside a Prefect transaction: if anything fails or is cancelled before the release, the
allocate task's rollback hook releases the slice. Once the slice is held, the call's worst case is
reserved against the tenant's budget in the ledger (refused: the rollback releases the slice);
after inference the reservation is settled at the real cost, while the slice is still held. A call
that fails or is cancelled after its reservation is billed for what it used: its slice's time and
any tokens known. A crashed process runs no hooks; the ledger's lease expiry and holder check are
the backstop, and its reservation is settled at the worst case. Every call, success or failure,
leaves one telemetry record in the run context.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from prefect.transactions import atransaction

from connectors.ledger import new_allocation_id
from connectors.telemetry import HELD, TENANT_HELD, observe
from homeskillet import catalog as cat
from homeskillet.schemas import (
    EPS,
    Completion,
    Fragment,
    FragmentResult,
    ModelChoice,
    ModelSpec,
    PoolSpec,
    TelemetryRecord,
    Timings,
)
from tasks import progress
from tasks.confidence import token_confidence
from tasks.context import RunContext
from tasks.covenant import reserve_budget
from tasks.resources import allocate, infer, release, release_if_reserved, transcript
from tasks.routing import fragment_cost, worst_case_cost


async def call_model(
    fragment: Fragment,
    text: str,
    choice: ModelChoice,
    ctx: RunContext,
    number: int = 1,
    stream: bool = False,
    on_text: Callable[[str], None] | None = None,
    prefill: str = "",
) -> FragmentResult:
    """One model call for a fragment: allocate → reserve → infer → settle → release, inside a
    transaction whose rollback releases. `number` is the call's place among the fragment's calls;
    `stream` measures time to first token (and counts tokens from chunks) and hands each new piece
    of the answer to `on_text` as it arrives. `prefill` is the start of the answer, already sent by
    an earlier call that failed: the model continues it, and the result's text starts with it.
    Every call asks for its answer tokens' log-probabilities (the client's default); the result's
    `token_confidence` is the model's probability of its answer from them (`tasks.confidence`),
    None when the provider gave none."""
    request, services = ctx.request, ctx.services
    pool = cat.pool(ctx.allowed, choice.pool)
    model = cat.model(ctx.allowed, choice.model)
    # the context and a prefill go with the text: their tokens are billed too
    sent = transcript(request.context) + text + prefill
    worst = worst_case_cost(model, pool, sent, request.constraints.max_tokens, services.settings.infer_timeout_s)
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
    allocation = completion = None
    reserving = settled = False  # from `reserving` on, a reservation may exist: it is settled, whatever happens
    try:
        async with atransaction():
            allocation = await allocate(services, request.tenant, request.request_id, choice, ctx.wait_s, allocation_id)
            held_from = time.perf_counter()
            held.inc()
            tenant_held.inc()
            # before the model call, once its slice is held: reserve its worst case against the
            # budget, or refuse (the rollback releases the slice). Only calls holding a slice reserve
            reserving = True
            await reserve_budget(ctx, allocation.allocation_id, worst)
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
            completion = await infer(
                services,
                allocation,
                text,
                request.constraints.max_tokens,
                stream,
                request.context,
                prefill,
                on_text,
                request.constraints.temperature,
                request.constraints.stop,
            )
            t2 = time.perf_counter()
            # settled while the slice is still held: its reservation becomes the real cost
            record.update(tokens_in=completion.tokens_in, tokens_out=completion.tokens_out)
            record["cost_usd"] = _used(model, pool, held_from, completion)
            if record["cost_usd"] > worst + EPS:
                ctx.log.warning(
                    "fragment %s: %s cost $%.8f, more than the $%.8f reserved for it; billed what it cost",
                    fragment.id,
                    allocation.allocation_id,
                    record["cost_usd"],
                    worst,
                )
            await (await services.ledger()).record_spend(
                allocation.allocation_id, request.tenant, request.request_id, record["cost_usd"]
            )
            settled = True
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
        if reserving and not settled:
            # failed or cancelled after its reservation: billed for what it used (shielded, as the
            # spend of a completed call is), or what it cost if it got that far; a refused
            # reservation, never written, bills nothing; a settlement already written stays
            if "cost_usd" not in record:
                record["cost_usd"] = _used(model, pool, held_from, completion)
            try:
                await (await services.ledger()).record_spend(
                    allocation_id, request.tenant, request.request_id, record["cost_usd"], reserved_only=True
                )
            except Exception as settle_error:  # the call's own failure is what the caller must see;
                # the reservation stays open, and is settled at its worst case once its lease is over
                ctx.log.warning("fragment %s: %s not settled: %s", fragment.id, allocation_id, settle_error)
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
        attempts=number,
        token_confidence=token_confidence(fragment.task_type, completion.logprobs),
    )


def _used(model: ModelSpec, pool: PoolSpec, held_from: float, completion: Completion | None) -> float:
    """What a call used until now: its slice since it was held, and the tokens of its completion
    (or the price its provider reported), if it got one."""
    tokens = completion.tokens_in + completion.tokens_out if completion is not None else 0
    reported = completion.cost_usd if completion is not None else None
    return fragment_cost(model, pool, time.perf_counter() - held_from, tokens, reported)


def _keep(records: list[TelemetryRecord], record: TelemetryRecord) -> None:
    observe(record)
    records.append(record)
