"""Routing: where a fragment goes. `route` is the one function that decides it (the strategy, the
models it asks, each call's pool, re-runs after preemption or fallback); the rest are the pure
helpers it uses: which models and pools the constraints allow, what each costs, which fits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from homeskillet import catalog as cat
from homeskillet.errors import CircuitOpen, HostedAIUnavailable, InferenceError, NoRoute, Preempted
from homeskillet.schemas import (
    EPS,
    Catalog,
    Constraints,
    Fragment,
    FragmentResult,
    ModelChoice,
    ModelSpec,
    Plan,
    PoolSpec,
    RouteRecord,
)
from tasks.cascade import signal_for
from tasks.context import RunContext
from tasks.embedding import embed
from tasks.learned import predict
from tasks.strategies import SAMPLE_TEMPERATURE, Learned, Reply, Stats, choose_strategy, decide, single_model


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


# Bounds of one model call, for the worst case its reservation holds (`worst_case_cost`):
HELD_BEYOND_INFER_S = 30.0  # the slice's held time outside inference: connecting (≤ 10 s), the ledger calls
TEMPLATE_TOKENS = 64  # a chat template's tokens around the prompt


def worst_case_cost(model: ModelSpec, pool: PoolSpec, prompt: str, max_tokens: int, infer_timeout_s: float) -> float:
    """The most one call can cost, as `fragment_cost` bills it: reserved before the call runs.

        slice_rate × (infer_timeout_s + HELD_BEYOND_INFER_S) / 3600
        + cost_per_1k_tokens × min(context_length, prompt bytes + TEMPLATE_TOKENS + max_tokens) / 1000

    The slice is billed from when it is held to when inference ends, and the client's timeout
    ends a call that is not streamed; the prompt is at most a token per UTF-8 byte (byte-level
    tokenizers) plus its template, the output at most max_tokens, and both together at most the
    model's context. A streamed call that keeps sending past the timeout, or a provider that
    reports its own price (hosted·ai), can cost more: the call is billed that, and it is logged."""
    held_s = infer_timeout_s + HELD_BEYOND_INFER_S
    tokens = min(model.context_length, len(prompt.encode()) + TEMPLATE_TOKENS + max_tokens)
    return fragment_cost(model, pool, held_s, tokens)


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
        backend=pool.backend,
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


def preview(plan: Plan, ctx: RunContext) -> dict[str, ModelChoice]:
    """Before anything is allocated: for each fragment, the model the single strategy asks and its
    pool, as `route` chooses them (other strategies may ask other models as well). NoRoute when
    a fragment has no model and pool within the constraints and its budget."""
    choices = {}
    for fragment in plan.fragments:
        stats = stats_for(fragment, ctx)
        model = single_model(fragment.task_type, stats, list(stats.quality[fragment.task_type]))
        only = ctx.constraints.model_copy(update={"allowed_models": [model]})
        choices[fragment.id] = route_fragment(
            fragment, *candidates(ctx.allowed, only), ctx.constraints.max_tokens, ctx.per_call_usd
        )
    return choices


def reroute(
    fragment: Fragment, catalog: Catalog, constraints: Constraints, budget_usd: float | None, why: str, **changes
) -> ModelChoice:
    """A new choice for one fragment under changed constraints (another tier, another backend)."""
    changed = constraints.model_copy(update={"pool": None, **changes})
    models, pools = candidates(catalog, changed)
    choice = route_fragment(fragment, models, pools, changed.max_tokens, budget_usd)
    return choice.model_copy(update={"reason": f"{why}; {choice.reason}"})


def live_stats(fragment: Fragment, catalog: Catalog, constraints: Constraints) -> Stats:
    """Quality (measured by the benchmark, else the catalog's prior) and expected cost (cheapest
    pool that fits) of every allowed model for this fragment, in the form the routing strategies
    learn from recordings."""
    models, pools = candidates(catalog, constraints)
    quality, cost = {}, {}
    for model in models:
        if fragment.est_prompt_tokens + constraints.max_tokens > model.context_length:
            continue
        fitting = [p for p in pools if fits(model, p)]
        if fitting:
            quality[model.name] = model.task_types.get(fragment.task_type, 0.0)
            cost[model.name] = min(
                estimate_cost(model, p, fragment.est_prompt_tokens, constraints.max_tokens) for p in fitting
            )
    if not quality:
        raise NoRoute(f"fragment {fragment.id} ({fragment.est_prompt_tokens} tokens) fits no allowed model's context")
    # a catalog's models differ in price far less than API models do: any cheaper model is "cheap"
    return Stats({fragment.task_type: quality}, {fragment.task_type: cost}, cheap_share=0.999)


MAX_ATTEMPTS = 3  # per model call: the first try and two re-runs after preemption, fallback or a failed stream


@dataclass
class Stream:
    """A model call whose answer goes to the client as it is made. `prefill` is what earlier
    tries of the same call already sent, which this try continues; the caller `add`s each new
    piece as it is sent."""

    prefill: str = ""
    pieces: list[str] = field(default_factory=list)

    def add(self, piece: str) -> None:
        self.pieces.append(piece)

    @property
    def sent(self) -> str:
        """All the text the client has of this call's answer."""
        return self.prefill + "".join(self.pieces)


def continues_prefill(model: ModelSpec) -> bool:
    """Whether a model continues an answer it is given the start of: llama.cpp's server does (a
    final assistant message), and so does any completion prompt; another OpenAI-compatible server
    may start a fresh answer."""
    return model.serving.kind == "llama_cpp" or model.prompt_style == "completion"


# call(choice, text, its number among the fragment's calls, its Stream or None[, a sampling
# temperature in place of the request's]) → the answer of one model call
ModelCall = Callable[..., Awaitable[FragmentResult]]


def streams(fragment: Fragment, ctx: RunContext, stats: Stats) -> bool:
    """Whether the fragment's answer streams: the request asks for it, and its route makes one
    model call whose answer stands (single, or auto choosing single); the first calls of a
    cascade, ensemble or moa may be discarded, so none of them streams."""
    if not ctx.stream:
        return False
    strategy = ctx.request.strategy
    allowed = list(stats.quality[fragment.task_type])
    if strategy == "auto" and learns(ctx, allowed):
        return True  # the learned router's model, or single: one call either way
    if strategy == "auto":
        strategy, _ = choose_strategy(fragment.task_type, stats, allowed)
    return strategy in ("single", "learned")


def learns(ctx: RunContext, allowed: list[str]) -> bool:
    """Whether the learned router routes a fragment: there is one, and it knows two or more of the
    allowed models (with one, there is nothing to choose)."""
    return ctx.router is not None and sum(m in ctx.router.heads for m in allowed) >= 2


def accept_confidence(ctx: RunContext, task: str) -> float | None:
    """The router's threshold on a cascade's first answer, for closed answers only (a choice, a
    number): a model's confidence in free text means something else, measured apart."""
    if ctx.router is None or signal_for(task) != "agreement":
        return None
    return ctx.router.accept_confidence


def quality_cost(ctx: RunContext) -> tuple[float, bool]:
    """The trade-off λ of a request: its own, else its tenant's covenant's, else the router's
    default; and whether the request or covenant set it."""
    for lam in (ctx.constraints.quality_cost, ctx.covenant.quality_cost):
        if lam is not None:
            return lam, True
    return ctx.router.quality_cost, False


async def learned_view(fragment: Fragment, text: str, ctx: RunContext, stats: Stats) -> tuple[Learned, list[float]]:
    """The learned router's view of a fragment: P(correct) of each allowed model it knows, from
    the embedding of the fragment's text (its final question, for a few-shot prompt), each
    candidate's estimated cost on its cheapest pool, and the trade-off; also the embedding, which
    the routes dataset keeps for learning from feedback."""
    router, task = ctx.router, fragment.task_type
    x = await asyncio.to_thread(embed, [text])  # ~20 ms of CPU, off the event loop
    known = [m for m in stats.quality[task] if m in router.heads]
    lam, explicit = quality_cost(ctx)
    view = Learned(
        p={m: float(predict(router.heads[m].weights, x)[0]) for m in known},
        cost={m: stats.cost[task][m] for m in known},
        quality_cost=lam,
        explicit=explicit,
        auto=router.auto.get(task),
    )
    return view, [float(v) for v in x[0]]


def stats_for(fragment: Fragment, ctx: RunContext) -> Stats:
    """The routing stats a fragment is routed by: the learned ones (a routing-stats file) for the
    allowed models that have them, else the catalog's measured or prior quality and its cost
    estimates. NoRoute when the constraints leave no model for it."""
    stats = live_stats(fragment, ctx.allowed, ctx.constraints)
    if ctx.learned is None:
        return stats
    return ctx.learned.only(fragment.task_type, list(stats.quality[fragment.task_type]))


async def route(fragment: Fragment, text: str, ctx: RunContext, call: ModelCall) -> FragmentResult:
    """Run one fragment where it belongs; every routing decision of a fragment is made here.

    1. The strategy (the request's, or for "auto" the one the stats favour for this task type)
       decides which models to ask, from the stats, and whose answer stands.
    2. Each model call goes to the cheapest pool that fits the model within the call's share of
       the budget (`route_fragment`), under the request's constraints.
    3. A call whose GPU share is preempted re-runs on another pool of the same backend (dedicated
       if the request says so); one whose backend is unavailable (retries spent, circuit open)
       re-runs on the request's fallback backend. At most MAX_ATTEMPTS tries per call.
    4. A streamed call (`streams`) that fails after some of its answer was sent re-runs on the
       pool its backend's routing picks (a model server that died is started again), and so does
       a preempted or unavailable one: each new try continues the text already sent (its
       prefill), so the client's text goes on where it stopped. A call that sent nothing fails as
       it would unstreamed.
    The result keeps every call in its provenance, and the run log says what was decided, why.
    """
    constraints = ctx.constraints
    stats = stats_for(fragment, ctx)
    allowed = list(stats.quality[fragment.task_type])
    streamed = streams(fragment, ctx, stats)
    calls: list[FragmentResult] = []
    learned, embedding = None, None
    if ctx.request.strategy in ("learned", "auto") and learns(ctx, allowed):
        learned, embedding = await learned_view(fragment, text, ctx, stats)

    async def ask(model: str, prompt: str | None = None, sampled: bool = False) -> Reply:
        only = constraints.model_copy(update={"allowed_models": [model]})
        choice = route_fragment(fragment, *candidates(ctx.allowed, only), constraints.max_tokens, ctx.per_call_usd)
        sent = ""  # what earlier tries of this call streamed to the client
        continues = continues_prefill(cat.model(ctx.allowed, model))
        for number in range(1, MAX_ATTEMPTS + 1):
            ctx.log.info(
                "fragment %s: %s on %s pool %s (%s)", fragment.id, choice.model, choice.tier, choice.pool, choice.reason
            )
            stream = Stream(sent) if streamed else None
            try:
                if sampled:  # a sample of a self-consistency cascade: never streamed
                    result = await call(choice, prompt or text, number, None, SAMPLE_TEMPERATURE)
                else:
                    result = await call(choice, prompt or text, number, stream)
                break
            except Preempted:
                if number == MAX_ATTEMPTS:
                    raise
                tier = "dedicated" if constraints.on_preemption == "dedicated" else choice.tier
                why = f"attempt {number} on {choice.pool} was preempted; re-run on {tier}"
                choice = _reroute(fragment, ctx, only, why, tier=tier, backend=choice.backend)
            except HostedAIUnavailable as exc:
                fallback = constraints.fallback_backend
                if fallback is None or fallback == choice.backend or number == MAX_ATTEMPTS:
                    raise
                state = "circuit open" if isinstance(exc, CircuitOpen) else "unavailable"
                choice = _reroute(
                    fragment, ctx, only, f"{choice.backend} {state}; fell back to {fallback}", backend=fallback
                )
            except InferenceError as exc:
                if stream is None or not stream.sent or number == MAX_ATTEMPTS:
                    raise
                ctx.log.warning("fragment %s: attempt %d on %s failed: %s", fragment.id, number, choice.pool, exc)
                why = (
                    f"attempt {number} on {choice.pool} failed after {len(stream.sent)} characters were streamed; "
                    "the next try continues them"
                )
                choice = _reroute(fragment, ctx, only, why, backend=choice.backend)
            finally:
                if stream is not None:
                    sent = stream.sent
            if sent and not continues:  # another try would start its answer over: the client's text would repeat
                raise InferenceError(
                    f"fragment {fragment.id}: {model} failed after {len(sent)} characters were streamed, and it "
                    "cannot continue an answer"
                )
        calls.append(result)
        return Reply(result.text, result.token_confidence)

    decision = await decide(
        ctx.request.strategy,
        fragment.task_type,
        text,
        stats,
        allowed,
        ask,
        learned,
        accept_confidence(ctx, fragment.task_type),
        constraints.samples,
    )
    chosen = next(c for c in reversed(calls) if c.text == decision.answer)
    ctx.log.info("fragment %s: %s answer of %s stands: %s", fragment.id, decision.strategy, chosen.model, decision.why)
    if learned is not None:  # what feedback on this answer teaches: the answering model, on this prompt
        ctx.routes.append(
            RouteRecord(
                ts=datetime.now(UTC),
                request_id=ctx.request.request_id,
                tenant=ctx.request.tenant,
                fragment_id=fragment.id,
                task_type=fragment.task_type,
                model=chosen.model,
                quality_cost=decision.learned.quality_cost if decision.learned else learned.quality_cost,
                p_correct=decision.p_correct or {},
                embedding=embedding,
            )
        )
    return chosen.model_copy(
        update={
            "tokens_in": sum(c.tokens_in for c in calls),
            "tokens_out": sum(c.tokens_out for c in calls),
            "cost_usd": sum(c.cost_usd for c in calls),
            "strategy": decision.strategy,
            "models_called": decision.models,
            "allocation_ids": [c.allocation_id for c in calls],
            "confidence": decision.confidence,
            "p_correct": decision.p_correct,
            "reason": f"{decision.why}; {chosen.reason}",
            "covenant_version": ctx.covenant.version,
            "covenant_terms": ctx.covenant_terms,
        }
    )


def _reroute(fragment: Fragment, ctx: RunContext, constraints: Constraints, why: str, **changes) -> ModelChoice:
    """A new pool for the same model call under changed constraints (another tier or backend)."""
    choice = reroute(fragment, ctx.allowed, constraints, ctx.per_call_usd, why, **changes)
    ctx.log.warning("fragment %s: %s", fragment.id, why)
    return choice
