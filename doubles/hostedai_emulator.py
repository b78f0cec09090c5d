"""A stateful local emulator of the hosted·ai GPUaaS API (shared/design/hostedai-api.md).

It keeps teams with API keys, regions, pools of shared GPUs and subscriptions, and reproduces
the quirks the real API shows: subscribe answers slowly or with an empty body, a subscription
appears in lists only after a delay and goes `subscribing` → `active`, one subscription per team
per pool (409), "Insufficient resources" (code 10189007) as HTTP 500 or inside a 2xx body,
lists that carry other teams' items, lists in three shapes, an asynchronous unsubscribe that
answers non-JSON. Each subscription's pod serves an OpenAI-compatible endpoint, backed by the
local llama.cpp model servers. Faults (latency, 5xx, timeouts, preemption) are injected by
configuration. Run it with `homeskillet emulator --port P [--faults …]`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

INSUFFICIENT = 10189007
INTERNAL = 50000001  # the envelope of an internal error answered as HTTP 500
BODY_ERROR = 12370004  # an error object answered inside a 200 body
INFERENCE_PORT = 8000


class Faults(BaseModel):
    """What goes wrong, and how often. Rates are probabilities per API call."""

    latency_s: float = Field(0.0, ge=0, description="Added to every API call.")
    error_rate: float = Field(0.0, ge=0, le=1, description="HTTP 500 without a business code, action not done.")
    read_error_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=f"A read (GET, the estimate) answers HTTP 500 with the envelope {{code {INTERNAL}, 'internal error'}}.",
    )
    read_error_in_body_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=f"A read (GET, the estimate) answers 200 with an error object in the body (code {BODY_ERROR}).",
    )
    write_error_after_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=f"A subscribe or unsubscribe takes effect, then answers HTTP 500 with the envelope "
        f"{{code {INTERNAL}, 'internal error'}}.",
    )
    fault_paths: list[str] = Field(
        [], description="When set, the per-call rate faults above hit only paths that start with one of these."
    )
    rate_limit_rate: float = Field(0.0, ge=0, le=1, description="HTTP 429 with Retry-After, action not done.")
    retry_after_s: float = Field(0.1, ge=0, description="The Retry-After of a 429.")
    insufficient_pools: list[int] = Field([], description="Pools whose subscribe always answers Insufficient.")
    timeout_rate: float = Field(0.0, ge=0, le=1, description="Subscribe is done, then the answer stalls.")
    timeout_s: float = Field(30.0, ge=0, description="How long a stalled answer stalls.")
    empty_subscribe_rate: float = Field(0.0, ge=0, le=1, description="Subscribe is done, the body is empty.")
    business_in_2xx_rate: float = Field(0.5, ge=0, le=1, description="Business errors sent as 200, not 500.")
    preempt_rate: float = Field(0.0, ge=0, le=1, description="Inference on a preemptible pool kills its pod.")
    visibility_s: float = Field(0.2, ge=0, description="A new subscription is missing from lists this long.")
    activation_s: float = Field(0.5, ge=0, description="Then it is `subscribing` until this age.")
    unsubscribe_s: float = Field(0.5, ge=0, description="An unsubscribed item is `un_subscribing` this long.")
    seed: int | None = None

    @classmethod
    def parse(cls, text: str) -> Faults:
        """`error_rate=0.2,latency_s=0.05` (or a JSON object) → Faults; unknown keys are an error."""
        if text.strip().startswith("{"):
            return cls.model_validate_json(text)
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"fault {part!r} is not key=value")
            try:
                values[key.strip()] = json.loads(value)  # numbers, [lists], true/false
            except ValueError:
                values[key.strip()] = value.strip()
        unknown = set(values) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(cls.model_fields)}")
        return cls.model_validate(values)


class TeamConfig(BaseModel):
    id: str
    name: str
    api_key: str


class PoolConfig(BaseModel):
    id: int
    pool_name: str
    pool_label: str
    gpu_model_type: str
    gpuaas_id: int
    gpus: int = Field(gt=0)
    sharing_ratio: int = Field(ge=1, le=10)
    price_per_vgpu_hour: float = Field(ge=0)
    preemptible: bool = False


class EmulatorConfig(BaseModel):
    teams: list[TeamConfig]
    regions: list[dict[str, Any]]
    pools: list[PoolConfig]
    faults: Faults = Faults()


def default_config() -> EmulatorConfig:
    """Three teams (the catalog's tenants), one region, two dedicated and two preemptible pools.
    The keys are the emulator's own, for local use only."""
    return EmulatorConfig(
        teams=[
            TeamConfig(id=str(uuid.UUID(int=i)), name=name, api_key=f"hai-emulator-{name}-key")
            for i, name in enumerate(("demo", "acme", "globex"), start=1)
        ],
        regions=[{"id": 1, "name": "eu-west", "gpuaas_id": 7}],
        pools=[
            PoolConfig(
                id=101,
                pool_name="h100-dedicated",
                pool_label="H100 dedicated",
                gpu_model_type="H100",
                gpuaas_id=7,
                gpus=1,
                sharing_ratio=4,
                price_per_vgpu_hour=0.90,
            ),
            PoolConfig(
                id=102,
                pool_name="a100-dedicated",
                pool_label="A100 dedicated",
                gpu_model_type="A100-80GB",
                gpuaas_id=7,
                gpus=1,
                sharing_ratio=4,
                price_per_vgpu_hour=0.55,
            ),
            PoolConfig(
                id=201,
                pool_name="l4-spot",
                pool_label="L4 spot",
                gpu_model_type="L4",
                gpuaas_id=7,
                gpus=2,
                sharing_ratio=4,
                price_per_vgpu_hour=0.12,
                preemptible=True,
            ),
            PoolConfig(
                id=202,
                pool_name="a10-spot",
                pool_label="A10 spot",
                gpu_model_type="A10",
                gpuaas_id=7,
                gpus=1,
                sharing_ratio=4,
                price_per_vgpu_hour=0.09,
                preemptible=True,
            ),
        ],
    )


def other_account_config() -> EmulatorConfig:
    """The default teams and region on an account whose pools nobody typed into the catalog:
    other names, labels that say the tier in other words, vendor-style GPU names, and a GPU the
    catalog has no card for."""
    base = default_config()
    return base.model_copy(
        update={
            "pools": [
                PoolConfig(
                    id=311,
                    pool_name="h100-sxm-ondemand",
                    pool_label="H100 80GB on-demand",
                    gpu_model_type="NVIDIA H100 80GB HBM3",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=1.10,
                ),
                PoolConfig(
                    id=312,
                    pool_name="a100-80g-eu",
                    pool_label="A100 reserved capacity",
                    gpu_model_type="NVIDIA A100 80GB PCIe",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.70,
                ),
                PoolConfig(
                    id=321,
                    pool_name="gpu-l4-interruptible",
                    pool_label="NVIDIA L4 (interruptible)",
                    gpu_model_type="NVIDIA L4",
                    gpuaas_id=7,
                    gpus=2,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.14,
                    preemptible=True,
                ),
                PoolConfig(
                    id=322,
                    pool_name="rtx-a10-community",
                    pool_label="A10 community cloud",
                    gpu_model_type="NVIDIA A10",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.10,
                    preemptible=True,
                ),
                PoolConfig(
                    id=329,
                    pool_name="b200-spot",
                    pool_label="B200 spot",
                    gpu_model_type="NVIDIA B200",
                    gpuaas_id=7,
                    gpus=1,
                    sharing_ratio=4,
                    price_per_vgpu_hour=0.05,
                    preemptible=True,
                ),
            ]
        }
    )


@dataclass
class Subscription:
    id: int
    team_id: str
    pool_id: int
    vgpus: int
    created: float = field(default_factory=time.monotonic)
    unsubscribed: float | None = None
    services: list[dict[str, str]] = field(default_factory=list)
    started_wall: float = field(default_factory=time.time)
    # the secret part of the pod's service URLs: only the team learns them (connection-info), so
    # another team that sees the pod's name in a list still cannot call it
    service_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def pod_name(self) -> str:
        return f"pod-{self.id}"


class State:
    """All of the emulator's state; every change happens without an await in between."""

    def __init__(self, config: EmulatorConfig):
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.faults.seed)
        self.keys = {t.api_key: t for t in config.teams}
        self.pools = {p.id: p for p in config.pools}
        self.subs: dict[int, Subscription] = {}
        self.history: list[dict[str, Any]] = []  # ended subscriptions, for team metrics
        self.next_id = 5000
        self.preempted = 0
        self.calls = 0  # API calls that reached the emulator
        self.fired: collections.Counter[str] = collections.Counter()  # faults injected, by kind

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)

    def status(self, sub: Subscription, now: float) -> str | None:
        """None while the subscription is not yet (or no longer) visible."""
        if sub.unsubscribed is not None:
            return "un_subscribing" if now - sub.unsubscribed < self.faults.unsubscribe_s else None
        age = now - sub.created
        if age < self.faults.visibility_s:
            return None
        return "subscribing" if age < self.faults.activation_s else "active"

    def sweep(self, now: float | None = None) -> None:
        """Finish unsubscribes whose time has come (by `now`, when given: a list computed at that
        moment must not hide an item that the books still hold)."""
        now = time.monotonic() if now is None else now
        for sub in list(self.subs.values()):
            if sub.unsubscribed is not None and self.status(sub, now) is None:
                self._end(sub, "unsubscribed")

    def _end(self, sub: Subscription, how: str) -> None:
        self.subs.pop(sub.id, None)
        hours = (time.time() - sub.started_wall) / 3600
        self.history.append(
            {
                "subscription_id": sub.id,
                "team_id": sub.team_id,
                "pool_id": sub.pool_id,
                "vgpus": sub.vgpus,
                "pool_hours": round(sub.vgpus * hours, 6),
                "ended": how,
            }
        )

    def preempt(self, sub: Subscription) -> None:
        self.preempted += 1
        self.fired["preempt"] += 1
        self._end(sub, "preempted")

    def used_vgpus(self, pool_id: int) -> int:
        return sum(s.vgpus for s in self.subs.values() if s.pool_id == pool_id)

    def available(self, pool: PoolConfig) -> int:
        return pool.gpus * pool.sharing_ratio - self.used_vgpus(pool.id)

    def item(self, sub: Subscription, now: float) -> dict[str, Any]:
        status = self.status(sub, now)
        return {
            "id": sub.id,
            "pool_id": sub.pool_id,
            "team_id": sub.team_id,
            "status": status,
            "pods": [{"pod_name": sub.pod_name, "pod_status": "Running" if status == "active" else "Pending"}],
            "per_pod_info": {"vgpu_count": sub.vgpus, "vcpu_count": 4 * sub.vgpus, "ram_mb": 16384 * sub.vgpus},
            "metrics": {
                "tflops_usage": round(self.rng.uniform(0, 5), 3),
                "vram_usage": int(self.rng.uniform(0.1, 0.9) * 24 * 1024 * 1024),
                "pool_hours": round(sub.vgpus * (time.time() - sub.started_wall) / 3600, 6),
            },
        }


def _error(status: int, message: str, code: int | None = None) -> JSONResponse:
    return JSONResponse({"code": code if code is not None else status, "message": message, "errors": []}, status)


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


def create_app(config: EmulatorConfig | None = None, model_endpoint=None) -> FastAPI:
    """The emulator app. `model_endpoint(model_name) -> base URL` serves pods' inference; by
    default the local catalog's llama.cpp servers."""
    state = State(config or default_config())
    app = FastAPI(title="hosted·ai emulator", version="2.4.1-emulated", description=__doc__)
    app.state.emulator = state
    if model_endpoint is None:
        model_endpoint = _local_models()

    @app.middleware("http")
    async def faults(request: Request, call_next):
        state.sweep()
        if request.url.path.startswith(("/gpuaas", "/pods/expose-service")):
            state.calls += 1
            f = state.faults
            if f.latency_s:
                await asyncio.sleep(f.latency_s)
            if f.fault_paths and not request.url.path.startswith(tuple(f.fault_paths)):
                return await call_next(request)

            def fires(kind: str, rate: float) -> bool:
                if rate and state.rng.random() < rate:
                    state.fired[kind] += 1
                    return True
                return False

            if fires("error", f.error_rate):
                return PlainTextResponse("Internal Server Error", 500)
            if fires("rate_limit", f.rate_limit_rate):
                return PlainTextResponse("Too Many Requests", 429, headers={"Retry-After": f"{f.retry_after_s:g}"})
            if request.method == "GET" or request.url.path == "/gpuaas/calculate-pool-subscription":  # reads
                if fires("read_error", f.read_error_rate):
                    return _error(500, "internal error", INTERNAL)
                if fires("read_error_in_body", f.read_error_in_body_rate):
                    return _error(200, "temporarily unable to list, try again", BODY_ERROR)
        return await call_next(request)

    def team_of(x_api_key: str | None = Header(None), authorization: str | None = Header(None)) -> TeamConfig:
        key = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
        team = state.keys.get(key or "")
        if team is None:
            raise HTTPException(401, "Unauthorized: the token is invalid, expired, revoked or not allowed from here")
        return team

    def same_team(team: TeamConfig, team_id: str) -> None:
        if team_id != team.id:
            raise HTTPException(403, "Forbidden: the token does not belong to this team")

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    def business(message: str, code: int) -> JSONResponse:
        """Business errors arrive as HTTP 500 or inside a 200 body."""
        if state.rng.random() < state.faults.business_in_2xx_rate:
            state.fired["business_in_2xx"] += 1
            return JSONResponse({"code": code, "message": message, "errors": []}, 200)
        return _error(500, message, code)

    @app.get("/gpuaas/available-regions")
    async def regions(team_id: str, team: TeamConfig = Depends(team_of)):
        same_team(team, team_id)
        return state.config.regions  # a bare array

    @app.get("/gpuaas/available-pools")
    async def pools(team_id: str, gpuaas_id: int, team: TeamConfig = Depends(team_of)):
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

    @app.post("/gpuaas/calculate-pool-subscription")
    async def estimate(body: EstimateBody, team: TeamConfig = Depends(team_of)):
        same_team(team, body.team_id)
        pool = state.pools.get(body.pool_id)
        if pool is None:
            return business(f"Pool {body.pool_id} not found", 404)
        hourly = pool.price_per_vgpu_hour * body.vgpus
        storage = 0.01 * body.duration_hours
        return {
            "total_cost": round(hourly * body.duration_hours + storage, 6),
            "hourly_cost": round(hourly, 6),
            "currency": "USD",
            "breakdown": {"gpu_cost": round(hourly * body.duration_hours, 6), "storage_cost": round(storage, 6)},
        }

    @app.post("/gpuaas/pool/subscribe")
    async def subscribe(body: SubscribeBody, team: TeamConfig = Depends(team_of)):
        same_team(team, body.team_id)
        pool = state.pools.get(body.pool_id)
        if pool is None:
            return business(f"Pool {body.pool_id} not found", 404)
        if any(s.team_id == team.id and s.pool_id == pool.id for s in state.subs.values()):
            return _error(409, "Already subscribed")
        if body.vgpus > state.available(pool) or pool.id in state.faults.insufficient_pools:
            return business("Insufficient resources", INSUFFICIENT)
        state.next_id += 1
        sub = Subscription(id=state.next_id, team_id=team.id, pool_id=pool.id, vgpus=body.vgpus)
        state.subs[sub.id] = sub
        f = state.faults
        if f.timeout_rate and state.rng.random() < f.timeout_rate:
            state.fired["timeout"] += 1
            await asyncio.sleep(f.timeout_s)  # done, but the answer comes too late
        if f.empty_subscribe_rate and state.rng.random() < f.empty_subscribe_rate:
            state.fired["empty_subscribe"] += 1
            return Response(status_code=200)  # done, but the body is empty
        if written_then_failed():
            return _error(500, "internal error", INTERNAL)  # done, but the answer says otherwise
        return {"subscription_id": sub.id}

    @app.get("/gpuaas/pool-subscription")
    async def subscriptions(
        team_id: str,
        page: int = Query(0, ge=0),
        per_page: int = Query(100, ge=1, le=500),
        metric_window: str = "last_5m",
        team: TeamConfig = Depends(team_of),
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

    def own_subscription(team: TeamConfig, subscription_id: int) -> Subscription:
        sub = state.subs.get(subscription_id)
        if sub is None or sub.team_id != team.id:
            raise HTTPException(404, "Subscription not found")
        return sub

    @app.get("/gpuaas/connection-info")
    async def connection_info(
        request: Request, team_id: str, subscription_id: int, team: TeamConfig = Depends(team_of)
    ):
        same_team(team, team_id)
        sub = own_subscription(team, subscription_id)
        status = state.status(sub, time.monotonic())
        base = str(request.base_url).rstrip("/")
        services = [
            {"name": s["name"], "url": f"{base}/pods/{sub.pod_name}/{sub.service_key}/v1"} for s in sub.services
        ]
        return {
            "pods": [
                {
                    "pod_name": sub.pod_name,
                    "pod_status": "Running" if status == "active" else "Pending",
                    "ssh_info": {"host": "127.0.0.1", "port": 22, "user": "ubuntu"},
                    "discovered_services": services,
                }
            ]
        }

    @app.post("/pods/expose-service")
    async def expose(body: ExposeBody, team: TeamConfig = Depends(team_of)):
        sub = own_subscription(team, body.pool_subscription_id)
        if body.pod_name != sub.pod_name:
            raise HTTPException(404, f"Pod {body.pod_name} not found")
        if body.port != INFERENCE_PORT:
            return business(f"Nothing listens on port {body.port} in {body.pod_name}", 400)
        if not any(s["name"] == body.service_name for s in sub.services):
            sub.services.append({"name": body.service_name, "port": str(body.port)})
        return {"service_name": body.service_name, "status": "exposed"}

    def written_then_failed() -> bool:
        """Whether a subscribe or unsubscribe that took effect is answered as an internal error."""
        rate = state.faults.write_error_after_rate
        if rate and state.rng.random() < rate:
            state.fired["write_error_after"] += 1
            return True
        return False

    @app.post("/gpuaas/pool/unsubscribe")
    async def unsubscribe(body: UnsubscribeBody, team: TeamConfig = Depends(team_of)):
        same_team(team, body.team_id)
        sub = own_subscription(team, body.subscription_id)
        if sub.pool_id != body.pool_id:
            return business(f"Subscription {sub.id} is not in pool {body.pool_id}", 400)
        if sub.unsubscribed is None:
            sub.unsubscribed = time.monotonic()
            if written_then_failed():
                return _error(500, "internal error", INTERNAL)  # done, but the answer says otherwise
        return PlainTextResponse("OK")  # 200 with a body that is not JSON

    @app.get("/gpuaas/{team_id}/metrics")
    async def team_metrics(
        team_id: str,
        start_date: str | None = None,
        end_date: str | None = None,
        page: int = Query(1, ge=1),
        itemsPerPage: int = Query(50, ge=1, le=500),  # noqa: N803 (the API's own name)
        team: TeamConfig = Depends(team_of),
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

    @app.api_route("/pods/{pod_name}/{key}/v1/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def pod_inference(pod_name: str, key: str, path: str, request: Request):
        """The pod's OpenAI-compatible server, at the URL connection-info gives its team only; it
        dies with a preempted subscription. A wrong key reads like a pod that is not there."""
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
            target = await model_endpoint(str(body.get("model", "")))
        except LookupError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, 404)
        client = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10))
        try:
            upstream = await client.send(client.build_request("POST", f"{target}/{path}", json=body), stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            return JSONResponse({"error": {"message": f"inference server in {pod_name} failed: {exc}"}}, 502)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        return StreamingResponse(
            relay(), status_code=upstream.status_code, media_type=upstream.headers.get("content-type")
        )

    @app.get("/_emulator/state", include_in_schema=False)
    async def emulator_state():
        state.sweep()
        return {
            "subscriptions": len(state.subs),
            "preempted": state.preempted,
            "calls": state.calls,
            "faults": state.faults.model_dump(),
            "fired": dict(state.fired),
        }

    return app


def _local_models():
    """Pods serve the local catalog's models through the machine's llama.cpp servers."""
    from connectors.model_server import ModelServers, slots_for, threads_for
    from homeskillet.catalog import load_catalog
    from homeskillet.schemas import LlamaCppServing
    from homeskillet.settings import get_settings

    settings = get_settings()
    catalog = load_catalog(settings.catalog)
    threads = settings.model_threads or threads_for(catalog.models)
    servers = ModelServers(settings.home, settings.model_idle_s, threads, settings.llama_server)
    local_pools = [p for p in catalog.pools if p.backend == "local"]

    async def endpoint(name: str) -> str:
        spec = next((m for m in catalog.models if m.name == name and isinstance(m.serving, LlamaCppServing)), None)
        if spec is None:
            raise LookupError(f"model {name!r} is not served in this pod")
        return await asyncio.to_thread(servers.endpoint, spec, slots_for(spec, local_pools))

    return endpoint
