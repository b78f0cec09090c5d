"""Routing: each fragment goes to the most suitable model, on the cheapest pool that can hold it,
within the request's constraints. Pure functions; the task wraps `route_plan`."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from homeskillet import catalog as cat
from homeskillet.errors import NoRoute
from homeskillet.schemas import Catalog, Constraints, Fragment, ModelChoice, ModelSpec, Plan, PoolSpec

EPS = 1e-9


def slice_rate(model: ModelSpec, pool: PoolSpec) -> float:
    """US$ per hour for the model's slice of the pool: its larger share of TFLOPS or of VRAM."""
    return pool.price_per_hour * max(model.tflops / pool.tflops, model.vram_gb / pool.vram_gb)


def fits(model: ModelSpec, pool: PoolSpec) -> bool:
    return model.tflops <= pool.tflops + EPS and model.vram_gb <= pool.vram_gb + EPS


def fragment_cost(
    model: ModelSpec, pool: PoolSpec, held_s: float, tokens: int, reported_usd: float | None = None
) -> float:
    """What a fragment cost: its slice for the time it was held, plus the provider's reported
    price for the call or, when it reports none, the catalog's per-token price."""
    usage = model.cost_per_1k_tokens * tokens / 1000 if reported_usd is None else reported_usd
    return slice_rate(model, pool) * held_s / 3600 + usage


def estimate_cost(model: ModelSpec, pool: PoolSpec, prompt_tokens: int, max_tokens: int) -> float:
    """Expected cost before running: decode at the model's measured speed, prefill ~10x faster."""
    seconds = max_tokens / model.tokens_per_second + prompt_tokens / (10 * model.tokens_per_second)
    return fragment_cost(model, pool, seconds, prompt_tokens + max_tokens)


def candidates(catalog: Catalog, constraints: Constraints) -> tuple[list[ModelSpec], list[PoolSpec]]:
    """The models and pools the constraints allow; a clear error when they leave nothing usable."""
    models = (
        [cat.model(catalog, name) for name in constraints.allowed_models]
        if constraints.allowed_models is not None
        else list(catalog.models)
    )
    if not models:
        raise NoRoute("allowed_models is empty: no model may run this request")
    if constraints.pool is not None:  # a named pool implies its backend
        pools = [cat.pool(catalog, constraints.pool)]
        if constraints.tier is not None and pools[0].tier != constraints.tier:
            raise NoRoute(f"pool {pools[0].id!r} is {pools[0].tier}, but the request asks for tier {constraints.tier}")
    else:
        pools = [p for p in catalog.pools if p.backend == constraints.backend and constraints.tier in (None, p.tier)]
        if not pools:
            tier = f" of tier {constraints.tier}" if constraints.tier else ""
            raise NoRoute(f"no {constraints.backend} pool{tier} in the catalog")
    usable = [m for m in models if any(fits(m, p) for p in pools)]
    if not usable:
        smallest = min(models, key=lambda m: (m.vram_gb, m.tflops))
        where = ", ".join(f"{p.id} ({p.tflops:g} TFLOPS, {p.vram_gb:g} GB)" for p in pools)
        raise NoRoute(
            f"pool {where} is too small for any allowed model; the smallest, {smallest.name}, "
            f"needs {smallest.tflops:g} TFLOPS and {smallest.vram_gb:g} GB"
        )
    return usable, pools


def max_context(catalog: Catalog, constraints: Constraints) -> int:
    models, _ = candidates(catalog, constraints)
    return max(m.context_length for m in models)


def route_fragment(
    fragment: Fragment, models: list[ModelSpec], pools: list[PoolSpec], max_tokens: int, budget_usd: float | None
) -> ModelChoice:
    """Best quality for the fragment's task type; ties go to the cheaper option."""
    options = []
    for model in models:
        if fragment.est_prompt_tokens + max_tokens > model.context_length:
            continue
        quality = model.task_types.get(fragment.task_type, 0.0)
        for pool in pools:
            if fits(model, pool):
                cost = estimate_cost(model, pool, fragment.est_prompt_tokens, max_tokens)
                options.append((quality, cost, model, pool))
    if not options:
        raise NoRoute(f"fragment {fragment.id} ({fragment.est_prompt_tokens} tokens) fits no allowed model's context")
    affordable = [o for o in options if budget_usd is None or o[1] <= budget_usd + EPS]
    if not affordable:
        cheapest = min(options, key=lambda o: o[1])
        raise NoRoute(
            f"no model fits max_cost: fragment {fragment.id} may spend ${budget_usd:.8f}, the cheapest option "
            f"({cheapest[2].name} on {cheapest[3].id}) is estimated at ${cheapest[1]:.8f}"
        )
    quality, cost, model, pool = max(affordable, key=lambda o: (round(o[0], 6), -o[1]))
    return ModelChoice(
        fragment_id=fragment.id,
        model=model.name,
        pool=pool.id,
        tier=pool.tier,
        tflops=model.tflops,
        vram_gb=model.vram_gb,
        est_cost_usd=cost,
        reason=f"{fragment.task_type}: quality {quality:g} "
        f"({'measured' if fragment.task_type in model.measured_task_types else 'catalog prior'}), "
        f"est ${cost:.8f} on {pool.tier} pool {pool.id}",
    )


def fragment_budget(plan: Plan, constraints: Constraints) -> float | None:
    """max_cost is shared evenly between the fragments."""
    return None if constraints.max_cost_usd is None else constraints.max_cost_usd / len(plan.fragments)


def route_plan(plan: Plan, catalog: Catalog, constraints: Constraints) -> dict[str, ModelChoice]:
    """A choice for every fragment."""
    models, pools = candidates(catalog, constraints)
    budget = fragment_budget(plan, constraints)
    return {f.id: route_fragment(f, models, pools, constraints.max_tokens, budget) for f in plan.fragments}


def reroute(
    fragment: Fragment, catalog: Catalog, constraints: Constraints, budget_usd: float | None, why: str, **changes
) -> ModelChoice:
    """A new choice for one fragment under changed constraints (another tier, another backend)."""
    changed = constraints.model_copy(update={"pool": None, **changes})
    models, pools = candidates(catalog, changed)
    choice = route_fragment(fragment, models, pools, changed.max_tokens, budget_usd)
    return choice.model_copy(update={"reason": f"{why}; {choice.reason}"})


@task(name="route", cache_policy=NO_CACHE)
async def route(plan: Plan, catalog: Catalog, constraints: Constraints) -> dict[str, ModelChoice]:
    return route_plan(plan, catalog, constraints)


def live_stats(fragment: Fragment, catalog: Catalog, constraints: Constraints):
    """Quality (measured by the benchmark, else the catalog's prior) and expected cost (cheapest
    pool that fits) of every allowed model for this fragment, in the form the routing policy
    learns from recordings."""
    from tasks.policy import Stats

    models, pools = candidates(catalog, constraints)
    quality, cost = {}, {}
    for model in models:
        if fragment.est_prompt_tokens + constraints.max_tokens > model.context_length:
            continue
        fitting = [p for p in pools if fits(model, p)]
        if fitting:
            quality[model.name] = model.task_types.get(fragment.task_type, 0.0)
            cost[model.name] = min(estimate_cost(model, p, fragment.est_prompt_tokens, constraints.max_tokens)
                                   for p in fitting)  # fmt: skip
    if not quality:
        raise NoRoute(f"fragment {fragment.id} ({fragment.est_prompt_tokens} tokens) fits no allowed model's context")
    # a catalog's models differ in price far less than API models do: any cheaper model is "cheap"
    return Stats({fragment.task_type: quality}, {fragment.task_type: cost}, cheap_share=0.999)
