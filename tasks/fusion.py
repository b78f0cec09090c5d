"""Fusion: fragment answers become one answer, with per-fragment provenance."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from homeskillet.schemas import FragmentResult, FusionResult, Plan


def fuse_results(plan: Plan, results: dict[str, FragmentResult], tenant: str, wall_s: float) -> FusionResult:
    """`ordered`: the answers in the prompt's order, each under its part; `reduce`: the answer of the
    final fragment, which already combined the others."""
    missing = [f.id for f in plan.fragments if f.id not in results]
    if missing:
        raise ValueError(f"cannot fuse: no result for fragment(s) {', '.join(missing)}")
    ordered = [results[f.id] for f in plan.fragments]
    if plan.fusion == "reduce":
        depended_on = {dep for f in plan.fragments for dep in f.depends_on}
        (sink,) = [f for f in plan.fragments if f.id not in depended_on]
        answer = results[sink.id].text.strip()
    elif len(plan.fragments) == 1:
        answer = ordered[0].text.strip()
    else:
        answer = "\n\n".join(
            f"{i}. {fragment.text}\n{results[fragment.id].text.strip()}"
            for i, fragment in enumerate(plan.fragments, start=1)
        )
    return FusionResult(
        request_id=plan.request_id,
        tenant=tenant,
        answer=answer,
        fusion=plan.fusion,
        fragments=ordered,
        cost_usd=sum(r.cost_usd for r in ordered),
        wall_s=wall_s,
    )


@task(name="fuse", cache_policy=NO_CACHE, persist_result=False)
async def fuse(plan: Plan, results: dict[str, FragmentResult], tenant: str, wall_s: float) -> FusionResult:
    return fuse_results(plan, results, tenant, wall_s)


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
