"""Token log-probabilities from the inference client: asked of every call, parsed from the real
llama.cpp server (chat and completion prompts, streamed or not), from the legacy completions shape,
and None, never an error, from a provider that gives none or refuses the field."""

import json
import math

import pytest

from connectors import openai_client
from homeskillet import catalog as cat
from tasks import runtime
from tasks.resources import render
from tests.support import JSONHandler

QUESTION = 'Steven asked Logan for a pen. _ had none.\nA) Steven\nB) Logan\nPrint only a single choice from "A" or "B".'


def visible(completion):
    return [t for t in completion.logprobs if t.token]


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
async def test_each_answer_token_comes_with_its_log_probability_and_alternatives(local_models, name):
    """At temperature 0 each token is the likeliest of its alternatives; the tokens spell the
    answer; streamed, the same tokens come (a stream may add or drop an end token of no text)."""
    model = cat.model(runtime.catalog(), name)
    endpoint = local_models.model_endpoint(model)
    plain = await openai_client.complete(endpoint, model.name, max_tokens=12, **render(model, QUESTION))
    assert plain.text.strip() and plain.logprobs
    assert "".join(t.token for t in plain.logprobs) == plain.text
    for token in plain.logprobs:
        assert token.logprob <= 0 and 0 < len(token.top) <= openai_client.TOP_LOGPROBS
        assert math.isclose(token.logprob, max(token.top.values()), abs_tol=1e-4)
        assert token.top.get(token.token) == pytest.approx(token.logprob, abs=1e-4) or not token.token
    streamed = await openai_client.complete(endpoint, model.name, max_tokens=12, stream=True, **render(model, QUESTION))
    assert streamed.text == plain.text
    assert [(t.token, round(t.logprob, 4)) for t in visible(streamed)] == [
        (t.token, round(t.logprob, 4)) for t in visible(plain)
    ]


async def test_a_call_that_asks_for_none_gets_none(local_models):
    model = cat.model(runtime.catalog(), "smollm2-135m")
    endpoint = local_models.model_endpoint(model)
    for stream in (False, True):
        out = await openai_client.complete(
            endpoint, model.name, max_tokens=4, stream=stream, logprobs=0, **render(model, "Say hi.")
        )
        assert out.text and out.logprobs is None


async def test_a_provider_that_sends_none_leaves_them_none(echo_server, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    base = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    out = await openai_client.complete(base, "echo-1", messages=[{"role": "user", "content": "hi"}])
    assert out.text == "echo: hi" and out.logprobs is None


class _Refuses(JSONHandler):
    """A provider whose model gives no log-probabilities and says so with HTTP 400, as some do."""

    bodies: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        if "logprobs" in body:
            self._send(400, {"error": {"message": "logprobs is not supported with this model"}})
        else:
            choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "B"}}
            self._send(200, {"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})


async def test_a_provider_that_refuses_the_field_is_asked_again_without_it(serve_http):
    host, port = serve_http(_Refuses)
    base = f"http://{host}:{port}/v1"
    for stream in (False, True):
        _Refuses.bodies.clear()
        out = await openai_client.complete(base, "m", messages=[{"role": "user", "content": "?"}], stream=stream)
        assert out.text == "B" and out.logprobs is None
        assert [("logprobs" in b, b.get("top_logprobs")) for b in _Refuses.bodies] == [(True, 5), (False, None)]


def test_the_legacy_completions_shape_is_read_and_equal_alternatives_merge():
    legacy = {
        "tokens": [" B", "."],
        "token_logprobs": [-0.2, -0.01],
        "top_logprobs": [{" B": -0.2, " A": -2.0}, {".": -0.01}],
        "text_offset": [0, 2],
    }
    tokens = openai_client.parse_logprobs(legacy)
    assert [(t.token, t.logprob, t.top) for t in tokens] == [
        (" B", -0.2, {" B": -0.2, " A": -2.0}),
        (".", -0.01, {".": -0.01}),
    ]
    # two token ids with the same text: one alternative, their probabilities added
    content = {
        "content": [
            {
                "token": "A",
                "logprob": math.log(0.5),
                "top_logprobs": [
                    {"token": "A", "logprob": math.log(0.5)},
                    {"token": "B", "logprob": math.log(0.1)},
                    {"token": "B", "logprob": math.log(0.2)},
                ],
            }
        ]
    }
    (token,) = openai_client.parse_logprobs(content)
    assert math.exp(token.top["B"]) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "data",
    [None, {}, {"content": None}, {"content": [{"token": "A"}]}, {"content": [{"token": "A", "logprob": "x"}]}, []],
)
def test_logprobs_that_are_missing_or_malformed_are_none(data):
    assert openai_client.parse_logprobs(data) is None


def test_a_parsed_answer_carries_its_logprobs_or_none():
    choice = {"message": {"content": "B"}, "finish_reason": "stop"}
    assert openai_client._parse({"choices": [choice]}, True, "u", 0.1).logprobs is None
    with_logprobs = {**choice, "logprobs": {"content": [{"token": "B", "logprob": -0.1, "top_logprobs": []}]}}
    (token,) = openai_client._parse({"choices": [with_logprobs]}, True, "u", 0.1).logprobs
    assert token.token == "B" and token.logprob == -0.1 and token.top == {}


def test_an_empty_answer_asked_for_logprobs_has_no_tokens_rather_than_none():
    """llama-server sends `logprobs: null` for an answer that stopped at once: no tokens to report."""
    empty = {"choices": [{"text": "", "logprobs": None, "finish_reason": "stop"}]}
    assert openai_client._parse(empty, False, "u", 0.1, "", True).logprobs == []
    assert openai_client._parse(empty, False, "u", 0.1).logprobs is None  # not asked for: none
    spoken = {"choices": [{"text": " Paris", "logprobs": None, "finish_reason": "stop"}]}
    assert openai_client._parse(spoken, False, "u", 0.1, "", True).logprobs is None  # a provider that gives none
