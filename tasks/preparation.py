"""The request preamble, written once: a request becomes the validated, covenant-restricted plan
and run context before anything is allocated.

`prepare` is what the flow, the MCP `plan` tool and the benchmarks call, so what `plan` shows is
what `fuse` runs: the same covenant checks, the same restricted catalog, the same routing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import ValidationError

from homeskillet.errors import InvalidRequest, NoRoute
from homeskillet.schemas import ChatTurn, Constraints, InferenceRequest, ModelChoice, Plan, TaskType
from tasks import runtime
from tasks.context import RunContext
from tasks.covenant import check_fragments, check_prompt, check_request, restrict, too_many_fragments
from tasks.decompose import MAX_FRAGMENTS, TooManyParts, decompose_off_loop, estimate_tokens
from tasks.resources import transcript
from tasks.routing import fragment_budget, max_context, preview
from tasks.runtime import Services

# prompt, request_id, max_context, max_tokens, split, task_type, max_fragments → the plan
Decomposer = Callable[[str, str, int, int, bool, TaskType | None, int], Awaitable[Plan]]


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: its context (request, restricted catalog, covenant, budget), its plan,
    and each fragment's first choice of model and pool."""

    ctx: RunContext
    plan: Plan
    choices: dict[str, ModelChoice]

    @property
    def est_cost_usd(self) -> float:
        return sum(c.est_cost_usd for c in self.choices.values())


def make_request(
    prompt: str,
    tenant: str,
    strategy: str = "single",
    constraints: Constraints | dict | None = None,
    request_id: str | None = None,
    context: list[dict] | list[ChatTurn] | None = None,
) -> InferenceRequest:
    """The validated request, or InvalidRequest naming each problem. `context` is the system
    prompt and earlier turns of a conversation ({"role", "content"}), sent before every fragment."""
    fields = {"prompt": prompt, "tenant": tenant, "strategy": strategy, "constraints": constraints or {}}
    if context is not None:
        fields["context"] = context
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


async def split_here(
    prompt: str,
    request_id: str,
    max_context: int,
    max_tokens: int,
    split: bool,
    task_type: TaskType | None,
    max_fragments: int = MAX_FRAGMENTS,
) -> Plan:
    """Decomposition in this process, with no task run (the default outside a flow)."""
    return await decompose_off_loop(prompt, request_id, max_context, max_tokens, split, task_type, max_fragments)


async def prepare(
    request: InferenceRequest,
    services: Services,
    log: logging.Logger | logging.LoggerAdapter,
    routing_stats: str | None = None,
    decomposer: Decomposer = split_here,
) -> Prepared:
    """Check the request against its tenant's covenant, restrict the catalog to what the covenant
    allows, decompose, check the plan's size, and choose each fragment's model and pool.

    Raises UnknownTenant, CovenantViolation (the request asks for what its covenant forbids, or is
    too large), InvalidRequest (a bad routing-stats file) or NoRoute (a fragment has no model
    within the constraints), all before anything is allocated. `decomposer` is where the plan is
    made: the flow passes its `decompose` task so the split shows as a task run.
    """
    covenant = services.covenant(request.tenant)  # the tenant's covenant now (an unknown tenant fails here)
    check_request(request, covenant, services.catalog)  # asks for nothing the covenant forbids
    allowed, terms = restrict(services.catalog, covenant)  # routed only where the covenant allows
    constraints = request.constraints
    learned = runtime.routing_stats(routing_stats) if routing_stats is not None else None  # a bad file fails here
    router = (
        runtime.router_for(request.tenant, services.settings)
        if request.strategy in ("learned", "auto", "cascade")  # a cascade takes its threshold from it
        else None
    )
    if request.strategy == "learned" and router is None:
        raise NoRoute("the learned strategy needs a trained router, and there is none (`homeskillet learn-routing`)")
    # the conversation before the prompt is sent with every fragment: it counts in each one's size
    extra = estimate_tokens(transcript(request.context)) if request.context else 0
    check_prompt(request.tenant, covenant, estimate_tokens(request.prompt) + extra)  # before the split: it is work
    largest = max_context(allowed, constraints)
    if extra >= largest:
        raise InvalidRequest(
            f"the conversation is about {extra} tokens, beyond every allowed model's context (largest {largest})"
        )
    most = min(covenant.max_fragments or MAX_FRAGMENTS, MAX_FRAGMENTS)
    try:
        plan = await decomposer(
            request.prompt,
            request.request_id,
            largest - extra,
            constraints.max_tokens,
            constraints.split,
            constraints.task_type,
            most,  # the split stops as soon as it finds more parts
        )
    except TooManyParts as exc:
        if most < MAX_FRAGMENTS:  # the covenant's limit, not the orchestrator's
            raise too_many_fragments(request.tenant, covenant, f"more than {exc.limit}") from None
        raise
    if extra:
        fragments = [f.model_copy(update={"est_prompt_tokens": f.est_prompt_tokens + extra}) for f in plan.fragments]
        plan = plan.model_copy(update={"fragments": fragments})
    check_fragments(request.tenant, covenant, plan)
    ctx = RunContext(
        request,
        services,
        allowed,
        log,
        fragment_budget(plan, constraints),
        learned,
        covenant=covenant,
        covenant_terms=terms,
        router=router,
    )
    return Prepared(ctx, plan, preview(plan, ctx))  # every fragment has a model before anything is allocated
