"""The one inference client: OpenAI-compatible chat and completion calls over async httpx."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

import httpx

from connectors import http_client, model_server
from homeskillet.errors import InferenceError
from homeskillet.schemas import Completion, TokenLogprob

TOP_LOGPROBS = 5  # alternatives asked for at each answer token: enough to see a closed answer's other options


async def complete(
    endpoint: str,
    model: str,
    *,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_tokens: int = 128,
    stop: list[str] | None = None,
    temperature: float | None = None,
    stream: bool = False,
    timeout_s: float = 300.0,
    api_key: str | None = None,
    prefill: str = "",
    on_text: Callable[[str], None] | None = None,
    logprobs: int = TOP_LOGPROBS,
) -> Completion:
    """One call: `messages` goes to /chat/completions, `prompt` to /completions.

    Streaming measures time to first token and calls `on_text` with each piece of the answer as
    it arrives, in order; when the server reports no usage in the stream, tokens_out counts the
    content chunks (one token each on llama.cpp) and tokens_in is 0. A server that answers a
    streamed call with one JSON body (it does not stream) sends its answer as one piece.
    `prefill` is the start of the answer, already known (what an interrupted call had sent): the
    model continues it. Chat models get it as a final assistant message (llama-server continues
    that message rather than starting a new turn, unless started with --no-prefill-assistant),
    completion models as the end of the prompt. The Completion's text starts with it; `on_text`
    sees only what follows it (a server that repeats the prefill in its answer, as llama-server's
    chat endpoint does, is not repeated to `on_text`).
    `stop` and `temperature` go in the body as given (`stop` only when there is one); without a
    `temperature`, it is 0.
    Without `api_key`, a local model server this process resolved gets its own key.
    `logprobs` > 0 asks for each answer token's log-probability and that many likeliest
    alternatives (chat: `logprobs: true, top_logprobs: N`; a completion prompt: `logprobs: N`), in
    the Completion's `logprobs`, streamed or not; 0 asks for none. A provider that sends none
    leaves it None; one that refuses the field (HTTP 400 naming it) is asked again without it.
    """
    if (prompt is None) == (messages is None):
        raise ValueError("pass exactly one of prompt or messages")
    chat = messages is not None
    url = f"{endpoint.rstrip('/')}/{'chat/completions' if chat else 'completions'}"
    # no temperature given: 0, greedy, so that the same prompt gets the same answer
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": temperature or 0.0, "stream": stream}
    if chat:
        body["messages"] = [*messages, {"role": "assistant", "content": prefill}] if prefill else messages
    else:
        body["prompt"] = prompt + prefill
    if stream:
        body["stream_options"] = {"include_usage": True}  # OpenAI's way to get usage in a stream
    if stop:
        body["stop"] = stop
    if logprobs > 0:
        body |= {"logprobs": True, "top_logprobs": logprobs} if chat else {"logprobs": logprobs}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else model_server.auth_headers(endpoint)
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    client = http_client.client()
    started = time.perf_counter()
    try:
        if not stream:
            response = await client.post(url, json=body, headers=headers, timeout=timeout)
            if _refuses_logprobs(response, body):
                body = _without_logprobs(body)
                response = await client.post(url, json=body, headers=headers, timeout=timeout)
            _check(response, url)
            return _parse(response.json(), chat, url, time.perf_counter() - started, prefill, "logprobs" in body)
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                await response.aread()
                if _refuses_logprobs(response, body):
                    return await complete(
                        endpoint,
                        model,
                        prompt=prompt,
                        messages=messages,
                        max_tokens=max_tokens,
                        stop=stop,
                        temperature=temperature,
                        stream=stream,
                        timeout_s=timeout_s,
                        api_key=api_key,
                        prefill=prefill,
                        on_text=on_text,
                        logprobs=0,
                    )
                _check(response, url)
            if response.headers.get("content-type", "").startswith("application/json"):
                await response.aread()  # a server that does not stream answers with one body: one piece
                elapsed = time.perf_counter() - started
                completion = _parse(response.json(), chat, url, elapsed, prefill, "logprobs" in body)
                _add(completion.text[len(prefill) :], [], on_text)
                return completion.model_copy(update={"first_token_s": completion.total_s})
            return await _read_stream(response, chat, url, started, prefill, on_text, "logprobs" in body)
    except httpx.TimeoutException:
        raise InferenceError(f"{url} did not answer within {timeout_s:g}s") from None
    except httpx.HTTPError as exc:
        raise InferenceError(f"{url} failed: {type(exc).__name__}: {exc}") from None


def _refuses_logprobs(response: httpx.Response, body: dict) -> bool:
    """A provider that does not give log-probabilities for this model (some refuse the field
    with HTTP 400 naming it): the call is asked again without them."""
    return response.status_code == 400 and "logprobs" in body and "logprob" in response.text.lower()


def _without_logprobs(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}


def _check(response: httpx.Response, url: str) -> None:
    if response.status_code >= 400:
        raise InferenceError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")


class Continuation:
    """The text an answer adds after its prefill, from the pieces a server sends: some servers
    repeat the prefill first (llama-server's chat endpoint), others send only what follows it.
    Pieces that could still be the repeated prefill are held back until that is decided."""

    def __init__(self, prefill: str = ""):
        self.prefill = prefill
        self._held: str | None = "" if prefill else None  # None once decided

    def feed(self, piece: str) -> str:
        """The new text in this piece (possibly none yet)."""
        if self._held is None:
            return piece
        self._held += piece
        if self.prefill.startswith(self._held) and self._held != self.prefill:
            return ""  # still a start of the prefill: a repeat, or a continuation that looks like one
        held, self._held = self._held, None
        return held[len(self.prefill) :] if held.startswith(self.prefill) else held

    def end(self) -> str:
        """What is still held when the answer ends: a continuation shorter than the prefill that
        matched its start (a repeat would have sent the whole prefill)."""
        held, self._held = self._held or "", None
        return held


def _parse(data: dict, chat: bool, url: str, total_s: float, prefill: str = "", asked: bool = False) -> Completion:
    """The Completion of one JSON answer. `asked`: log-probabilities were asked for; an empty
    answer then has none to report (llama-server sends null): an empty list, not None."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        usage = data.get("usage") or {}
    except (KeyError, IndexError, TypeError):
        raise InferenceError(f"{url} answered without choices: {json.dumps(data)[:300]}") from None
    continuation = Continuation(prefill)
    added = continuation.feed(text or "") + continuation.end()
    return Completion(
        text=prefill + added,
        tokens_in=int(usage.get("prompt_tokens", 0)),
        tokens_out=int(usage.get("completion_tokens", 0)),
        total_s=total_s,
        finish_reason=choice.get("finish_reason"),
        cost_usd=_cost(usage),
        logprobs=_answer_logprobs(parse_logprobs(choice.get("logprobs")), added, asked),
    )


async def _read_stream(
    response: httpx.Response,
    chat: bool,
    url: str,
    started: float,
    prefill: str,
    on_text: Callable[[str], None] | None,
    asked: bool = False,
) -> Completion:
    continuation = Continuation(prefill)
    parts: list[str] = []
    first: float | None = None
    chunks = 0
    usage: dict = {}
    finish: str | None = None
    tokens: list[TokenLogprob] | None = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            data = json.loads(payload)
        except ValueError:
            raise InferenceError(f"{url} streamed a line that is not JSON: {payload[:200]}") from None
        usage = data.get("usage") or usage
        for choice in data.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            finish = choice.get("finish_reason") or finish
            pieces = parse_logprobs(choice.get("logprobs"))
            if pieces is not None:
                tokens = tokens if tokens is not None else []
                tokens.extend(pieces)
            if piece:
                if first is None:
                    first = time.perf_counter() - started
                chunks += 1
                _add(continuation.feed(piece), parts, on_text)
    _add(continuation.end(), parts, on_text)
    return Completion(
        text=prefill + "".join(parts),
        tokens_in=int(usage.get("prompt_tokens", 0)),
        tokens_out=int(usage.get("completion_tokens", chunks)),
        first_token_s=first,
        total_s=time.perf_counter() - started,
        finish_reason=finish,
        cost_usd=_cost(usage),
        logprobs=_answer_logprobs(tokens, "".join(parts), asked),
    )


def _add(text: str, parts: list[str], on_text: Callable[[str], None] | None) -> None:
    if text:
        parts.append(text)
        if on_text is not None:
            on_text(text)


def _cost(usage: dict) -> float | None:
    """The price the provider reports for the call (`usage.cost_usd`, or OpenRouter's `usage.cost`)."""
    value = usage.get("cost_usd", usage.get("cost"))
    try:
        return None if value is None else max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def _answer_logprobs(tokens: list[TokenLogprob] | None, added: str, asked: bool) -> list[TokenLogprob] | None:
    """An answer that adds no text has no tokens to report: [] when they were asked for."""
    return [] if tokens is None and asked and not added else tokens


def parse_logprobs(data: object) -> list[TokenLogprob] | None:
    """The answer tokens' log-probabilities in either shape OpenAI-compatible servers send:
    `{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}` (chat
    completions, and llama-server's completions too) or the legacy completions shape
    `{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}]}` (OpenAI's
    and vLLM's completions). None when there are none or they are malformed: log-probabilities
    are extra information, never a reason to fail a call. Alternatives with the same text
    (different token ids) are merged: their probabilities add up."""
    if not isinstance(data, dict):
        return None
    try:
        if isinstance(data.get("content"), list):
            entries = [
                (e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e.get("top_logprobs") or []])
                for e in data["content"]
            ]
        elif isinstance(data.get("tokens"), list) and isinstance(data.get("token_logprobs"), list):
            tops = data.get("top_logprobs") or []
            entries = [
                (token, logprob, list((tops[i] or {}).items()) if i < len(tops) else [])
                for i, (token, logprob) in enumerate(zip(data["tokens"], data["token_logprobs"], strict=True))
            ]
        else:
            return None
        return [
            TokenLogprob(token=str(token), logprob=_number(logprob), top=_merged(top))
            for token, logprob, top in entries
            if logprob is not None  # the legacy shape's first prompt token, when a server echoes it
        ]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _number(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number):
        raise ValueError("not a log-probability")
    return max(number, -1e30)  # llama.cpp's float lowest stands for probability 0


def _merged(top: list[tuple[object, object]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for token, logprob in top:
        value = _number(logprob)
        key = str(token)
        merged[key] = value if key not in merged else _log_add(merged[key], value)
    return merged


def _log_add(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))
