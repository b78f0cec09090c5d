"""The hosted·ai GPUaaS API client (async httpx), as far as the API is known (hostedai-api.md).

- Retries (tenacity): exponential backoff with jitter, bounded, only for failures worth retrying
  (timeouts, connection errors, 5xx without a business code, 429 honouring Retry-After).
  Idempotent reads (GET, and the price estimate) are also retried on any 5xx and on an error
  object inside a 2xx body, unless it is an auth or not-found refusal (the AWS SDKs' rule): a
  read that failed changed nothing, so asking again is safe.
- Subscribe is never retried blindly: after a timeout, an empty body or a 409 the client
  reconciles by listing the team's subscriptions, so a retry never makes a second one.
- One circuit breaker per base URL, shared by every task of the process (purgatory).
- The API key lives in a SecretStr and only in the request header: never in a log line,
  an exception, a repr.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from pydantic_settings import BaseSettings, SettingsConfigDict
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from connectors import http_client
from connectors.telemetry import BREAKER
from homeskillet.errors import (
    AlreadySubscribed,
    CircuitOpen,
    HostedAIAuthError,
    HostedAIError,
    HostedAIRejected,
    HostedAIUnavailable,
    InsufficientResources,
)
from homeskillet.schemas import HostedAICredentials

log = logging.getLogger(__name__)
INSUFFICIENT = 10189007
IDEMPOTENT = ("GET", "HEAD")
# Refusals that asking again cannot change, recognised in an error body's code or message.
AUTH_CODES = (401, 403)
AUTH_WORDS = re.compile(
    r"unauthori[sz]ed|forbidden|not allowed|permission|access denied|invalid (api )?(key|token)|"
    r"token (is )?(invalid|expired|revoked)|expired|revoked",
    re.IGNORECASE,
)
NOT_FOUND_WORDS = re.compile(r"not found|does not exist|no such", re.IGNORECASE)
LIVE = ("subscribing", "subscribed", "active", "running")
READY = ("subscribed", "active", "running")

# One breaker per base URL for the whole process. Only failures that say "hosted·ai is not
# answering" count; refusals (business errors, bad keys) do not.
BREAKERS = AsyncCircuitBreakerFactory(exclude=[HostedAIRejected, HostedAIAuthError])


class Policy(BaseSettings):
    """Timeouts and bounds of the hosted·ai client, from HOMESKILLET_HOSTEDAI_* variables."""

    model_config = SettingsConfigDict(env_prefix="HOMESKILLET_HOSTEDAI_", frozen=True, extra="ignore")

    timeout_s: float = 20.0
    subscribe_timeout_s: float = 30.0
    attempts: int = 4
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    retry_after_max_s: float = 30.0
    reconcile_s: float = 20.0
    ready_s: float = 120.0
    unsubscribe_s: float = 120.0
    poll_s: float = 0.25
    breaker_threshold: int = 5
    breaker_ttl_s: float = 30.0


@dataclass(frozen=True)
class HostedPool:
    id: int
    name: str
    label: str
    gpu_model_type: str
    available_vgpus: int
    sharing_ratio: int
    price_per_vgpu_hour: float


@dataclass(frozen=True)
class SubscriptionItem:
    id: int
    pool_id: int
    team_id: str
    status: str
    pods: list[dict[str, Any]]
    metrics: dict[str, Any]


def items(data: Any) -> list[Any]:
    """Lists come as a bare array, as {"items": [...]}, or as null."""
    if data is None or data == "":
        return []
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        return data["items"]
    raise HostedAIUnavailable(f"hosted·ai answered a list in an unknown shape: {str(data)[:200]}")


def vgpus_for(tflops: float, vram_gb: float, card_tflops: float, card_vram_gb: float, sharing_ratio: int) -> int:
    """vGPU slots that give at least `tflops` and `vram_gb`: a slot has a card's memory (paged
    beyond) and 1/sharing_ratio of its compute."""
    return max(1, math.ceil(vram_gb / card_vram_gb), math.ceil(tflops / (card_tflops / sharing_ratio)))


class HostedAIClient:
    def __init__(self, credentials: HostedAICredentials, policy: Policy | None = None):
        self.credentials = credentials
        self.policy = policy or Policy()
        self.team_id = credentials.team_id
        self._base = credentials.url.rstrip("/")

    def __repr__(self) -> str:
        return f"HostedAIClient(url={self._base!r}, team_id={self.team_id!r})"

    # --- transport -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        key = self.credentials.api_key.get_secret_value()
        if self.credentials.auth_header == "bearer":
            return {"Authorization": f"Bearer {key}"}
        return {"X-API-Key": key}

    async def _once(
        self, method: str, path: str, params: dict | None, body: dict | None, timeout: float, idempotent: bool
    ) -> Any:
        url = f"{self._base}{path}"
        try:
            response = await http_client.client().request(
                method,
                url,
                params=params,
                json=body,
                headers=self._headers(),
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            )
        except httpx.TimeoutException:
            raise HostedAIUnavailable(f"hosted·ai {method} {path} timed out after {timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise HostedAIUnavailable(f"hosted·ai {method} {path} failed: {type(exc).__name__}") from None
        return _parse(response, method, path, idempotent=idempotent)

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: dict | None = None,
        retry: bool = True,
        timeout: float | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """One API call through the breaker, retried only when `retry` and only when worth it.

        `idempotent` (default: GET and HEAD) widens what is worth it: a read is retried on any
        5xx and on an error inside a 2xx body too, unless it is an auth or not-found refusal."""
        policy = self.policy
        idempotent = method.upper() in IDEMPOTENT if idempotent is None else idempotent
        attempts = policy.attempts if retry else 1
        try:
            breaker = await BREAKERS.get_breaker(
                self._base, threshold=policy.breaker_threshold, ttl=policy.breaker_ttl_s
            )
            async with breaker:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(attempts),
                    wait=self._wait,
                    retry=retry_if_exception_type(HostedAIUnavailable),
                    reraise=True,
                ):
                    with attempt:
                        data = await self._once(method, path, params, body, timeout or policy.timeout_s, idempotent)
                        BREAKER.labels(self._base).set(0)
                        return data
        except OpenedState:
            BREAKER.labels(self._base).set(1)
            raise CircuitOpen(
                f"hosted·ai at {self._base} is failing: circuit open after {policy.breaker_threshold} failed "
                f"calls in a row; calls fail fast for up to {policy.breaker_ttl_s:g}s"
            ) from None

    def _wait(self, state) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(retry_after, self.policy.retry_after_max_s)
        return wait_exponential_jitter(multiplier=self.policy.backoff_initial_s, max=self.policy.backoff_max_s)(state)

    # --- discovery and estimates -----------------------------------------------------------

    async def regions(self) -> list[dict[str, Any]]:
        return items(await self.call("GET", "/gpuaas/available-regions", params={"team_id": self.team_id}))

    async def pools(self) -> list[HostedPool]:
        found = []
        for region in await self.regions():
            data = await self.call(
                "GET", "/gpuaas/available-pools", params={"team_id": self.team_id, "gpuaas_id": region["gpuaas_id"]}
            )
            for p in items(data):
                found.append(
                    HostedPool(
                        id=int(p["id"]),
                        name=p["pool_name"],
                        label=p.get("pool_label", ""),
                        gpu_model_type=p["gpu_model_type"],
                        available_vgpus=int(p["available_vgpus"]),
                        sharing_ratio=int(p.get("sharing_ratio") or 1),
                        price_per_vgpu_hour=float(p["pricing_hourly"]),
                    )
                )
        return found

    async def estimate(self, pool_id: int, vgpus: int, hours: float) -> dict[str, Any]:
        return await self.call(
            "POST",
            "/gpuaas/calculate-pool-subscription",
            body={"pool_id": pool_id, "vgpus": vgpus, "duration_hours": hours, "team_id": self.team_id},
            idempotent=True,  # a price quote changes nothing
        )

    # --- subscriptions ---------------------------------------------------------------------

    async def subscriptions(self) -> list[SubscriptionItem]:
        """This team's subscriptions; the API's list carries other teams' items too, so filter here."""
        found, page = [], 0
        while True:
            data = await self.call(
                "GET",
                "/gpuaas/pool-subscription",
                params={"team_id": self.team_id, "page": page, "per_page": 100, "metric_window": "last_5m"},
            )
            for i in items(data):
                if str(i.get("team_id")) == self.team_id:
                    found.append(
                        SubscriptionItem(
                            id=int(i["id"]),
                            pool_id=int(i["pool_id"]),
                            team_id=str(i["team_id"]),
                            status=str(i.get("status")),
                            pods=i.get("pods") or [],
                            metrics=i.get("metrics") or {},
                        )
                    )
            page += 1
            if not isinstance(data, dict) or page >= int(data.get("total_pages") or 1):
                return found

    async def find(self, pool_id: int) -> SubscriptionItem | None:
        """The team's live subscription in the pool (at most one exists)."""
        return next((s for s in await self.subscriptions() if s.pool_id == pool_id and s.status in LIVE), None)

    async def subscribe(self, pool_id: int, vgpus: int, extra: dict[str, Any] | None = None) -> int:
        """Subscribe, or adopt the team's existing subscription in the pool; never two.

        The call itself is never retried blindly: after a timeout, an empty or odd body, a 5xx
        without a business code or a 409, the team's list decides whether it happened.
        """
        existing = await self.find(pool_id)
        if existing is not None:
            return existing.id
        body = {
            "pool_id": pool_id,
            "team_id": self.team_id,
            "vgpus": vgpus,
            "instance_type_id": None,
            "ephemeral_storage_block_id": None,
            "image_uuid": None,
            "shared_volumes": [],
            "is_vip_priority": False,
            "guaranteed_gpu_share_percent": 0,
            **(extra or {}),
        }
        for _ in range(self.policy.attempts):
            try:
                data = await self.call(
                    "POST", "/gpuaas/pool/subscribe", body=body, retry=False, timeout=self.policy.subscribe_timeout_s
                )
                if isinstance(data, dict) and data.get("subscription_id") is not None:
                    return int(data["subscription_id"])
                log.warning("hosted·ai subscribe to pool %s answered %r; reconciling", pool_id, str(data)[:80])
            except (AlreadySubscribed, HostedAIUnavailable) as exc:
                if isinstance(exc, CircuitOpen):
                    raise
                log.warning("hosted·ai subscribe to pool %s: %s; reconciling", pool_id, exc)
            except InsufficientResources:
                raise  # nothing was made: the caller tries the next pool
            except HostedAIRejected as exc:
                # a refusal, or a fault after the subscription was made: hosted·ai answers both
                # with an error code (e.g. 500 {50000001, "internal error"}); the list decides, once
                log.warning("hosted·ai subscribe to pool %s: %s; reconciling before giving up", pool_id, exc)
                found = await self._reconcile(pool_id)
                if found is not None:
                    return found.id
                raise
            found = await self._reconcile(pool_id)
            if found is not None:
                return found.id
        raise HostedAIUnavailable(f"hosted·ai subscribe to pool {pool_id} failed {self.policy.attempts} times")

    async def _reconcile(self, pool_id: int) -> SubscriptionItem | None:
        """After an unclear subscribe: the team's live subscription in the pool once it shows, or
        None when none shows in time, or when the one that blocked it (un_subscribing) is gone."""
        deadline = time.monotonic() + self.policy.reconcile_s
        leaving_seen = False
        while True:
            mine = [s for s in await self.subscriptions() if s.pool_id == pool_id]
            live = next((s for s in mine if s.status in LIVE), None)
            if live is not None:
                return live
            leaving = any(s.status == "un_subscribing" for s in mine)
            if leaving_seen and not leaving:
                return None  # the old one finished leaving: subscribing again can work now
            if leaving and not leaving_seen:
                leaving_seen = True
                deadline = max(deadline, time.monotonic() + self.policy.unsubscribe_s)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(self.policy.poll_s)

    async def wait_ready(self, subscription_id: int) -> SubscriptionItem:
        deadline = time.monotonic() + self.policy.ready_s
        while True:
            sub = next((s for s in await self.subscriptions() if s.id == subscription_id), None)
            if sub is not None and sub.status in READY:
                return sub
            if time.monotonic() >= deadline:
                state = sub.status if sub else "missing"
                raise HostedAIUnavailable(
                    f"hosted·ai subscription {subscription_id} not ready after {self.policy.ready_s:g}s ({state})"
                )
            await asyncio.sleep(self.policy.poll_s)

    async def exists(self, subscription_id: int) -> bool:
        return any(s.id == subscription_id and s.status in LIVE for s in await self.subscriptions())

    async def inference_url(self, subscription_id: int, service: str = "inference", port: int = 8000) -> str:
        """The OpenAI-compatible service of the subscription's pod; exposed first if not yet."""
        for _ in range(2):
            info = await self.call(
                "GET", "/gpuaas/connection-info", params={"team_id": self.team_id, "subscription_id": subscription_id}
            )
            pods = items((info or {}).get("pods") if isinstance(info, dict) else info)
            if not pods:
                raise HostedAIUnavailable(f"hosted·ai subscription {subscription_id} has no pod yet")
            pod = pods[0]
            for svc in pod.get("discovered_services") or []:
                if svc.get("name") == service and svc.get("url"):
                    return str(svc["url"])
            await self.call(
                "POST",
                "/pods/expose-service",
                body={
                    "pod_name": pod["pod_name"],
                    "pool_subscription_id": subscription_id,
                    "port": port,
                    "service_name": service,
                    "protocol": "TCP",
                    "service_type": "http",
                },
            )
        raise HostedAIUnavailable(f"hosted·ai pod of subscription {subscription_id} exposes no {service!r} service")

    async def unsubscribe(self, subscription_id: int, pool_id: int, wait: bool = True) -> None:
        """Unsubscribe (asynchronous on hosted·ai) and, if `wait`, poll until the item is gone.

        Asking twice is safe (a second answers not-found, taken as done), so it retries like a read:
        on any 5xx or error in the body that is not an auth or not-found refusal."""
        try:
            await self.call(
                "POST",
                "/gpuaas/pool/unsubscribe",
                body={"subscription_id": subscription_id, "team_id": self.team_id, "pool_id": pool_id},
                idempotent=True,
            )
        except HostedAIRejected as exc:
            if exc.code != 404:
                raise
            return  # already gone (preempted, or a retried call that had worked)
        if not wait:
            return
        deadline = time.monotonic() + self.policy.unsubscribe_s
        while any(s.id == subscription_id for s in await self.subscriptions()):
            if time.monotonic() >= deadline:
                raise HostedAIUnavailable(
                    f"hosted·ai subscription {subscription_id} still listed {self.policy.unsubscribe_s:g}s after unsubscribe"
                )
            await asyncio.sleep(self.policy.poll_s)

    async def team_metrics(self, start_date: str, end_date: str, page: int = 1, per_page: int = 50) -> dict[str, Any]:
        return await self.call(
            "GET",
            f"/gpuaas/{self.team_id}/metrics",
            params={"start_date": start_date, "end_date": end_date, "page": page, "itemsPerPage": per_page},
        )


def _parse(response: httpx.Response, method: str, path: str, idempotent: bool = False) -> Any:
    """The body, or the error it stands for. Business errors come as 5xx or inside a 2xx; for an
    idempotent call, those that are not auth or not-found refusals are HostedAIUnavailable
    (retried)."""
    where = f"hosted·ai {method} {path}"
    status = response.status_code
    try:
        data = response.json() if response.content else None
    except ValueError:
        data = response.text
    business = isinstance(data, dict) and "message" in data and isinstance(data.get("code"), int)
    message = str(data.get("message")) if business else str(data)[:200]
    retry_after = _seconds(response.headers.get("Retry-After"))
    if status in (401, 403):
        raise HostedAIAuthError(
            f"{where}: HTTP {status}: the API key was refused (wrong, expired, revoked, "
            f"IP-blocked) or the team is not the key's"
        )
    if status == 429:
        raise HostedAIUnavailable(f"{where}: HTTP 429 rate limited", retry_after=retry_after)
    if status == 409:
        raise AlreadySubscribed(f"{where}: {message}", code=409)
    if status >= 500:
        if business and data["code"] not in (status, 0):
            if idempotent and not _refusal(data):
                raise HostedAIUnavailable(f"{where}: HTTP {status}: {message} (code {data['code']})", retry_after)
            raise _business(where, data)
        raise HostedAIUnavailable(f"{where}: HTTP {status}", retry_after=retry_after)
    if status >= 400:
        raise HostedAIRejected(f"{where}: HTTP {status}: {message}", code=status)
    if business and data["code"] >= 400:  # an error inside a 2xx body
        if idempotent and not _refusal(data):
            raise HostedAIUnavailable(f"{where}: error in a {status} body: {message} (code {data['code']})")
        raise _business(where, data)
    return data


def _refusal(data: dict) -> bool:
    """An auth or not-found refusal, which asking again cannot change."""
    code, message = int(data["code"]), str(data["message"])
    return code in (*AUTH_CODES, 404) or bool(AUTH_WORDS.search(message) or NOT_FOUND_WORDS.search(message))


def _business(where: str, data: dict) -> HostedAIError:
    code, message = int(data["code"]), str(data["message"])
    if code == INSUFFICIENT or "insufficient" in message.lower():
        return InsufficientResources(f"{where}: {message} (code {code})", code=code)
    if code == 409 or "already subscribed" in message.lower():
        return AlreadySubscribed(f"{where}: {message}", code=code)
    if code in AUTH_CODES or AUTH_WORDS.search(message):
        return HostedAIAuthError(
            f"{where}: {message} (code {code}): the API key was refused or the team is not the key's"
        )
    return HostedAIRejected(f"{where}: {message} (code {code})", code=code)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
