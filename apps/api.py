"""The OpenAI-compatible front door: `POST /v1/chat/completions` and `GET /v1/models`, so that
the `openai` SDK, LangChain, curl and chat UIs talk to Homeskillet unchanged.

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
- Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with the status
  codes the SDK maps to its exceptions (see `error_of`). A field that is not supported is refused
  (400, naming it), never ignored.

The token (`Authorization: Bearer`) decides the tenant, through the same guards as the MCP server
it is served beside (`apps.mcp_server.create_app`).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from homeskillet.errors import (
    CapacityTimeout,
    CovenantViolation,
    HomeskilletError,
    InvalidRequest,
    NoRoute,
    TooManyRequests,
    public_message,
)
from homeskillet.schemas import FusionResult, Strategy

PREFIX = "homeskillet/"
STRATEGIES: tuple[str, ...] = get_args(Strategy)
BUDGET_TERMS = ("budget_usd_per_day", "budget_usd_per_month")


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


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that Homeskillet serves; any other is
    refused by name (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="One answer per request.")
    stream: Literal[False] = Field(False, description="Streaming is not served yet.")
    user: str | None = Field(None, max_length=256)

    @field_validator("messages")
    @classmethod
    def _ends_with_the_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError(f"the last message must be the user's, not the {messages[-1].role}'s")
        return messages


NOT_SERVED = {"stream": "streaming is not served yet", "n": "one answer per request (n=1) is served"}


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
    (every turn before it), the strategy and constraints the `model` names."""
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


def routes(tools) -> list[Route]:
    """The /v1 routes over the MCP server's `Tools` (catalog, token store, `run_request`)."""

    async def chat_completions(request: Request) -> JSONResponse:
        started = time.perf_counter()
        tenant = request.scope["state"]["homeskillet_tenant"]
        request_id = "api-" + uuid.uuid4().hex[:16]
        created = int(time.time())
        route, model_s = "", 0.0
        try:
            try:
                body = await request.json()
            except ValueError:
                raise InvalidRequest("the body is not JSON") from None
            chat = parse_request(body)
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
            result = await tools.run_request(tenant, request_id, "api", **arguments)
            model_s = model_seconds(result)
            route = ",".join(f"{f.fragment_id}={f.model}" for f in result.fragments)
            status, payload, headers = 200, completion(chat, result, created), {}
        except Exception as exc:
            status, payload, headers = error_of(exc, request_id)
        overhead_ms = (time.perf_counter() - started - model_s) * 1000
        headers |= {
            "x-homeskillet-request-id": request_id,
            "x-homeskillet-overhead-ms": f"{overhead_ms:.1f}",
            "x-homeskillet-route": route,
        }
        return JSONResponse(payload, status_code=status, headers=headers)

    async def models(request: Request) -> JSONResponse:
        from tasks.covenant import restrict

        tenant = request.scope["state"]["homeskillet_tenant"]
        services = tools.services
        covenant = services.covenant(tenant)
        allowed, _ = restrict(services.catalog, covenant)
        strategies = [s for s in STRATEGIES if covenant.allowed_strategies is None or s in covenant.allowed_strategies]
        names = [PREFIX + s for s in strategies] + [m.name for m in allowed.models]
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "homeskillet"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    return [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
