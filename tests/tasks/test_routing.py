"""Routing (`tasks.routing`): each fragment's model and pool from the catalog's figures and the
request's constraints, costs by the larger share of the pool, and `route` running the call the
preview shows, re-running after a preemption or falling back when asked."""

import logging
from dataclasses import replace

import numpy as np
import pytest

from homeskillet.catalog import load_catalog
from homeskillet.errors import HostedAIUnavailable, InferenceError, NoRoute, Preempted, UnknownModel, UnknownPool
from homeskillet.schemas import Constraints, Fragment, FragmentResult, InferenceRequest, Plan, Timings
from homeskillet.settings import PACKAGED_CATALOG
from tasks.context import RunContext
from tasks.learned import Head, Router
from tasks.routing import candidates, estimate_cost, fragment_budget, fragment_cost, preview, route, slice_rate
from tasks.runtime import Services
from tests.support import plan

CATALOG = load_catalog(PACKAGED_CATALOG)
GEMMA_FOR_QA = "gemma3-270m"  # the catalog's prior: 0.6 against SmolLM2's 0.5, past the 90 % line
LOG = logging.getLogger("test")


def context(constraints: Constraints, strategy: str = "single", budget: float | None = None) -> RunContext:
    request = InferenceRequest(tenant="demo", prompt="p", strategy=strategy, constraints=constraints)
    services = Services(catalog_path=PACKAGED_CATALOG, home="/nonexistent")  # nothing here touches its backends
    return RunContext(request, services, CATALOG, LOG, budget)


def route_plan(the_plan: Plan, catalog, constraints: Constraints):
    assert catalog is CATALOG
    return preview(the_plan, context(constraints, budget=fragment_budget(the_plan, constraints)))


def test_each_task_type_goes_to_its_most_suitable_model_on_the_cheapest_pool():
    choices = route_plan(plan(("Who?", "factual_qa"), ("Write.", "chat")), CATALOG, Constraints())
    assert choices["f0"].model == GEMMA_FOR_QA
    assert choices["f1"].model == "smollm2-135m"
    assert {c.pool for c in choices.values()} == {"local-preemptible"}  # cheaper per slice
    assert "quality" in choices["f0"].reason and "catalog prior" in choices["f0"].reason


def test_tier_constraint_selects_dedicated_pools():
    choices = route_plan(plan(("Write.", "chat")), CATALOG, Constraints(tier="dedicated"))
    assert choices["f0"].pool == "local-dedicated" and choices["f0"].tier == "dedicated"


def test_allowed_models_limit_the_choice():
    choices = route_plan(plan(("Who?", "factual_qa")), CATALOG, Constraints(allowed_models=["smollm2-135m"]))
    assert choices["f0"].model == "smollm2-135m"


def test_unknown_model_and_pool_are_named():
    with pytest.raises(UnknownModel, match="'gpt-9'.*smollm2-135m"):
        candidates(CATALOG, Constraints(allowed_models=["gpt-9"]))
    with pytest.raises(UnknownPool, match="'nowhere'"):
        candidates(CATALOG, Constraints(pool="nowhere"))


def test_max_cost_nothing_satisfies_is_a_clear_error():
    with pytest.raises(NoRoute, match="no model fits max_cost"):
        route_plan(plan(("Write.", "chat")), CATALOG, Constraints(max_cost_usd=1e-12))


def test_pool_too_small_for_any_model():
    tiny = CATALOG.model_copy(
        update={"pools": [CATALOG.pools[0].model_copy(update={"id": "mini", "tflops": 0.2, "vram_gb": 0.1})]}
    )
    with pytest.raises(NoRoute, match=r"mini \(0.2 TFLOPS, 0.1 GB\) is too small for any allowed model"):
        candidates(tiny, Constraints(pool="mini"))


def test_tier_and_pool_must_agree():
    with pytest.raises(NoRoute, match="preemptible"):
        candidates(CATALOG, Constraints(pool="local-preemptible", tier="dedicated"))


def test_costs_follow_the_larger_share_of_the_pool():
    smol = CATALOG.models[0]
    pool = CATALOG.pools[1]  # 4 TFLOPS, 2 GB, $0.24/h
    assert slice_rate(smol, pool) == pytest.approx(0.24 * max(1 / 4, 0.5 / 2))
    assert fragment_cost(smol, pool, 3600, 0) == pytest.approx(slice_rate(smol, pool))
    assert estimate_cost(smol, pool, 100, 90) > estimate_cost(smol, pool, 100, 9)


def result(choice, text: str) -> FragmentResult:
    return FragmentResult(
        fragment_id=choice.fragment_id,
        task_type="chat",
        text=text,
        model=choice.model,
        backend=choice.backend,
        pool=choice.pool,
        tier=choice.tier,
        allocation_id=f"alloc-{choice.pool}",
        tokens_in=1,
        tokens_out=1,
        timings=Timings(),
        cost_usd=0.0,
        reason=choice.reason,
    )


async def test_route_runs_the_call_the_preview_shows_and_says_why():
    fragment = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)
    ctx = context(Constraints())
    asked = []

    async def attempt(choice, text, number, stream):
        asked.append(choice)
        return result(choice, "an answer")

    out = await route(fragment, "Write.", ctx, attempt)
    assert [c.model for c in asked] == [preview(plan(("Write.", "chat")), ctx)["f0"].model]
    assert asked[0].pool == preview(plan(("Write.", "chat")), ctx)["f0"].pool
    assert out.strategy == "single" and out.models_called == [asked[0].model]
    assert "lowest cost" in out.reason and asked[0].pool in out.reason


async def test_a_preempted_call_reruns_on_a_dedicated_pool_when_asked():
    fragment = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)
    ctx = context(Constraints(tier="preemptible", on_preemption="dedicated"))
    asked = []

    async def attempt(choice, text, number, stream):
        asked.append((choice.tier, number))
        if number == 1:
            raise Preempted("gone")
        return result(choice, "second try")

    out = await route(fragment, "Write.", ctx, attempt)
    assert asked == [("preemptible", 1), ("dedicated", 2)]
    assert out.text == "second try" and "was preempted; re-run on dedicated" in out.reason


async def test_an_unavailable_backend_falls_back_only_when_the_request_names_one():
    fragment = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)

    async def attempt(choice, text, number, stream):
        if choice.backend == "hostedai":
            raise HostedAIUnavailable("down")
        return result(choice, "local answer")

    with pytest.raises(HostedAIUnavailable):
        await route(fragment, "Write.", context(Constraints(backend="hostedai")), attempt)
    out = await route(fragment, "Write.", context(Constraints(backend="hostedai", fallback_backend="local")), attempt)
    assert out.backend == "local" and "hostedai unavailable; fell back to local" in out.reason


async def test_auto_picks_a_cascade_for_closed_answers_and_single_for_free_text():
    async def attempt(choice, text, number, stream):
        return result(choice, "B")

    closed = Fragment(id="f0", text="Which? A) x B) y", task_type="multiple_choice", est_prompt_tokens=10)
    free = Fragment(id="f1", text="Write.", task_type="chat", est_prompt_tokens=10)
    out_closed = await route(closed, closed.text, context(Constraints(), "auto"), attempt)
    out_free = await route(free, free.text, context(Constraints(), "auto"), attempt)
    assert out_free.strategy == "single" and "chat answers cannot be compared" in out_free.reason
    # two local models: no two cheaper ones to agree, so the single best-value model
    assert out_closed.strategy == "single" and "fewer than two cheaper models" in out_closed.reason


async def test_a_streamed_call_that_fails_mid_answer_is_continued_from_the_text_already_sent():
    fragment = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)
    ctx = context(Constraints())
    ctx.stream = True
    prefills = []

    async def attempt(choice, text, number, stream):
        prefills.append(stream.prefill)
        for piece in ["Once", " upon"] if number == 1 else [" a", " time"]:
            stream.add(piece)
        if number == 1:
            raise InferenceError("the model server hung up")
        return result(choice, stream.sent)

    out = await route(fragment, "Write.", ctx, attempt)
    assert prefills == ["", "Once upon"]
    assert out.text == "Once upon a time"
    assert "failed after 9 characters were streamed; the next try continues them" in out.reason


async def test_a_streamed_call_that_sent_nothing_fails_as_an_unstreamed_one_does():
    fragment = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)
    streamed, plain = context(Constraints()), context(Constraints())
    streamed.stream = True
    tries = []

    async def attempt(choice, text, number, stream):
        tries.append(stream)
        raise InferenceError("HTTP 400")

    for ctx in (streamed, plain):
        with pytest.raises(InferenceError, match="HTTP 400"):
            await route(fragment, "Write.", ctx, attempt)
    assert len(tries) == 2 and tries[0] is not None and tries[1] is None  # one try each


async def test_only_a_route_of_one_call_whose_answer_stands_streams():
    chat = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)
    closed = Fragment(id="f1", text="Which? A) x B) y", task_type="multiple_choice", est_prompt_tokens=10)
    seen = {}

    async def attempt(choice, text, number, stream):
        seen.setdefault(ctx.request.strategy, []).append(stream is not None)
        return result(choice, "B")

    for strategy, fragment in [("single", chat), ("auto", chat), ("ensemble", closed), ("moa", closed)]:
        ctx = context(Constraints(), strategy)
        ctx.stream = True
        await route(fragment, fragment.text, ctx, attempt)
    ctx = context(Constraints())
    await route(chat, chat.text, ctx, attempt)  # the request does not ask to stream
    assert seen == {"single": [True, False], "auto": [True], "ensemble": [False], "moa": [False, False]}


async def test_a_streamed_call_preempted_mid_answer_continues_on_the_pool_it_is_rerun_on():
    fragment = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)
    ctx = context(Constraints(tier="preemptible", on_preemption="dedicated"))
    ctx.stream = True
    tries = []

    async def attempt(choice, text, number, stream):
        tries.append((choice.tier, stream.prefill))
        stream.add("Once" if number == 1 else " more")
        if number == 1:
            raise Preempted("gone")
        return result(choice, stream.sent)

    out = await route(fragment, "Write.", ctx, attempt)
    assert tries == [("preemptible", ""), ("dedicated", "Once")] and out.text == "Once more"


async def test_a_model_that_may_not_continue_an_answer_is_not_asked_to_after_a_failure_mid_answer():
    """Another OpenAI-compatible server may start a fresh answer when given the start of one: the
    client's text would repeat. Its failure mid-answer fails the fragment instead."""
    from homeskillet.schemas import OpenAIServing

    remote = OpenAIServing(base_url="https://llm.example/v1", model="smol")
    catalog = CATALOG.model_copy(
        update={
            "models": [
                m.model_copy(update={"serving": remote}) if m.name == "smollm2-135m" else m for m in CATALOG.models
            ]
        }
    )
    fragment = Fragment(id="f0", text="Write.", task_type="chat", est_prompt_tokens=10)
    request = InferenceRequest(tenant="demo", prompt="p", constraints=Constraints(allowed_models=["smollm2-135m"]))
    ctx = RunContext(request, Services(catalog_path=PACKAGED_CATALOG, home="/nonexistent"), catalog, LOG, None)
    ctx.stream = True
    tries = []

    async def attempt(choice, text, number, stream):
        tries.append(number)
        stream.add("Once")
        raise InferenceError("the server hung up")

    with pytest.raises(InferenceError, match="failed after 4 characters were streamed, and it cannot continue"):
        await route(fragment, "Write.", ctx, attempt)
    assert tries == [1]


def constant_router(p: dict[str, float], default: float = 0.1, auto=None) -> Router:
    """A router whose heads say P(correct) = p[model] whatever the prompt."""
    heads = {m: Head(np.r_[np.zeros(384), np.log(q / (1 - q))], (0.0, 0.0), 10, q) for m, q in p.items()}
    return Router(heads, default, auto or {})


async def test_learned_routing_goes_to_the_likeliest_right_model_and_says_why(caplog):
    fragment = Fragment(id="f0", text="What is the capital of Peru?", task_type="factual_qa", est_prompt_tokens=10)
    asked = []

    async def attempt(choice, text, number, stream):
        asked.append(choice.model)
        return result(choice, "Lima")

    ctx = context(Constraints(quality_cost=0.0), "learned")
    ctx.router = constant_router({"smollm2-135m": 0.3, "gemma3-270m": 0.8})
    with caplog.at_level(logging.INFO, logger="test"):
        out = await route(fragment, fragment.text, ctx, attempt)
    assert asked == ["gemma3-270m"] and out.strategy == "learned"
    assert out.p_correct == pytest.approx({"gemma3-270m": 0.8, "smollm2-135m": 0.3})
    assert "λ=0" in out.reason and "gemma3-270m P=0.80" in caplog.text
    (decision,) = ctx.routes
    assert decision.model == "gemma3-270m" and len(decision.embedding) == 384 and decision.quality_cost == 0.0
    # a steep trade-off sends it to the cheaper model, unless the router has no head for it
    cheap = context(Constraints(quality_cost=100.0), "learned")
    cheap.router = ctx.router
    assert (await route(fragment, fragment.text, cheap, attempt)).model == "smollm2-135m"


async def test_auto_with_a_router_keeps_single_where_the_router_did_not_beat_it():
    fragment = Fragment(id="f0", text="What is the capital of Peru?", task_type="factual_qa", est_prompt_tokens=10)

    async def attempt(choice, text, number, stream):
        return result(choice, "Lima")

    ctx = context(Constraints(), "auto")
    ctx.router = constant_router({"smollm2-135m": 0.3, "gemma3-270m": 0.8}, auto={"factual_qa": None})
    out = await route(fragment, fragment.text, ctx, attempt)
    assert out.strategy == "single" and "did not beat single on factual_qa" in out.reason
    assert "gemma3-270m P=0.80" in out.reason and out.p_correct["gemma3-270m"] == pytest.approx(0.8)
    assert [r.model for r in ctx.routes] == [out.model]  # feedback on single's answer teaches its head
    learned = context(Constraints(), "auto")
    learned.router = constant_router({"smollm2-135m": 0.3, "gemma3-270m": 0.8}, auto={"factual_qa": (0.0, 0.0)})
    out = await route(fragment, fragment.text, learned, attempt)
    assert out.strategy == "learned" and out.p_correct and len(learned.routes) == 1


async def test_a_cascade_accepts_a_confident_first_answer_and_escalates_an_unsure_one():
    fragment = Fragment(id="f0", text="2+2? A) 4 B) 5", task_type="multiple_choice", est_prompt_tokens=10)
    sure = {"smollm2-135m": 0.95}

    async def attempt(choice, text, number, stream, temperature=None):
        return result(choice, "A").model_copy(update={"token_confidence": sure.get(choice.model, 0.99)})

    ctx = context(Constraints(), "cascade")
    ctx.router = replace(constant_router({"smollm2-135m": 0.5, "gemma3-270m": 0.5}), accept_confidence=0.9)
    out = await route(fragment, fragment.text, ctx, attempt)
    assert out.models_called == ["smollm2-135m"] and "smollm2-135m is 0.95 sure" in out.reason
    sure["smollm2-135m"] = 0.5
    again = await route(fragment, fragment.text, ctx, attempt)
    assert again.models_called == ["smollm2-135m", "gemma3-270m"] and "escalated" in again.reason


async def test_a_cascade_with_samples_accepts_when_most_samples_agree():
    fragment = Fragment(id="f0", text="2+2? A) 4 B) 5", task_type="multiple_choice", est_prompt_tokens=10)
    answers = iter(["A", "A", "B", "A", "B", "B", "C"])
    temperatures = []

    async def attempt(choice, text, number, stream, temperature=None):
        temperatures.append(temperature)
        return result(choice, next(answers) if choice.model == "smollm2-135m" else "A")

    ctx = context(Constraints(samples=3), "cascade")
    out = await route(fragment, fragment.text, ctx, attempt)  # A, then samples A and B: 2 of 3 agree
    assert out.models_called == ["smollm2-135m"] * 3 and "2 of 3 samples" in out.reason
    assert temperatures == [None, 0.8, 0.8]
    again = await route(fragment, fragment.text, ctx, attempt)  # A, then B and B: 1 of 3
    assert again.models_called == ["smollm2-135m"] * 3 + ["gemma3-270m"] and "escalated" in again.reason


def test_auto_keeps_single_when_the_router_does_not_know_singles_model():
    from tasks.strategies import Learned, Stats, learned_route

    stats = Stats({"chat": {"a": 0.9, "b": 0.8, "c": 0.95}}, {"chat": {"a": 1.0, "b": 2.0, "c": 3.0}})
    view = Learned(p={"b": 0.9, "c": 0.95}, cost={"b": 2.0, "c": 3.0}, quality_cost=0.1, auto=(0.1, 0.0))
    choice, why = learned_route("chat", stats, ["a", "b", "c"], view)  # single is "a", which it does not know
    assert choice is None and "knows too few of the models no dearer than a" in why


async def test_a_one_probe_cascade_escalates_when_its_model_gives_no_confidence():
    fragment = Fragment(id="f0", text="2+2? A) 4 B) 5", task_type="multiple_choice", est_prompt_tokens=10)

    async def attempt(choice, text, number, stream, temperature=None):
        return result(choice, "A")  # no token_confidence: the provider gave no log-probabilities

    ctx = context(Constraints(), "cascade")
    ctx.router = replace(constant_router({"smollm2-135m": 0.5, "gemma3-270m": 0.5}), accept_confidence=0.9)
    out = await route(fragment, fragment.text, ctx, attempt)
    assert out.models_called == ["smollm2-135m", "gemma3-270m"] and "gave no confidence" in out.reason
