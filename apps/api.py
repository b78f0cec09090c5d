"""The OpenAI-compatible front door: `POST /v1/chat/completions` and `GET /v1/models`, so that
the `openai` SDK, LangChain, curl and chat UIs talk to Homeskillet unchanged; and `POST
/v1/feedback`, a tenant's score of one of its finished answers.

- `model`: `homeskillet/auto` (the router decides per fragment), `homeskillet/<strategy>`
  (single, cascade, ensemble, moa), or a catalog model's name (pinned: every fragment on it,
  still allocated, run and released through the flow). `/v1/models` lists what the caller's
  covenant allows.
- `messages`: the last turn must be the user's; it is the prompt that is decomposed. The system
  prompt and earlier turns reach every fragment's model as context.
- Every request is one real `fuse_request` flow run, tagged with the tenant and `api`. The answer
  comes back as the assistant message, with `usage` (real token counts) and a `homeskillet`
  object: the request id, each fragment's model, pool, tier, allocation id, cost and reason.
- Headers on every answer, success or error: `x-homeskillet-request-id`,
  `x-homeskillet-overhead-ms` (wall time minus the time inside model calls, along the plan's
  longest chain) and `x-homeskillet-route` (the model of each fragment).
- `stream: true`: Server-Sent Events in OpenAI's `chat.completion.chunk` shape, ending with
  `data: [DONE]` (`stream_options.include_usage` adds the usage chunk). A fragment whose route
  makes one model call streams its tokens as they are generated; the fused answer streams in
  fusion order (`apps.streaming`). The headers come before the answer: the request id; the
  route and the overhead are in the last chunk. The client going away cancels the flow run and
  releases every slice.
- The body is at most MAX_BODY_BYTES, read no further.
- `POST /v1/feedback` (`{"request_id", "score", "fragment"?}`, at most FEEDBACK_MAX_BODY_BYTES):
  the token's tenant scores its finished request's answer from 0 to 1, or one fragment's
  (`connectors.feedback`); 200 with the record. Another tenant's request is a 404 exactly like an
  unknown one.
- Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the status
  codes the SDK maps to its exceptions (see `error_of`). A field that is not supported is refused
  (400, naming it), never ignored.

The token (`Authorization: Bearer`) decides the tenant, through the same guards as the MCP server
it is served beside (`apps.mcp_server.create_app`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from typing import Any, Literal, get_args

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from apps.streaming import FusedStream
from connectors.feedback import MAX_ID_CHARS, UnknownRequest, record_feedback
from homeskillet.errors import (
    CapacityTimeout,
    CovenantViolation,
    HomeskilletError,
    InvalidRequest,
    NoRoute,
    TooManyRequests,
    public_message,
)
from homeskillet.schemas import MAX_PROMPT_CHARS, Constraints, FusionResult, Strategy

log = logging.getLogger(__name__)

PREFIX = "homeskillet/"
STRATEGIES: tuple[str, ...] = get_args(Strategy)
BUDGET_TERMS = ("budget_usd_per_day", "budget_usd_per_month")
# a prompt and its context are at most MAX_PROMPT_CHARS characters: room for JSON's escapes
MAX_BODY_BYTES = 4 * MAX_PROMPT_CHARS
FEEDBACK_MAX_BODY_BYTES = 4096  # two ids and a number


class UnknownModelName(InvalidRequest):
    """The request names a model that is neither Homeskillet's nor in the catalog."""


class Part(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # `name` and the like: labels, not content

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that Homeskillet serves; any other is
    refused by name (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="One answer per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    stop: str | list[str] | None = Field(None, description="A string is one stop sequence.")

    @field_validator("stop")
    @classmethod
    def _stop_as_a_list(cls, stop: str | list[str] | None) -> list[str] | None:
        """A list, within the bounds every request's stop sequences have (`Constraints.stop`)."""
        try:
            return Constraints(stop=[stop] if isinstance(stop, str) else stop).stop
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError(f"the last message must be the user's, not the {messages[-1].role}'s")
        return messages


NOT_SERVED = {"n": "one answer per request (n=1) is served"}


class FeedbackRequest(BaseModel):
    """A tenant's score of one of its finished answers: the whole request's, or one fragment's."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    score: float = Field(ge=0, le=1, allow_inf_nan=False, strict=True, description="0 (wrong) to 1 (right).")
    fragment: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS, description="f1, f2, …; none: all.")


def parse_feedback(body: Any) -> FeedbackRequest:
    """The feedback, or InvalidRequest naming each problem (a field not served: its name)."""
    try:
        return FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {'is not supported' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors()
        ]
        raise InvalidRequest("; ".join(problems)) from None


def parse_request(body: Any) -> ChatRequest:
    """The request, or InvalidRequest naming each problem (a field not served: its name)."""
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            where = ".".join(map(str, e["loc"])) or "body"
            what = NOT_SERVED.get(where) or (
                "is not supported" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            )
            problems.append(f"{where}: {what}")
        raise InvalidRequest("; ".join(problems)) from None


def flow_arguments(chat: ChatRequest, catalog_models: set[str]) -> dict[str, Any]:
    """What `fuse_request` gets for the request: the prompt (the last user turn), the context
    (every turn before it), the strategy and constraints the `model` names, and the sampling
    (`temperature`, `stop`) every model call of the request gets."""
    if chat.model.startswith(PREFIX):
        strategy = chat.model.removeprefix(PREFIX)
        if strategy not in STRATEGIES:
            raise UnknownModelName(f"model {chat.model!r} does not exist; {PREFIX}<{'|'.join(STRATEGIES)}>")
        constraints: dict[str, Any] = {}
    elif chat.model in catalog_models:
        strategy, constraints = "single", {"allowed_models": [chat.model]}
    else:
        raise UnknownModelName(f"model {chat.model!r} does not exist; GET /v1/models lists yours")
    max_tokens = chat.max_completion_tokens or chat.max_tokens
    if max_tokens is not None:
        constraints["max_tokens"] = max_tokens
    if chat.temperature is not None:
        constraints["temperature"] = chat.temperature
    if chat.stop:
        constraints["stop"] = chat.stop
    *earlier, last = chat.messages
    context = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in earlier]
    return {"prompt": last.text(), "strategy": strategy, "constraints": constraints, "context": context}


def completion(chat: ChatRequest, result: FusionResult, created: int) -> dict[str, Any]:
    """The answer in OpenAI's `chat.completion` shape, with the `homeskillet` extension."""
    tokens_in = sum(f.tokens_in for f in result.fragments)
    tokens_out = sum(f.tokens_out for f in result.fragments)
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "total_tokens": tokens_in + tokens_out},
        "homeskillet": {
            "request_id": result.request_id,
            "fusion": result.fusion,
            "cost_usd": result.cost_usd,
            "fragments": [
                {
                    "id": f.fragment_id,
                    "model": f.model,
                    "pool": f.pool,
                    "tier": f.tier,
                    "allocation_id": f.allocation_id,
                    "cost_usd": f.cost_usd,
                    "reason": f.reason,
                }
                for f in result.fragments
            ],
        },
    }


def model_seconds(result: FusionResult) -> float:
    """The time inside model calls along the plan's longest chain: fragments that run at once
    count once; a reduce plan's combining fragment runs after all the others."""
    infer = [f.timings.infer_s for f in result.fragments]
    if result.fusion == "reduce" and len(infer) > 1:
        return max(infer[:-1]) + infer[-1]
    return max(infer, default=0.0)


def error_of(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, OpenAI error body, extra headers) for what a request raised."""
    message = public_message(exc, request_id)
    kind, code, param, headers = "invalid_request_error", None, None, {}
    if isinstance(exc, UnknownModelName):
        status, code, param = 404, "model_not_found", "model"
    elif isinstance(exc, UnknownRequest):  # another tenant's request: the same answer as an unknown one
        status, code, param = 404, "request_not_found", "request_id"
    elif isinstance(exc, CovenantViolation) and exc.term in BUDGET_TERMS:
        status, kind, code = 429, "insufficient_quota", "insufficient_quota"
    elif isinstance(exc, CovenantViolation) and exc.term == "max_concurrent_requests":
        status, kind, code, headers = 429, "rate_limit_error", "rate_limit_exceeded", {"Retry-After": "1"}
    elif isinstance(exc, CovenantViolation):
        status, kind, code = 403, "permission_error", exc.term
    elif isinstance(exc, TooManyRequests):
        status, kind, code = 429, "rate_limit_error", "rate_limit_exceeded"
        headers = {"Retry-After": str(math.ceil(exc.retry_after_s))}
    elif isinstance(exc, InvalidRequest | NoRoute):
        status = 400
    elif isinstance(exc, CapacityTimeout):
        status, kind, code, headers = 503, "server_error", "no_capacity", {"Retry-After": "5"}
    else:
        status, kind = (502 if isinstance(exc, HomeskilletError) else 500), "server_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers


def routes(tools, guards) -> list[Route]:
    """The /v1 routes over the MCP server's `Tools` (catalog, token store, `run_request`) and its
    `Guards` (each call counts against its tenant's rate, as an MCP tool call does)."""

    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        tenant = request.scope["state"]["homeskillet_tenant"]
        request_id = "api-" + uuid.uuid4().hex[:16]
        created = int(time.time())
        route, model_s = "", 0.0
        try:
            guards.call(tenant)
            chat = parse_request(await _json_body(request))
            services = tools.services
            arguments = flow_arguments(chat, {m.name for m in services.catalog.models})
            from tasks.preparation import make_request

            make_request(
                arguments["prompt"],
                tenant,
                arguments["strategy"],
                arguments["constraints"],
                request_id,
                context=arguments["context"],
            )  # refused here, before a flow run exists
            if chat.stream:
                return await streamed(request, tools, tenant, request_id, chat, arguments, created, started)
            run = asyncio.create_task(tools.run_request(tenant, request_id, "api", **arguments))
            if await _gone_first(request, run):
                return Response(status_code=499)  # nobody reads it: the run is cancelled, its slices released
            result = run.result()
            model_s = model_seconds(result)
            route = route_of(result)
            status, payload, headers = 200, completion(chat, result, created), {}
        except Exception as exc:
            status, payload, headers = error_of(exc, request_id)
        return JSONResponse(
            payload, status_code=status, headers=headers | answer_headers(request_id, started, model_s, route)
        )

    async def models(request: Request) -> JSONResponse:
        from tasks.covenant import restrict

        tenant = request.scope["state"]["homeskillet_tenant"]
        try:
            guards.call(tenant)
        except TooManyRequests as exc:
            status, payload, headers = error_of(exc, "models")
            return JSONResponse(payload, status_code=status, headers=headers)
        services = tools.services
        covenant = services.covenant(tenant)
        allowed, _ = restrict(services.catalog, covenant)
        strategies = [s for s in STRATEGIES if covenant.allowed_strategies is None or s in covenant.allowed_strategies]
        names = [PREFIX + s for s in strategies] + [m.name for m in allowed.models]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "homeskillet"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    async def feedback(request: Request) -> JSONResponse:
        tenant = request.scope["state"]["homeskillet_tenant"]
        request_id = "feedback-" + uuid.uuid4().hex[:16]  # the call's, for the operator's log
        try:
            guards.call(tenant)
            asked = parse_feedback(await _json_body(request, FEEDBACK_MAX_BODY_BYTES))
            settings = tools.settings  # the server's datasets: by default the ones the flow writes to
            record = await asyncio.to_thread(
                record_feedback,
                settings.feedback,
                settings.telemetry,
                tenant,
                asked.request_id,
                asked.score,
                asked.fragment,
            )
        except Exception as exc:
            if not isinstance(exc, HomeskilletError):
                log.warning("%s of tenant %s failed: %s: %s", request_id, tenant, type(exc).__name__, exc)
            status, payload, headers = error_of(exc, request_id)
            return JSONResponse(payload, status_code=status, headers=headers)
        return JSONResponse(record.model_dump(mode="json"))

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
    ]


async def _json_body(request: Request, limit: int = MAX_BODY_BYTES) -> Any:
    """The request's JSON, read only up to `limit` bytes (a stranger's body is bounded before it
    is held in memory), or InvalidRequest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"the body is {declared} bytes; at most {limit}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise InvalidRequest(f"the body is over {limit} bytes")
    try:
        return json.loads(body)
    except ValueError:
        raise InvalidRequest("the body is not JSON") from None


def route_of(result: FusionResult) -> str:
    return ",".join(f"{f.fragment_id}={f.model}" for f in result.fragments)


def answer_headers(request_id: str, started: float, model_s: float, route: str) -> dict[str, str]:
    return {
        "x-homeskillet-request-id": request_id,
        "x-homeskillet-overhead-ms": f"{(time.perf_counter() - started - model_s) * 1000:.1f}",
        "x-homeskillet-route": route,
    }


# --- streaming ------------------------------------------------------------------------------------
# The response starts with the request's first text (a fragment's first token, or its answer):
# a request refused before it runs (its covenant, the concurrency cap, no capacity) is a plain
# HTTP error with its status. After that, a failure that nothing could continue is an error event
# in the stream. The headers are sent before the answer: the request id only; the route and the
# overhead come in the last chunk's `homeskillet` object.
STARTS = ("token", "answered")


async def streamed(
    request: Request,
    tools,
    tenant: str,
    request_id: str,
    chat: ChatRequest,
    arguments: dict,
    created: int,
    started: float,
):
    events: asyncio.Queue[dict] = asyncio.Queue()

    async def heard(event: dict | None) -> None:
        if event is not None:
            events.put_nowait(event)

    run = asyncio.create_task(tools.run_request(tenant, request_id, "api", heard, stream=True, **arguments))
    fused, pending = FusedStream(), []
    gone = asyncio.ensure_future(_disconnected(request))  # until the response starts; then Starlette's
    try:
        while True:  # until the first text of the answer, or the end
            event = await _next(events, run, gone)
            if gone.done():
                await _cancelled(run)
                return Response(status_code=499)  # nobody reads it
            if event is None:
                break
            pending.append(delta := fused.feed(event))
            if event["event"] in STARTS and delta:
                break
        if event is None and run.exception() is not None:
            status, payload, headers = error_of(run.exception(), request_id)
            return JSONResponse(
                payload, status_code=status, headers=headers | answer_headers(request_id, started, 0.0, "")
            )
    except BaseException:
        await _cancelled(run)
        raise
    finally:
        gone.cancel()

    chunk = _chunker(request_id, chat.model, created)

    async def body():
        try:
            yield chunk({"role": "assistant", "content": ""})
            for delta in pending:
                if delta:
                    yield chunk({"content": delta})
            while (event := await _next(events, run)) is not None:
                if delta := fused.feed(event):
                    yield chunk({"content": delta})
            try:
                result = run.result()
            except Exception as exc:  # nothing could continue the answer
                yield _sse(error_of(exc, request_id)[1])
                yield "data: [DONE]\n\n"
                return
            if rest := fused.finish(result.answer):
                yield chunk({"content": rest})
            full = completion(chat, result, created)
            extension = {
                **full["homeskillet"],
                "route": route_of(result),
                "overhead_ms": round((time.perf_counter() - started - model_seconds(result)) * 1000, 1),
            }
            yield chunk({}, finish_reason="stop", homeskillet=extension)
            if chat.stream_options is not None and chat.stream_options.include_usage:
                yield _sse({**chunk.head, "choices": [], "usage": full["usage"]})
            yield "data: [DONE]\n\n"
        finally:
            await _cancelled(run)  # the client went away: the run is cancelled, its slices released

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"x-homeskillet-request-id": request_id, "cache-control": "no-cache"},
    )


async def _next(events: asyncio.Queue, run: asyncio.Task, *also: asyncio.Future) -> dict | None:
    """The run's next event, or None once it ended and every event was taken (or one of `also`
    ended first)."""
    if not events.empty():
        return events.get_nowait()
    getter = asyncio.ensure_future(events.get())
    try:
        done, _ = await asyncio.wait({run, getter, *also}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        getter.cancel()
        raise
    if getter in done:
        return getter.result()
    getter.cancel()
    return events.get_nowait() if not events.empty() else None


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (its body was read already: what comes is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _gone_first(request: Request, run: asyncio.Task) -> bool:
    """Wait for the run; True (the run cancelled, its slices released) when the client went away first."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        await _cancelled(run)
        raise
    finally:
        gone.cancel()
    if run.done():
        return False
    await _cancelled(run)
    return True


async def _cancelled(run: asyncio.Task) -> None:
    """Cancel the run if it still runs, and wait, shielded, until it has released what it held."""
    if not run.done():
        run.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.wait({run})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _chunker(request_id: str, model: str, created: int):
    """chunk(delta, finish_reason=None, **extra) → one `chat.completion.chunk` event."""
    head = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return _sse({**head, "choices": [choice], **extra})

    chunk.head = head  # type: ignore[attr-defined]
    return chunk
