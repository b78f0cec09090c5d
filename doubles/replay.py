"""The replay provider: `connectors.recordings.Recordings` served as OpenAI-compatible models.

`/v1/chat/completions` answers a recorded prompt with the asked model's recorded response and puts
the recorded cost in `usage.cost_usd`, so the live flow routes and fuses over real model behaviour
offline; `/v1/models` lists the recorded models.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from connectors.recordings import Recordings


class _Chat(BaseModel):
    model: str
    messages: list[dict]
    max_tokens: int | None = None
    stream: bool = False


async def list_models(request: Request) -> dict:
    """`GET /v1/models`: the recorded models."""
    recordings: Recordings = request.app.state.recordings
    return {"object": "list", "data": [{"id": m, "object": "model"} for m in recordings.models]}


async def chat_completions(body: _Chat, request: Request):
    """`POST /v1/chat/completions`: the asked model's recorded answer to the last message, with its
    recorded cost; 404 for a prompt or model the recordings do not hold."""
    recordings: Recordings = request.app.state.recordings
    prompt = str(body.messages[-1].get("content", "")) if body.messages else ""
    try:
        text, cost = recordings.answer(body.model, prompt)
    except LookupError as exc:
        return JSONResponse({"error": {"message": str(exc)}}, 404)
    return {
        "object": "chat.completion",
        "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()), "cost_usd": cost},
    }


def create_app(recordings: Recordings) -> FastAPI:
    app = FastAPI(title="RouterBench replay provider")
    app.state.recordings = recordings
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app
