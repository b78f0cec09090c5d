"""B past its own budget: calls fired at once cannot together overrun B's day budget (each
reserves its worst case under B's row lock in the ledger before it runs), and a call cancelled
while it runs is billed for what it used, not free. Through the flow, on a local model."""

from __future__ import annotations

import asyncio
import uuid

from apps.isolation.report import B, Report, Target, catalog_with
from homeskillet.errors import CovenantViolation
from homeskillet.schemas import EPS, ModelSpec, PoolSpec

PARALLEL = 8  # B's requests fired at once
LONG = "Count from 1 to 300, one number per line."  # a call that runs long enough to be cancelled


def _local_model_and_pool(target: Target) -> tuple[ModelSpec, PoolSpec]:
    """A local model, and the local pool with the most room for its slices (calls at once)."""
    catalog = target.services.catalog
    model = next(m for m in catalog.models if m.serving.kind == "llama_cpp")
    pools = [p for p in catalog.pools if p.backend == "local" and p.tflops >= model.tflops]
    pool = max(pools, key=lambda p: min(p.tflops / model.tflops, p.vram_gb / max(model.vram_gb, EPS)))
    return model, pool


def _request_id(what: str) -> str:
    return f"iso-cost-{what}-{uuid.uuid4().hex[:8]}"


async def attacks(report: Report, target: Target) -> None:
    await _overrun_with_parallel_calls(report, target)
    await _cancel_to_run_free(report, target)


async def _overrun_with_parallel_calls(report: Report, target: Target) -> None:
    """B's budget leaves room for one call's worst case beyond what B spent already; B fires
    PARALLEL requests at once on a pool with room for all their slices."""
    from flows.fusion import fuse_request
    from tasks.routing import worst_case_cost

    services = target.services
    ledger = await services.ledger()
    model, pool = _local_model_and_pool(target)
    constraints = {"allowed_models": [model.name], "pool": pool.id, "max_tokens": 32, "split": False}
    worst = worst_case_cost(model, pool, "Say hi.", 32, services.settings.infer_timeout_s)

    async def budget_now() -> float:
        day, _ = await ledger.spend(B)
        return day + await ledger.reserved(B) + 1.5 * worst

    # control: one call within the budget runs and is billed
    budget = await budget_now()
    with catalog_with(services, {"budget_usd_per_day": budget}) as path:
        request_id = _request_id("one")
        try:
            result = await fuse_request(
                prompt="Say hi.", tenant=B, request_id=request_id, constraints=constraints, catalog_path=str(path)
            )
            billed = [r["cost_usd"] for r in await ledger.request_spend(B, request_id) if r["state"] == "settled"]
            control = billed == [result.cost_usd] and result.cost_usd > 0
        except CovenantViolation:
            control = False

    budget = await budget_now()
    with catalog_with(services, {"budget_usd_per_day": budget}) as path:
        outcomes = await asyncio.gather(
            *(
                fuse_request(
                    prompt="Say hi.",
                    tenant=B,
                    request_id=_request_id(f"parallel-{i}"),
                    constraints=constraints,
                    catalog_path=str(path),
                )
                for i in range(PARALLEL)
            ),
            return_exceptions=True,
        )
    refusals = [o for o in outcomes if isinstance(o, CovenantViolation) and o.term == "budget_usd_per_day"]
    others = [o for o in outcomes if isinstance(o, BaseException) and o not in refusals]
    day, _ = await ledger.spend(B)
    used = day + await ledger.reserved(B)
    report.check(
        "overrun B's own day budget with parallel calls",
        f"{PARALLEL} fuse_request at once, budget_usd_per_day",
        used <= budget + EPS and bool(refusals) and not others,
        control=control,
        detail=f"{PARALLEL - len(refusals) - len(others)} ran, {len(refusals)} refused"
        + (f", {len(others)} failed otherwise ({type(others[0]).__name__}: {others[0]})" if others else "")
        + f"; ${used:.8f} spent and reserved of ${budget:.8f}",
    )


async def _cancel_to_run_free(report: Report, target: Target) -> None:
    """B starts a call, and cancels its request once the call's slice is held and inference is
    under way: the call must still be billed."""
    from flows.fusion import fuse_request

    services = target.services
    ledger = await services.ledger()
    model, pool = _local_model_and_pool(target)
    with catalog_with(services, {}) as path:

        def request(prompt: str, request_id: str, max_tokens: int):
            constraints = {"allowed_models": [model.name], "pool": pool.id, "max_tokens": max_tokens, "split": False}
            return fuse_request(
                prompt=prompt, tenant=B, request_id=request_id, constraints=constraints, catalog_path=str(path)
            )

        # control: a completed call is billed
        done_id = _request_id("completed")
        result = await request("Say hi.", done_id, 4)
        done = await ledger.request_spend(B, done_id)
        control = [(r["state"], r["cost_usd"]) for r in done] == [("settled", result.cost_usd)] and result.cost_usd > 0

        cancelled_id = _request_id("cancelled")
        run = asyncio.create_task(request(LONG, cancelled_id, 256))
        deadline = asyncio.get_running_loop().time() + 120
        while not await ledger.request_spend(B, cancelled_id) and not run.done():
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # inference is under way
        run.cancel()
        try:
            await run
            cancelled = False
        except asyncio.CancelledError:
            cancelled = True
        except Exception:  # noqa: BLE001 (the call failed instead: it proves nothing about cancellation)
            cancelled = False
    rows = await ledger.request_spend(B, cancelled_id)
    billed = [r["cost_usd"] for r in rows if r["state"] == "settled"]
    report.check(
        "cancel a call to run it for free",
        "fuse_request cancelled while its model call runs",
        bool(billed) and all(c > 0 for c in billed) and len(billed) == len(rows),
        control=control and cancelled,
        detail=f"billed {', '.join(f'${c:.8f}' for c in billed) or 'nothing'}"
        + ("" if cancelled else "; the call was not cancelled mid-run"),
    )
