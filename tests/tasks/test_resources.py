"""The resources tasks (`tasks.resources`): the prompt `render` builds for a model (chat messages, or
a completion prompt with one answer cue and the model's stop sequences), and, on a real
allocation in the ledger, what `infer` sends to a remote model's endpoint (the loopback echo
double, which records each request)."""

from pathlib import Path

import pytest
import yaml

from connectors.ledger import new_allocation_id
from homeskillet import catalog as cat
from tasks import runtime
from tasks.resources import infer, render

SMOL = cat.model(runtime.catalog(), "smollm2-135m")


def test_completion_prompts_end_with_one_answer_cue():
    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    assert render(gemma, "What is 2 + 2?")["prompt"] == "Question: What is 2 + 2?\nAnswer:"
    few_shot = "Which is a gas?\nA) ice\nB) steam\nAnswer:"  # brings its own cue: no second one
    assert render(gemma, few_shot + "\n")["prompt"] == f"Question: {few_shot}"
    assert render(SMOL, few_shot) == {"messages": [{"role": "user", "content": few_shot}]}


def test_a_completion_prompt_carries_its_models_stop_sequences():
    """Completion-style models (no chat template) stop where the catalog says, else they run on
    into the next made-up question; a model with none sends no stop field value."""
    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    assert gemma.stop and render(gemma, "What is 2 + 2?")["stop"] == gemma.stop
    assert render(gemma.model_copy(update={"stop": []}), "What is 2 + 2?")["stop"] is None


async def allocate_echo(services):
    return await services.backend("local").allocate(
        allocation_id=new_allocation_id(),
        tenant="acme",
        request_id="r",
        pool="roomy",
        model=cat.model(services.catalog, "echo"),
        wait_s=5,
    )


@pytest.fixture
async def echo_allocation(test_catalog, monkeypatch):
    """An allocation of the catalog's `echo` model (serving: openai, model echo-1, key from
    ECHO_API_KEY) on a local pool, released afterwards."""
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    services = runtime.services(test_catalog)
    allocation = await allocate_echo(services)
    yield services, allocation
    await services.backend_of(allocation).release(allocation.allocation_id, allocation.tenant)


@pytest.mark.usefixtures("assert_no_leaks")
async def test_infer_sends_the_remote_model_its_own_name_and_the_key_from_its_env(
    echo_allocation, echo_server, monkeypatch
):
    services, allocation = echo_allocation
    monkeypatch.setenv("ECHO_API_KEY", "sk-echo-test")
    completion = await infer.fn(services, allocation, "Say hi.", 8)
    assert completion.text == "echo: Say hi."
    assert echo_server.seen[-1]["auth"] == "Bearer sk-echo-test"
    assert echo_server.seen[-1]["model"] == "echo-1"  # the provider's name, not the catalog's "echo"


@pytest.mark.usefixtures("assert_no_leaks")
async def test_infer_sends_no_key_when_its_env_has_none(echo_allocation, echo_server, monkeypatch):
    services, allocation = echo_allocation
    monkeypatch.delenv("ECHO_API_KEY", raising=False)
    await infer.fn(services, allocation, "Say hi.", 8)
    assert echo_server.seen[-1]["auth"] is None


@pytest.mark.usefixtures("assert_no_leaks")
async def test_infer_sends_no_key_for_a_remote_model_that_names_no_key_env(
    tmp_path, test_catalog, echo_server, monkeypatch
):
    """api_key_env is optional (a provider that needs no key): such a model is called without one."""
    catalog = yaml.safe_load(Path(test_catalog).read_text())
    echo = next(m for m in catalog["models"] if m["name"] == "echo")
    del echo["serving"]["api_key_env"]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    services = runtime.services(path)
    allocation = await allocate_echo(services)
    try:
        completion = await infer.fn(services, allocation, "Say hi.", 8)
    finally:
        await services.backend_of(allocation).release(allocation.allocation_id, allocation.tenant)
    assert completion.text == "echo: Say hi."
    assert echo_server.seen[-1]["auth"] is None
