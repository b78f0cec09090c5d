"""Every route of the emulated hosted·ai API, each a named handler that can be imported and called.

Handlers find the emulator's `State` on `request.app.state.emulator` (the `state_of` dependency)
and the caller's team through `team_of`, which takes the key as `X-API-Key` or as a bearer token,
both of which the real API accepts. The answers keep the real API's shapes and quirks, which are
what the hosted·ai connector has to cope with:

- regions come as a bare array; pools as `{items: [...]}`, or `null` when a region has none;
  subscriptions as a paged object whose team filter leaks, so other teams' items come along;
- a business error (unknown pool, "Insufficient resources" with code `INSUFFICIENT`, a wrong port
  or pool) is answered as HTTP 500 or inside a 200 body, as the fault model's
  `business_in_2xx_rate` draws; a second subscription of a team to a pool is a 409;
- a subscribe may stall or answer an empty body after it took effect, and a subscribe or an
  unsubscribe may take effect and still answer an internal error; unsubscribe answers non-JSON;
- `connection-info` answers `{pods: [...]}`, or, as the fault model's `connection_info_shape`
  says, subscription entries each with its pods, a bare array of pods, or objects without pods; it
  may list the inference server under another name (`discovered_as`) or every service at a URL of
  the fault's choosing (`service_url`);
- a pod's OpenAI-compatible server is reached at a URL with a secret only `connection-info` tells
  its own team; a wrong secret reads like a pod that is not there, and inference on a preemptible
  pool may preempt the pod, ending the subscription.

Refusals use the API's error envelope `{code, message, errors}` (`error_response`), for the
`HTTPException`s that handlers and dependencies raise too (`http_error`). `/_emulator/state` is the
emulator's own: what tests and the load test read back about calls made and faults fired.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any

import httpx
from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from connectors.model_server import auth_headers
from doubles.hostedai_emulator.accounts import TeamConfig
from doubles.hostedai_emulator.faults import INTERNAL
from doubles.hostedai_emulator.state import State, Subscription

INSUFFICIENT = 10189007
INFERENCE_PORT = 8000


class SubscribeBody(BaseModel):
    pool_id: int
    team_id: str
    vgpus: int = Field(ge=1, le=64)
    instance_type_id: str | None = None
    ephemeral_storage_block_id: str | None = None
    image_uuid: str | None = None
    shared_volumes: list[Any] = []
    is_vip_priority: bool = False
    guaranteed_gpu_share_percent: int = Field(0, ge=0, le=100)


class UnsubscribeBody(BaseModel):
    subscription_id: int
    team_id: str
    pool_id: int


class EstimateBody(BaseModel):
    pool_id: int
    vgpus: int = Field(ge=1, le=64)
    duration_hours: float = Field(gt=0, le=24 * 366)
    team_id: str


class ExposeBody(BaseModel):
    pod_name: str
    pool_subscription_id: int
    port: int = Field(ge=1, le=65535)
    service_name: str = Field(min_length=1, max_length=63)
    protocol: str = "TCP"
    service_type: str = "http"


# -- answers and checks shared by the handlers


def error_response(status: int, message: str, code: int | None = None) -> JSONResponse:
    """The API's error envelope; its code is the HTTP status unless a business code is given."""
    return JSONResponse({"code": code if code is not None else status, "message": message, "errors": []}, status)


async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    """Refusals raised as `HTTPException` (bad key, foreign team, unknown subscription) answered in
    the API's envelope."""
    return error_response(exc.status_code, str(exc.detail))


def business(state: State, message: str, code: int) -> JSONResponse:
    """Business errors arrive as HTTP 500 or inside a 200 body."""
    if state.rng.random() < state.faults.business_in_2xx_rate:
        state.fired["business_in_2xx"] += 1
        return JSONResponse({"code": code, "message": message, "errors": []}, 200)
    return error_response(500, message, code)


def written_then_failed(state: State) -> bool:
    """Whether a subscribe or unsubscribe that took effect is answered as an internal error."""
    return state.fires("write_error_after", state.faults.write_error_after_rate)


def state_of(request: Request) -> State:
    """The emulator's state, which `create_app` puts on the app."""
    return request.app.state.emulator


def team_of(
    request: Request, x_api_key: str | None = Header(None), authorization: str | None = Header(None)
) -> TeamConfig:
    """The team whose key the call carries, as `X-API-Key` or `Authorization: Bearer`; else 401."""
    key = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
    team = state_of(request).keys.get(key or "")
    if team is None:
        raise HTTPException(401, "Unauthorized: the token is invalid, expired, revoked or not allowed from here")
    return team


def same_team(team: TeamConfig, team_id: str) -> None:
    """A key acts for its own team only: 403 for any other team id."""
    if team_id != team.id:
        raise HTTPException(403, "Forbidden: the token does not belong to this team")


def own_subscription(state: State, team: TeamConfig, subscription_id: int) -> Subscription:
    """The team's subscription; another team's reads as missing (404), not as forbidden."""
    sub = state.subs.get(subscription_id)
    if sub is None or sub.team_id != team.id:
        raise HTTPException(404, "Subscription not found")
    return sub


# -- the API: handlers in the OpenAPI document have no docstrings, which FastAPI would publish there
# as the operations' descriptions


async def regions(team_id: str, team: TeamConfig = Depends(team_of), state: State = Depends(state_of)):
    same_team(team, team_id)
    return state.config.regions  # a bare array


async def pools(team_id: str, gpuaas_id: int, team: TeamConfig = Depends(team_of), state: State = Depends(state_of)):
    same_team(team, team_id)
    items = [
        {
            "id": p.id,
            "pool_name": p.pool_name,
            "pool_label": p.pool_label,
            "gpu_model_type": p.gpu_model_type,
            "available_vgpus": state.available(p),
            "sharing_ratio": p.sharing_ratio,
            "pricing_hourly": f"{p.price_per_vgpu_hour:.4f}",
        }
        for p in state.pools.values()
        if p.gpuaas_id == gpuaas_id
    ]
    return {"items": items} if items else None  # {items: [...]}, or null when none


async def estimate(body: EstimateBody, team: TeamConfig = Depends(team_of), state: State = Depends(state_of)):
    same_team(team, body.team_id)
    pool = state.pools.get(body.pool_id)
    if pool is None:
        return business(state, f"Pool {body.pool_id} not found", 404)
    hourly = pool.price_per_vgpu_hour * body.vgpus
    storage = 0.01 * body.duration_hours
    return {
        "total_cost": round(hourly * body.duration_hours + storage, 6),
        "hourly_cost": round(hourly, 6),
        "currency": "USD",
        "breakdown": {"gpu_cost": round(hourly * body.duration_hours, 6), "storage_cost": round(storage, 6)},
    }


async def subscribe(body: SubscribeBody, team: TeamConfig = Depends(team_of), state: State = Depends(state_of)):
    same_team(team, body.team_id)
    pool = state.pools.get(body.pool_id)
    if pool is None:
        return business(state, f"Pool {body.pool_id} not found", 404)
    if any(s.team_id == team.id and s.pool_id == pool.id for s in state.subs.values()):
        return error_response(409, "Already subscribed")
    if body.vgpus > state.available(pool) or pool.id in state.faults.insufficient_pools:
        return business(state, "Insufficient resources", INSUFFICIENT)
    state.next_id += 1
    sub = Subscription(id=state.next_id, team_id=team.id, pool_id=pool.id, vgpus=body.vgpus)
    state.subs[sub.id] = sub
    f = state.faults
    if state.fires("timeout", f.timeout_rate):
        await asyncio.sleep(f.timeout_s)  # done, but the answer comes too late
    if state.fires("empty_subscribe", f.empty_subscribe_rate):
        return Response(status_code=200)  # done, but the body is empty
    if written_then_failed(state):
        return error_response(500, "internal error", INTERNAL)  # done, but the answer says otherwise
    return {"subscription_id": sub.id}


async def subscriptions(
    team_id: str,
    page: int = Query(0, ge=0),
    per_page: int = Query(100, ge=1, le=500),
    metric_window: str = "last_5m",
    team: TeamConfig = Depends(team_of),
    state: State = Depends(state_of),
):
    same_team(team, team_id)
    now = time.monotonic()
    state.sweep(now)  # what this list no longer shows is gone from the books too
    # the quirk: the team filter leaks, other teams' items come along
    visible = [state.item(s, now) for s in sorted(state.subs.values(), key=lambda s: s.id)]
    visible = [i for i in visible if i["status"] is not None]
    pages = max(1, math.ceil(len(visible) / per_page))
    return {
        "items": visible[page * per_page : (page + 1) * per_page],
        "page": page,
        "per_page": per_page,
        "total_items": len(visible),
        "total_pages": pages,
    }


async def connection_info(
    request: Request,
    team_id: str,
    subscription_id: int,
    team: TeamConfig = Depends(team_of),
    state: State = Depends(state_of),
):
    same_team(team, team_id)
    sub = own_subscription(state, team, subscription_id)
    status = state.status(sub, time.monotonic())
    f = state.faults
    pod_url = f"{str(request.base_url).rstrip('/')}/pods/{sub.pod_name}/{sub.service_key}"
    services = [{"name": s["name"], "url": f"{pod_url}/v1"} for s in sub.services]
    if f.discovered_as and not any(s["name"] == f.discovered_as for s in services):
        services += [
            {"name": "jupyter", "url": f"{pod_url}/lab", "port": "8888"},  # answers no /v1/models
            {"name": f.discovered_as, "url": pod_url, "port": str(INFERENCE_PORT)},
        ]
    if f.service_url:
        services = [{**s, "url": f.service_url} for s in services]
    pod = {
        "pod_name": sub.pod_name,
        "pod_status": "Running" if status == "active" else "Pending",
        "ssh_info": {"host": "127.0.0.1", "port": 22, "user": "ubuntu"},
        "discovered_services": services,
    }
    if f.connection_info_shape == "subscriptions":
        return [{"id": sub.id, "pool_id": sub.pool_id, "status": status, "pods": [pod]}]
    if f.connection_info_shape == "bare":
        return [pod]
    if f.connection_info_shape == "unknown":
        return [{"id": sub.id, "name": sub.pod_name}, {"id": 0, "name": "x"}, {"id": 1, "name": "y"}]
    return {"pods": [pod]}


async def expose(body: ExposeBody, team: TeamConfig = Depends(team_of), state: State = Depends(state_of)):
    sub = own_subscription(state, team, body.pool_subscription_id)
    if body.pod_name != sub.pod_name:
        raise HTTPException(404, f"Pod {body.pod_name} not found")
    if body.port != INFERENCE_PORT:
        return business(state, f"Nothing listens on port {body.port} in {body.pod_name}", 400)
    if state.faults.discovered_as:  # the panel's own: exposing the same server again is refused
        return business(state, f"Port {body.port} of {body.pod_name} is already exposed", 400)
    if not any(s["name"] == body.service_name for s in sub.services):
        sub.services.append({"name": body.service_name, "port": str(body.port)})
    return {"service_name": body.service_name, "status": "exposed"}


async def unsubscribe(body: UnsubscribeBody, team: TeamConfig = Depends(team_of), state: State = Depends(state_of)):
    same_team(team, body.team_id)
    sub = own_subscription(state, team, body.subscription_id)
    if sub.pool_id != body.pool_id:
        return business(state, f"Subscription {sub.id} is not in pool {body.pool_id}", 400)
    if sub.unsubscribed is None:
        sub.unsubscribed = time.monotonic()
        if written_then_failed(state):
            return error_response(500, "internal error", INTERNAL)  # done, but the answer says otherwise
    return PlainTextResponse("OK")  # 200 with a body that is not JSON


async def team_metrics(
    team_id: str,
    start_date: str | None = None,
    end_date: str | None = None,
    page: int = Query(1, ge=1),
    itemsPerPage: int = Query(50, ge=1, le=500),  # noqa: N803 (the API's own name)
    team: TeamConfig = Depends(team_of),
    state: State = Depends(state_of),
):
    same_team(team, team_id)
    now = time.monotonic()
    live = [
        {
            "subscription_id": s.id,
            "pool_id": s.pool_id,
            "vgpus": s.vgpus,
            "ended": None,
            "pool_hours": state.item(s, now)["metrics"]["pool_hours"],
        }
        for s in state.subs.values()
        if s.team_id == team.id
    ]
    rows = [h for h in state.history if h["team_id"] == team.id] + live
    chunk = rows[(page - 1) * itemsPerPage : page * itemsPerPage]
    return {"items": chunk, "total_items": len(rows), "pool_hours": round(sum(r["pool_hours"] for r in rows), 6)}


async def pod_inference(pod_name: str, key: str, path: str, request: Request):
    """The pod's OpenAI-compatible server, at the URL connection-info gives its team only; it
    dies with a preempted subscription. A wrong key reads like a pod that is not there."""
    state = state_of(request)
    sub = next((s for s in state.subs.values() if s.pod_name == pod_name), None)
    if sub is not None and not secrets.compare_digest(key, sub.service_key):
        sub = None
    if sub is None or state.status(sub, time.monotonic()) != "active":
        return JSONResponse({"error": {"message": f"pod {pod_name} is not running"}}, 503)
    if request.method == "GET":
        return {"object": "list", "data": []}
    body = await request.json()
    pool = state.pools[sub.pool_id]
    if pool.preemptible and state.faults.preempt_rate and state.rng.random() < state.faults.preempt_rate:
        state.preempt(sub)
        return JSONResponse({"error": {"message": f"pod {pod_name} was preempted"}}, 503)
    try:
        target = await request.app.state.model_endpoint(str(body.get("model", "")))
    except LookupError as exc:
        return JSONResponse({"error": {"message": str(exc)}}, 404)
    client = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10))
    try:
        # a local model server behind the pod wants the project's key, as from any other caller
        request = client.build_request("POST", f"{target}/{path}", json=body, headers=auth_headers(target))
        upstream = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        await client.aclose()
        return JSONResponse({"error": {"message": f"inference server in {pod_name} failed: {exc}"}}, 502)
    return StreamingResponse(
        relay(upstream, client), status_code=upstream.status_code, media_type=upstream.headers.get("content-type")
    )


async def relay(upstream: httpx.Response, client: httpx.AsyncClient):
    """The model server's answer as it comes (a stream of server-sent events, or one body); the
    upstream answer and its client are closed when it ends or the caller goes away."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()
        await client.aclose()


async def emulator_state(state: State = Depends(state_of)):
    """The emulator's own counters (not hosted·ai's API): live subscriptions, preemptions, API calls
    that reached it, its faults and how often each fired."""
    state.sweep()
    return {
        "subscriptions": len(state.subs),
        "preempted": state.preempted,
        "calls": state.calls,
        "calls_by_route": dict(state.calls_by_route),
        "faults": state.faults.model_dump(),
        "fired": dict(state.fired),
    }
