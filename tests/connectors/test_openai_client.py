"""The inference client (`connectors.openai_client`) against the local model servers, with the real
SmolLM2 on llama.cpp, and against the echo double; a cost the provider reports is kept."""

import pytest

from connectors import openai_client
from homeskillet import catalog as cat
from homeskillet.errors import InferenceError
from homeskillet.schemas import ChatTurn
from tasks import runtime
from tasks.resources import render

SMOL = cat.model(runtime.catalog(), "smollm2-135m")


@pytest.fixture(scope="module")
def smol_endpoint(local_models):
    return local_models.model_endpoint(SMOL)


async def test_chat_completion_reports_text_and_usage(smol_endpoint):
    out = await openai_client.complete(
        smol_endpoint, SMOL.name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    assert out.text.strip()
    assert out.tokens_in > 0 and 0 < out.tokens_out <= 16
    assert out.first_token_s is None and out.total_s > 0


async def test_streaming_measures_time_to_first_token(smol_endpoint):
    out = await openai_client.complete(smol_endpoint, SMOL.name, prompt="The sea is", max_tokens=12, stream=True)
    assert out.text.strip()
    assert 0 < out.first_token_s <= out.total_s
    assert 0 < out.tokens_out <= 12


async def test_same_answer_streaming_or_not(smol_endpoint):
    kwargs = dict(messages=[{"role": "user", "content": "Name a color."}], max_tokens=10)
    plain = await openai_client.complete(smol_endpoint, SMOL.name, **kwargs)
    streamed = await openai_client.complete(smol_endpoint, SMOL.name, stream=True, **kwargs)
    assert plain.text == streamed.text
    assert streamed.tokens_out == plain.tokens_out and streamed.tokens_in == plain.tokens_in


async def test_an_answer_does_not_depend_on_what_the_server_served_before(smol_endpoint):
    """At temperature 0 the same prompt gets the same answer after other prompts, short and long,
    streamed or not."""

    async def ask(text, stream=False, max_tokens=24):
        messages = [{"role": "user", "content": text}]
        out = await openai_client.complete(
            smol_endpoint, SMOL.name, messages=messages, max_tokens=max_tokens, stream=stream
        )
        return out.text

    first = await ask("Name a color.")
    await ask("What is the capital of France?")
    assert await ask("Name a color.") == first
    await ask("Write a long story about the sea.", max_tokens=400)
    assert await ask("Name a color.", stream=True) == first


async def test_a_completion_prompt_is_answered_the_same_after_others(local_models):
    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    endpoint = local_models.model_endpoint(gemma)

    async def ask(question):
        out = await openai_client.complete(endpoint, gemma.name, max_tokens=16, **render(gemma, question))
        return out.text

    first = await ask("What is the capital of France?")
    await ask("Who wrote Romeo and Juliet?")
    assert await ask("What is the capital of France?") == first


async def test_http_errors_and_dead_endpoints_are_inference_errors(echo_server):
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    with pytest.raises(InferenceError, match="HTTP 500.*model crashed"):
        await openai_client.complete(base, "echo-1", messages=[{"role": "user", "content": "FAIL"}])
    with pytest.raises(InferenceError, match="ConnectError"):
        await openai_client.complete("http://127.0.0.1:9/v1", "x", prompt="hi")


async def test_api_key_is_sent_as_bearer(echo_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    await openai_client.complete(base, "echo-1", prompt="hi", api_key="sk-test")
    assert echo_server.seen[-1]["auth"] == "Bearer sk-test"


def test_a_cost_the_provider_reports_is_kept():
    body = {"choices": [{"message": {"content": "B"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
    assert openai_client._parse(body, True, "u", 0.1).cost_usd is None
    assert openai_client._parse({**body, "usage": {"cost_usd": 0.0021}}, True, "u", 0.1).cost_usd == 0.0021
    assert openai_client._parse({**body, "usage": {"cost": "0.5"}}, True, "u", 0.1).cost_usd == 0.5  # OpenRouter
    assert openai_client._parse({**body, "usage": {"cost_usd": "n/a"}}, True, "u", 0.1).cost_usd is None


CONTEXT = [
    ChatTurn(role="system", content="Answer in French."),
    ChatTurn(role="user", content="Hi."),
    ChatTurn(role="assistant", content="Bonjour."),
]


def test_the_context_comes_before_the_text_in_either_prompt_style():
    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    assert SMOL.prompt_style == "chat" and gemma.prompt_style == "completion"
    assert render(SMOL, "Capital of France?", CONTEXT)["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert render(gemma, "Capital of France?", CONTEXT)["prompt"] == (
        "System: Answer in French.\nUser: Hi.\nAssistant: Bonjour.\nQuestion: Capital of France?\nAnswer:"
    )
    # without context, each style's body is what it always was
    assert render(SMOL, "Capital of France?")["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert render(gemma, "Capital of France?")["prompt"] == "Question: Capital of France?\nAnswer:"


async def test_a_completion_prompt_with_context_reaches_the_server_whole(echo_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    out = await openai_client.complete(base, "echo-1", max_tokens=8, **render(gemma, "Say one.", CONTEXT))
    sent = "System: Answer in French.\nUser: Hi.\nAssistant: Bonjour.\nQuestion: Say one.\nAnswer:"
    assert echo_server.seen[-1]["path"] == "/v1/completions" and echo_server.seen[-1]["text"] == sent
    assert out.text == f"echo: {sent}"


def test_a_prefill_the_server_repeats_is_passed_on_once():
    def added(prefill, pieces):
        continuation = openai_client.Continuation(prefill)
        return [continuation.feed(p) for p in pieces] + [continuation.end()]

    # repeated whole in the first piece (llama-server's chat endpoint), or split over several
    assert added("Once upon", ["Once upon a", " time"]) == [" a", " time", ""]
    assert added("Once upon", ["Once", " up", "on", " a"]) == ["", "", "", " a", ""]
    # not repeated: the continuation as it comes, once it differs from the prefill's start
    assert added("Once upon", [" a", " time"]) == [" a", " time", ""]
    assert added("Once upon", ["On", "ward"]) == ["", "Onward", ""]
    # a continuation that ends while it still looks like the prefill's start is kept
    assert added("Once upon", ["On"]) == ["", "On"]
    assert added("", ["a", "b"]) == ["a", "b", ""]
    assert (
        openai_client._parse(
            {"choices": [{"message": {"content": "Once upon a time"}}]}, True, "u", 0.1, "Once upon"
        ).text
        == "Once upon a time"
    )


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
async def test_a_model_continues_a_prefill_as_if_it_had_written_it(local_models, name):
    """A streamed answer's first pieces, given back as its prefill (a chat model's final assistant
    message, the end of a completion model's prompt), are continued: the same answer at
    temperature 0, with each piece after the prefill handed to on_text once."""
    model = cat.model(runtime.catalog(), name)
    endpoint = local_models.model_endpoint(model)
    body = render(model, "Describe the sea in two sentences.")
    whole: list[str] = []
    plain = await openai_client.complete(endpoint, model.name, max_tokens=16, stream=True, on_text=whole.append, **body)
    assert "".join(whole) == plain.text and len(whole) > 6
    prefill = "".join(whole[:6])
    rest: list[str] = []
    continued = await openai_client.complete(
        endpoint, model.name, max_tokens=10, stream=True, prefill=prefill, on_text=rest.append, **body
    )
    assert continued.text == plain.text
    assert prefill + "".join(rest) == continued.text and 0 < continued.tokens_out <= 10
    unstreamed = await openai_client.complete(endpoint, model.name, max_tokens=10, prefill=prefill, **body)
    assert unstreamed.text == plain.text


async def test_a_server_that_does_not_stream_answers_a_streamed_call_in_one_piece(echo_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    pieces: list[str] = []
    out = await openai_client.complete(
        base, "echo-1", messages=[{"role": "user", "content": "Say one."}], stream=True, on_text=pieces.append
    )
    assert out.text == "echo: Say one." and pieces == [out.text]
    assert out.tokens_out == 3 and out.first_token_s is not None


def test_a_request_stop_applies_with_the_model_own_each_once():
    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    assert gemma.stop == ["\n", "Question:"]
    # both apply, the model's first; a sequence in both is sent once
    assert render(gemma, "Hi.", stop=["END", "\n", "END"])["stop"] == ["\n", "Question:", "END"]
    assert render(gemma, "Hi.")["stop"] == ["\n", "Question:"]
    # a chat model has no stop of its own: the request's, or none at all
    assert render(SMOL, "Hi.", stop=["beta", "beta"])["stop"] == ["beta"]
    assert "stop" not in render(SMOL, "Hi.") and "stop" not in render(SMOL, "Hi.", stop=[])


async def test_the_body_sent_carries_the_temperature_and_the_combined_stop(echo_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    gemma = cat.model(runtime.catalog(), "gemma3-270m")
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    await openai_client.complete(base, "echo-1", temperature=0.7, **render(gemma, "Say one.", stop=["END", "\n"]))
    assert echo_server.seen[-1]["temperature"] == 0.7 and echo_server.seen[-1]["stop"] == ["\n", "Question:", "END"]
    await openai_client.complete(base, "echo-1", temperature=1.5, stream=True, **render(SMOL, "Say one.", stop=["END"]))
    assert echo_server.seen[-1]["temperature"] == 1.5 and echo_server.seen[-1]["stop"] == ["END"]
    # without a temperature, greedy as always; without a stop, none is sent
    await openai_client.complete(base, "echo-1", **render(SMOL, "Say one."))
    assert echo_server.seen[-1]["temperature"] == 0.0 and echo_server.seen[-1]["stop"] is None
