"""The request preamble (`tasks.preparation`): covenant checks, the restricted catalog, decomposition, size checks and the
first choice of model per fragment, before anything is allocated. Pure: no server is started (the
services' backends are never touched)."""

import logging
from pathlib import Path

import pytest
import yaml

from homeskillet.errors import CovenantViolation, InvalidRequest, UnknownTenant
from homeskillet.settings import PACKAGED_CATALOG
from tasks.preparation import make_request, prepare, split_here
from tasks.runtime import Services

LOG = logging.getLogger("test")
TWO_QUESTIONS = "What is the capital of France? Who wrote Romeo and Juliet?"


@pytest.fixture
def services(tmp_path):
    """The packaged catalog with covenants: acme may run SmolLM2 alone and only `single`, globex
    at most one fragment per request, demo anything."""
    raw = yaml.safe_load(PACKAGED_CATALOG.read_text())
    raw["tenants"] = [
        {"id": "demo"},
        {"id": "acme", "covenant": {"allowed_models": ["smollm2-135m"], "allowed_strategies": ["single"]}},
        {"id": "globex", "covenant": {"max_fragments": 1}},
        {"id": "initrode", "covenant": {"max_prompt_tokens": 10}},
    ]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Services(catalog_path=path, home=tmp_path / "home")


async def test_a_one_model_covenant_routes_every_fragment_to_that_model(services):
    free = await prepare(make_request(TWO_QUESTIONS, "demo"), services, LOG)
    assert {c.model for c in free.choices.values()} != {"smollm2-135m"}  # unrestricted, QA goes elsewhere
    bound = await prepare(make_request(TWO_QUESTIONS, "acme"), services, LOG)
    assert [f.id for f in bound.plan.fragments] == [f.id for f in free.plan.fragments] and len(bound.choices) == 2
    assert {c.model for c in bound.choices.values()} == {"smollm2-135m"}
    assert [m.name for m in bound.ctx.allowed.models] == ["smollm2-135m"]
    assert len(services.catalog.models) > 1  # the whole catalog is left as it was
    assert bound.ctx.covenant_terms == ["allowed_models"] and bound.ctx.covenant.allowed_strategies == ["single"]
    assert bound.est_cost_usd == pytest.approx(sum(c.est_cost_usd for c in bound.choices.values()))
    assert not Path(services.home).exists()  # nothing was started or written: no ledger, no state


async def test_what_the_covenant_forbids_is_refused_before_the_prompt_is_split(services):
    split: list[str] = []

    async def watching(prompt, *args):
        split.append(prompt)
        return await split_here(prompt, *args)

    with pytest.raises(CovenantViolation, match="allowed_strategies.*strategy cascade"):
        await prepare(make_request(TWO_QUESTIONS, "acme", "cascade"), services, LOG, decomposer=watching)
    asked = make_request(TWO_QUESTIONS, "acme", constraints={"allowed_models": ["gemma3-270m"]})
    with pytest.raises(CovenantViolation, match="allowed_models.*model gemma3-270m"):
        await prepare(asked, services, LOG, decomposer=watching)
    assert split == []
    await prepare(make_request(TWO_QUESTIONS, "demo", "cascade"), services, LOG, decomposer=watching)
    assert split == [TWO_QUESTIONS]  # the decomposer given is the one used


async def test_a_plan_larger_than_the_covenant_allows_is_refused(services):
    with pytest.raises(CovenantViolation, match="max_fragments.*splits into more than 1"):
        await prepare(make_request(TWO_QUESTIONS, "globex"), services, LOG)
    one = await prepare(make_request(TWO_QUESTIONS, "globex", constraints={"split": False}), services, LOG)
    assert len(one.plan.fragments) == 1


async def test_an_unknown_tenant_or_a_bad_routing_stats_file_is_named(services, tmp_path):
    with pytest.raises(UnknownTenant, match="'initech'"):
        await prepare(make_request(TWO_QUESTIONS, "initech"), services, LOG)
    with pytest.raises(InvalidRequest, match="routing stats .*missing.json"):
        await prepare(make_request(TWO_QUESTIONS, "demo"), services, LOG, routing_stats=str(tmp_path / "missing.json"))


def test_a_bad_request_names_each_problem():
    with pytest.raises(InvalidRequest, match=r"prompt: .*empty.*; strategy: "):
        make_request("  ", "demo", strategy="random")
    assert make_request("Hi?", "demo", request_id="mine").request_id == "mine"


def test_a_prompt_beyond_the_size_limit_is_refused_with_its_size():
    from homeskillet.schemas import MAX_PROMPT_CHARS

    with pytest.raises(
        InvalidRequest, match=f"prompt is {MAX_PROMPT_CHARS + 1} characters; at most {MAX_PROMPT_CHARS}"
    ):
        make_request("x" * (MAX_PROMPT_CHARS + 1), "demo")
    with pytest.raises(InvalidRequest, match="capacity_wait_s: .*less than or equal to 120"):
        make_request("Hi?", "demo", constraints={"capacity_wait_s": 3600})


async def test_the_covenants_prompt_size_is_checked_before_the_prompt_is_split(services):
    split: list[str] = []

    async def watching(prompt, *args):
        split.append(prompt)
        return await split_here(prompt, *args)

    with pytest.raises(CovenantViolation, match="max_prompt_tokens: limit 10 tokens"):
        await prepare(make_request(TWO_QUESTIONS, "initrode"), services, LOG, decomposer=watching)
    assert split == []
    await prepare(make_request("Hi?", "initrode"), services, LOG, decomposer=watching)
    assert split == ["Hi?"]


def test_a_conversation_context_is_validated_and_bounded_with_the_prompt():
    from homeskillet.schemas import MAX_PROMPT_CHARS, ChatTurn

    turns = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}]
    request = make_request("Hi?", "demo", context=turns)
    assert request.context == [
        ChatTurn(role="system", content="Be brief."),
        ChatTurn(role="assistant", content="Hello."),
    ]
    assert make_request("Hi?", "demo", context=request.context).context == request.context  # turns as models
    assert make_request("Hi?", "demo").context == []  # no context: none is sent
    with pytest.raises(InvalidRequest, match=r"context\.1\.role: Input should be 'system', 'user' or 'assistant'"):
        make_request("Hi?", "demo", context=[turns[0], {"role": "tool", "content": "42"}])
    with pytest.raises(InvalidRequest, match=r"context\.0\.content: Field required"):
        make_request("Hi?", "demo", context=[{"role": "user"}])
    # the context counts against the prompt's size limit: exactly the limit passes, a character more is refused
    fits = [{"role": "system", "content": "x" * (MAX_PROMPT_CHARS - 3 - 10)}, {"role": "user", "content": "y" * 10}]
    assert len(make_request("Hi?", "demo", context=fits).context) == 2
    too_big = [*fits, {"role": "assistant", "content": "z"}]
    with pytest.raises(
        InvalidRequest,
        match=rf"request: prompt \(3 characters\) and context \({MAX_PROMPT_CHARS - 2} characters in 3 turns\) "
        rf"are {MAX_PROMPT_CHARS + 1} characters; at most {MAX_PROMPT_CHARS}",
    ):
        make_request("Hi?", "demo", context=too_big)


async def test_the_conversation_counts_in_every_fragments_size_and_in_the_covenants_prompt_size(services):
    context = [{"role": "system", "content": "Answer in one word. " * 30}]
    plain = await prepare(make_request(TWO_QUESTIONS, "demo"), services, LOG)
    talk = await prepare(make_request(TWO_QUESTIONS, "demo", context=context), services, LOG)
    grown = [b.est_prompt_tokens - a.est_prompt_tokens for a, b in zip(plain.plan.fragments, talk.plan.fragments)]
    assert len(set(grown)) == 1 and grown[0] >= len(context[0]["content"]) // 4  # the same, whole context each
    with pytest.raises(CovenantViolation, match="max_prompt_tokens"):  # "Hi?" alone fits initrode's 10 tokens
        await prepare(make_request("Hi?", "initrode", context=context), services, LOG)
    with pytest.raises(
        InvalidRequest, match="the conversation is about .* tokens, beyond every allowed model's context"
    ):
        await prepare(make_request("Hi?", "demo", context=[{"role": "user", "content": "word " * 9000}]), services, LOG)
