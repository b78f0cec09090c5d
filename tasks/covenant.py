"""Covenants: what a tenant's contract allows, checked once per concern.

- routing: `check_request` refuses a request that explicitly asks for what the covenant forbids
  (a model, tier, pool, region, backend or strategy); `restrict` narrows the catalog a request is
  routed in to what the covenant allows, so a request can narrow its covenant, never widen it;
- size: `check_prompt` (prompt tokens) before the split, `check_fragments` after it, before
  anything is allocated;
- budgets: `check_budget`, against the spend the ledger recorded and the reservations open: an
  early refusal before a request starts (`within_budget`), and before each model call the
  reservation of its worst case under the tenant's row lock (`reserve_budget`);
- held TFLOPS/VRAM and concurrent requests: the ledger (`reserve`, `admit`), under row locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from homeskillet.errors import CovenantViolation
from homeskillet.schemas import EPS, Catalog, Covenant, InferenceRequest, Plan, PoolSpec
from tasks.context import RunContext

if TYPE_CHECKING:
    from connectors.ledger import BudgetUse


def _allows(allowed: list | None, value: object) -> bool:
    return allowed is None or value in allowed


def pool_allowed(covenant: Covenant, pool: PoolSpec) -> str | None:
    """The first term that forbids the pool, or None."""
    for term, value in (
        ("allowed_pools", pool.id),
        ("allowed_backends", pool.backend),
        ("allowed_tiers", pool.tier),
        ("allowed_regions", pool.region),
    ):
        if not _allows(getattr(covenant, term), value):
            return term
    return None


def check_request(request: InferenceRequest, covenant: Covenant, catalog: Catalog) -> None:
    """CovenantViolation for the first thing the request explicitly asks for and the covenant
    forbids; nothing is allocated before this passes."""
    tenant, constraints = request.tenant, request.constraints

    def refuse(term: str, asked: object) -> None:
        raise CovenantViolation(tenant, term, getattr(covenant, term), f"the request asks for {asked}")

    if not _allows(covenant.allowed_strategies, request.strategy):
        refuse("allowed_strategies", f"strategy {request.strategy}")
    forbidden = [m for m in constraints.allowed_models or [] if not _allows(covenant.allowed_models, m)]
    if forbidden:
        refuse("allowed_models", f"model {', '.join(forbidden)}")
    for backend in (constraints.backend, constraints.fallback_backend):
        if backend is not None and not _allows(covenant.allowed_backends, backend):
            refuse("allowed_backends", f"backend {backend}")
    if constraints.tier is not None and not _allows(covenant.allowed_tiers, constraints.tier):
        refuse("allowed_tiers", f"tier {constraints.tier}")
    if constraints.pool is not None:
        pool = next((p for p in catalog.pools if p.id == constraints.pool), None)
        term = pool_allowed(covenant, pool) if pool is not None else None
        if term is not None:
            refuse(term, f"pool {pool.id} ({pool.backend}, {pool.tier}, region {pool.region})")


def restrict(catalog: Catalog, covenant: Covenant) -> tuple[Catalog, list[str]]:
    """The catalog as the covenant allows it, and the terms that took something out of it."""
    models = [m for m in catalog.models if _allows(covenant.allowed_models, m.name)]
    pools = [p for p in catalog.pools if pool_allowed(covenant, p) is None]
    terms = ["allowed_models"] if len(models) < len(catalog.models) else []
    terms += sorted({pool_allowed(covenant, p) for p in catalog.pools} - {None})
    return catalog.model_copy(update={"models": models, "pools": pools}), terms


def check_prompt(tenant: str, covenant: Covenant, prompt_tokens: int) -> None:
    """The largest prompt, in tokens: checked before the prompt is split."""
    if covenant.max_prompt_tokens is not None and prompt_tokens > covenant.max_prompt_tokens:
        raise CovenantViolation(
            tenant,
            "max_prompt_tokens",
            f"{covenant.max_prompt_tokens} tokens",
            f"the prompt is about {prompt_tokens} tokens",
        )


def check_fragments(tenant: str, covenant: Covenant, plan: Plan) -> None:
    """The most fragments a request may split into (the split itself stops early past it)."""
    if covenant.max_fragments is not None and len(plan.fragments) > covenant.max_fragments:
        raise too_many_fragments(tenant, covenant, str(len(plan.fragments)))


def too_many_fragments(tenant: str, covenant: Covenant, parts: str) -> CovenantViolation:
    return CovenantViolation(
        tenant, "max_fragments", f"{covenant.max_fragments} fragments", f"the request splits into {parts}"
    )


def has_budget(covenant: Covenant) -> bool:
    return covenant.budget_usd_per_day is not None or covenant.budget_usd_per_month is not None


def check_budget(
    tenant: str,
    covenant: Covenant,
    day_usd: float,
    month_usd: float,
    next_usd: float = 0.0,
    reserved_usd: float = 0.0,
    worst_case: bool = False,
) -> None:
    """CovenantViolation when the budget is used up, or the next call would overrun it: its
    estimate (`worst_case` False) or the most it can cost (True), on top of the settled spend and
    the worst cases reserved for the calls running now (`reserved_usd`, counted in both periods)."""
    for term, limit, spent, period in (
        ("budget_usd_per_day", covenant.budget_usd_per_day, day_usd, "today"),
        ("budget_usd_per_month", covenant.budget_usd_per_month, month_usd, "this month"),
    ):
        if limit is None:
            continue
        used = spent + reserved_usd
        if used >= limit - EPS or used + next_usd > limit + EPS:
            usage = f"${spent:.8f} spent {period}"
            if reserved_usd:
                usage += f" and ${reserved_usd:.8f} reserved for calls running"
            if not next_usd:
                detail = "used up"
            elif worst_case:
                detail = f"the next call may cost up to ${next_usd:.8f}"
            else:
                detail = f"the next call is estimated at ${next_usd:.8f}"
            raise CovenantViolation(tenant, term, f"${limit:g}", usage, detail)


async def within_budget(ctx: RunContext, next_usd: float = 0.0) -> None:
    """An early refusal before a request starts: `check_budget` against the tenant's settled
    spend and the reservations open now, with one call's estimate. It reserves nothing: the
    guarantee is each call's reservation (`reserve_budget`)."""
    if has_budget(ctx.covenant):
        use = await (await ctx.services.ledger()).budget_use(ctx.request.tenant)
        check_budget(ctx.request.tenant, ctx.covenant, use.day_usd, use.month_usd, next_usd, use.reserved_usd)


async def reserve_budget(ctx: RunContext, allocation_id: str, worst_usd: float) -> None:
    """Before a model call: reserve its worst-case cost (`tasks.routing.worst_case_cost`) under
    the tenant row's lock in the ledger, or refuse with CovenantViolation when the settled spend,
    the reservations open and this worst case would overrun a budget. Calls racing in any number
    of processes are checked one at a time, each against the others' reservations; the call
    settles its real cost afterwards (`Ledger.record_spend`), whatever its outcome."""
    tenant, covenant = ctx.request.tenant, ctx.covenant

    def check(use: BudgetUse) -> None:
        if has_budget(covenant):
            check_budget(tenant, covenant, use.day_usd, use.month_usd, worst_usd, use.reserved_usd, worst_case=True)

    await (await ctx.services.ledger()).reserve_spend(allocation_id, tenant, ctx.request.request_id, worst_usd, check)
