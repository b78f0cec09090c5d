"""The hosted·ai GPUaaS API client (async httpx), as far as the API is known
(docs/hostedai-integration.md).

- Every answer is parsed into a typed model (`connectors.hostedai_models`), never indexed: an
  answer in a shape nobody expected is a HostedAIError that names the endpoint and the shape.
- Retries (tenacity): exponential backoff with jitter, bounded, only for failures worth retrying
  (timeouts, connection errors, 5xx without a business code, 429 honouring Retry-After).
  Reads (GET, and the price estimate) are also retried on any 5xx and on any error object in the
  body (of a 2xx or a 4xx other than 401/403/409/429): a read that failed changed nothing, so
  asking again is safe, and the words of one error are no proof that asking again cannot help.
  Only once the attempts are spent is the error classified, by its code (401/403 the key, 404
  not found, …) and never by its words, and the message says what hosted·ai said. Unsubscribe
  (a write that is safe to repeat) is retried on such errors unless they read as a refusal.
- Error messages quote hosted·ai's own message only in short (one line, truncated, the key and
  anything that looks like a token taken out), and describe any other body by its shape.
- The pod's inference service is found by the configured service name, else as the first
  discovered service that answers `GET …/v1/models`; it is exposed only when none is found.
  Every service URL is checked (`homeskillet.urls.check_url`) before anything is sent to it.
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
from urllib.parse import urlsplit

import httpx
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from pydantic_settings import BaseSettings, SettingsConfigDict
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from connectors import http_client
from connectors.hostedai_models import (
    Estimate,
    ExposeAnswer,
    Page,
    Pod,
    Pool,
    Region,
    SubscribeAnswer,
    SubscriptionItem,
    TeamMetrics,
    listed,
    parse,
    parse_list,
    pods_of,
    shape,
)
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
from homeskillet.urls import check_url, is_private_host

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
# a token-like run (a key, a URL's secret part) in a message hosted·ai sends back
TOKENISH = re.compile(r"(?=[A-Za-z_\-]*[0-9])(?=[0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{20,}")
SAID_CHARS = 120  # the most of hosted·ai's own message an error quotes
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
    service_name: str = "inference"  # the pod's OpenAI-compatible service, as exposed
    service_port: int = 8000
    probe_timeout_s: float = 3.0  # GET …/v1/models on a discovered service of another name


@dataclass(frozen=True)
class HostedPool:
    id: int
    name: str
    label: str
    gpu_model_type: str
    available_vgpus: int
    sharing_ratio: int
    price_per_vgpu_hour: float


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
        self,
        method: str,
        path: str,
        params: dict | None,
        body: dict | None,
        timeout: float,
        idempotent: bool,
        read: bool,
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
        secret = self.credentials.api_key.get_secret_value()
        return _parse(response, method, path, idempotent=idempotent, read=read, secret=secret)

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
        read: bool | None = None,
    ) -> Any:
        """One API call through the breaker, retried only when `retry` and only when worth it.

        `read` (default: GET and HEAD) and `idempotent` (default: `read`) widen what is worth it:
        a read is retried on any 5xx and on any error object in its body, then classified by the
        error's code; an idempotent write on a 5xx and on an error in a 2xx body that does not
        read as an auth or not-found refusal."""
        policy = self.policy
        read = method.upper() in IDEMPOTENT if read is None else read
        idempotent = read if idempotent is None else idempotent
        attempts = policy.attempts if retry else 1

        def worth_retrying(exc: BaseException) -> bool:
            return isinstance(exc, HostedAIUnavailable) or (read and getattr(exc, "in_body", False))

        try:
            breaker = await BREAKERS.get_breaker(
                self._base, threshold=policy.breaker_threshold, ttl=policy.breaker_ttl_s
            )
            async with breaker:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(attempts),
                    wait=self._wait,
                    retry=retry_if_exception(worth_retrying),
                    reraise=True,
                ):
                    with attempt:
                        data = await self._once(
                            method, path, params, body, timeout or policy.timeout_s, idempotent, read
                        )
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

    async def regions(self) -> list[Region]:
        where = "GET /gpuaas/available-regions"
        return parse_list(
            Region, await self.call("GET", "/gpuaas/available-regions", params={"team_id": self.team_id}), where
        )

    async def pools(self) -> list[HostedPool]:
        found = []
        for region in await self.regions():
            data = await self.call(
                "GET", "/gpuaas/available-pools", params={"team_id": self.team_id, "gpuaas_id": region.gpuaas_id}
            )
            for p in parse_list(Pool, data, "GET /gpuaas/available-pools"):
                found.append(
                    HostedPool(
                        id=p.id,
                        name=p.pool_name,
                        label=p.pool_label or "",
                        gpu_model_type=p.gpu_model_type,
                        available_vgpus=p.available_vgpus,
                        sharing_ratio=p.sharing_ratio or 1,
                        price_per_vgpu_hour=p.pricing_hourly,
                    )
                )
        return found

    async def estimate(self, pool_id: int, vgpus: int, hours: float) -> Estimate:
        data = await self.call(
            "POST",
            "/gpuaas/calculate-pool-subscription",
            body={"pool_id": pool_id, "vgpus": vgpus, "duration_hours": hours, "team_id": self.team_id},
            read=True,  # a price quote changes nothing
        )
        return parse(Estimate, data, "POST /gpuaas/calculate-pool-subscription")

    # --- subscriptions ---------------------------------------------------------------------

    async def subscriptions(self) -> list[SubscriptionItem]:
        """This team's subscriptions; the API's list carries other teams' items too, so filter
        here (before parsing: another team's item in an odd shape is not this team's problem)."""
        where = "GET /gpuaas/pool-subscription"
        found, page = [], 0
        while True:
            data = await self.call(
                "GET",
                "/gpuaas/pool-subscription",
                params={"team_id": self.team_id, "page": page, "per_page": 100, "metric_window": "last_5m"},
            )
            rows = listed(data, where)
            mine = [i for i in rows if not isinstance(i, dict) or str(i.get("team_id")) == self.team_id]
            found += parse_list(SubscriptionItem, mine, where)
            page += 1
            pages = parse(Page, data, where).total_pages if isinstance(data, dict) else None
            if page >= (pages or 1):
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
                answer = parse(SubscribeAnswer, data, "POST /gpuaas/pool/subscribe") if isinstance(data, dict) else None
                if answer is not None and answer.subscription_id is not None:
                    return answer.subscription_id
                log.warning("hosted·ai subscribe to pool %s answered %s; reconciling", pool_id, shape(data))
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
            except HostedAIError as exc:  # an answer in no known shape: the list decides
                if isinstance(exc, HostedAIAuthError):
                    raise
                log.warning("hosted·ai subscribe to pool %s: %s; reconciling", pool_id, exc)
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

    # --- the pod's inference service -------------------------------------------------------

    async def inference_url(self, subscription_id: int, service: str | None = None, port: int | None = None) -> str:
        """The base URL (ending in /v1) of the OpenAI-compatible server on the subscription's pod:
        the service of the configured name, else the first discovered service that answers
        `GET …/v1/models`; exposed (`/pods/expose-service`) only when none is found. Every URL
        is checked before anything is sent to it (`service_url`)."""
        service = service or self.policy.service_name
        port = port or self.policy.service_port
        exposed = False
        while True:
            info = await self.call(
                "GET", "/gpuaas/connection-info", params={"team_id": self.team_id, "subscription_id": subscription_id}
            )
            pods = pods_of(info, subscription_id, "GET /gpuaas/connection-info")
            if not pods:
                raise HostedAIUnavailable(f"hosted·ai subscription {subscription_id} has no pod yet")
            refused: list[HostedAIRejected] = []
            found = await self._discovered(subscription_id, pods[0], service, refused)
            if found is not None:
                return found
            if exposed:
                if refused:  # what was there was refused: say why, not that nothing was there
                    raise refused[0]
                raise HostedAIUnavailable(
                    f"hosted·ai pod of subscription {subscription_id} exposes no {service!r} service"
                )
            try:
                data = await self.call(
                    "POST",
                    "/pods/expose-service",
                    body={
                        "pod_name": pods[0].pod_name,
                        "pool_subscription_id": subscription_id,
                        "port": port,
                        "service_name": service,
                        "protocol": "TCP",
                        "service_type": "http",
                    },
                )
            except HostedAIRejected as exc:
                if refused:
                    raise HostedAIRejected(f"{refused[0]} (and exposing {service!r} was refused: {exc})") from None
                raise
            exposed = True
            answer = parse(ExposeAnswer, data, "POST /pods/expose-service") if isinstance(data, dict) else None
            if answer is not None and answer.url:
                return v1(self.service_url(subscription_id, answer.url))

    async def _discovered(
        self, subscription_id: int, pod: Pod, service: str, refused: list[HostedAIRejected]
    ) -> str | None:
        """The inference server among the pod's discovered services, or None: by name (a refused
        URL is an error), else the first of the others whose URL passes and that answers (the
        others' refused URLs are added to `refused`, never probed)."""
        services = [s for s in pod.discovered_services if s.url]
        named = next((s for s in services if s.name == service), None)
        if named is not None:
            return v1(self.service_url(subscription_id, named.url or ""))
        for other in services:
            try:
                base = v1(self.service_url(subscription_id, other.url or ""))
            except HostedAIRejected as exc:
                log.warning("hosted·ai pod %s: service %r skipped: %s", pod.pod_name, other.name, exc)
                refused.append(exc)
                continue
            if await self._answers_models(base):
                log.info("hosted·ai pod %s: inference found as service %r", pod.pod_name, other.name)
                return base
        return None

    async def _answers_models(self, base: str) -> bool:
        """Whether an OpenAI-compatible server answers `GET {base}/models` (no panel key sent:
        the key is the panel's, not the pod's; no redirect followed)."""
        try:
            response = await http_client.client().get(
                f"{base}/models", timeout=self.policy.probe_timeout_s, follow_redirects=False
            )
            return response.status_code == 200 and isinstance(response.json(), dict)
        except (httpx.HTTPError, ValueError):
            return False

    def service_url(self, subscription_id: int, url: str) -> str:
        """A service URL hosted·ai gave, checked before anything is sent to it (`check_url`):
        http(s), no credentials, query or fragment, never link-local; a loopback or private host
        only when the panel itself is on one (a local panel, the emulator), and then only the
        panel's own host and port. HostedAIRejected naming the subscription and the problem."""
        what = f"hosted·ai service URL of subscription {subscription_id}"
        panel = urlsplit(self._base)
        local_panel = is_private_host(panel.hostname or "")
        try:
            checked = check_url(url, what=what, allow_private=local_panel)
        except ValueError as exc:
            raise HostedAIRejected(str(exc)) from None
        parts = urlsplit(checked)
        host = parts.hostname or ""
        if local_panel and is_private_host(host) and _origin(parts) != _origin(panel):
            shown = f"{host}:{_origin(parts)[2]}"
            raise HostedAIRejected(
                f"{what}: host {shown}: a loopback or private host that is not the panel's own "
                f"({panel.hostname}:{_origin(panel)[2]}) is refused"
            )
        return checked

    async def unsubscribe(self, subscription_id: int, pool_id: int, wait: bool = True) -> None:
        """Unsubscribe (asynchronous on hosted·ai) and, if `wait`, poll until the item is gone.

        Asking twice is safe (a second answers not-found, taken as done), so it retries on any
        5xx or error in the body that is not an auth or not-found refusal."""
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

    async def team_metrics(self, start_date: str, end_date: str, page: int = 1, per_page: int = 50) -> TeamMetrics:
        path = f"/gpuaas/{self.team_id}/metrics"
        data = await self.call(
            "GET", path, params={"start_date": start_date, "end_date": end_date, "page": page, "itemsPerPage": per_page}
        )
        return parse(TeamMetrics, data, "GET /gpuaas/{team_id}/metrics")


def v1(base: str) -> str:
    """An OpenAI-compatible base URL: the service's URL, with /v1 added unless it ends so."""
    return base if base.endswith("/v1") else f"{base}/v1"


def _origin(parts) -> tuple[str, str, int]:
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


# --- answers: the body, or the error it stands for -----------------------------------------------


def _parse(
    response: httpx.Response,
    method: str,
    path: str,
    idempotent: bool = False,
    read: bool | None = None,
    secret: str | None = None,
) -> Any:
    """The body, or the error it stands for. Business errors come as 5xx, 4xx or inside a 2xx.

    On a read (`read`, default `idempotent`) an error object in the body, of a 2xx, a 4xx (not
    401/403/409/429) or a 5xx, is classified by its code alone and marked `in_body`, which
    `call` retries; on an idempotent write, those that do not read as an auth or not-found refusal
    are HostedAIUnavailable (retried). Messages quote hosted·ai's own words in short (`said`)."""
    where = f"hosted·ai {method} {path}"
    read = idempotent if read is None else read
    status = response.status_code
    try:
        data = response.json() if response.content else None
    except ValueError:
        data = response.text
    business = isinstance(data, dict) and "message" in data and isinstance(data.get("code"), int)
    message = said(data.get("message"), secret) if business else shape(data)
    retry_after = _seconds(response.headers.get("Retry-After"))
    if status in (401, 403):
        told = f" (hosted·ai said {message!r})" if business else ""
        raise HostedAIAuthError(
            f"{where}: HTTP {status}: the API key was refused (wrong, expired, revoked, "
            f"IP-blocked) or the team is not the key's{told}"
        )
    if status == 429:
        raise HostedAIUnavailable(f"{where}: HTTP 429 rate limited", retry_after=retry_after)
    if status == 409:
        raise AlreadySubscribed(f"{where}: {message if business else 'HTTP 409'}", code=409)
    if business and read and (status >= 400 or data["code"] >= 400):
        raise _read_error(where, status, data["code"], message, retry_after)
    if status >= 500:
        if business and data["code"] not in (status, 0):
            if idempotent and not _refusal(data):
                raise HostedAIUnavailable(f"{where}: HTTP {status}: {message} (code {data['code']})", retry_after)
            raise _business(where, data, message)
        raise HostedAIUnavailable(f"{where}: HTTP {status}", retry_after=retry_after)
    if status >= 400:
        raise HostedAIRejected(f"{where}: HTTP {status}: {message}", code=status)
    if business and data["code"] >= 400:  # an error inside a 2xx body
        if idempotent and not _refusal(data):
            raise HostedAIUnavailable(f"{where}: error in a {status} body: {message} (code {data['code']})")
        raise _business(where, data, message)
    return data


def _read_error(where: str, status: int, code: int, message: str, retry_after: float | None) -> HostedAIError:
    """A read's error object, classified by its code (never by its words) and marked `in_body`:
    `call` asks again, and raises this once the attempts are spent."""
    answered = f"HTTP {status}" if status >= 400 else f"error in a {status} body"
    text = f"{where}: {answered}: hosted·ai said {message!r} (code {code})"
    exc: HostedAIError
    if code in AUTH_CODES:
        exc = HostedAIAuthError(f"{text}: the API key was refused or the team is not the key's")
    elif code == INSUFFICIENT:
        exc = InsufficientResources(text, code=code)
    elif code == 409:
        exc = AlreadySubscribed(text, code=code)
    elif code == 404 or status == 404:
        exc = HostedAIRejected(text, code=404)
    elif 400 <= status < 500:
        exc = HostedAIRejected(text, code=status)
    else:
        exc = HostedAIUnavailable(text, retry_after=retry_after)
    exc.in_body = True  # type: ignore[attr-defined]
    return exc


def said(message: Any, secret: str | None = None) -> str:
    """hosted·ai's own message, safe to show: one line of printable characters, the API key and
    anything token-like (letters and digits, 20 or more) taken out, at most SAID_CHARS."""
    text = str(message)
    if secret:
        text = text.replace(secret, "…")
    text = TOKENISH.sub("…", "".join(ch if ch.isprintable() else " " for ch in text))
    text = " ".join(text.split())
    if len(text) > SAID_CHARS:
        text = text[: SAID_CHARS - 1] + "…"
    return text


def _refusal(data: dict) -> bool:
    """An auth or not-found refusal, which asking again cannot change (for idempotent writes)."""
    code, message = int(data["code"]), str(data["message"])
    return code in (*AUTH_CODES, 404) or bool(AUTH_WORDS.search(message) or NOT_FOUND_WORDS.search(message))


def _business(where: str, data: dict, message: str | None = None) -> HostedAIError:
    """A write's business error, by its code or, failing that, its words."""
    code, words = int(data["code"]), str(data["message"])
    message = message if message is not None else said(words)
    lowered = words.lower()
    if code == INSUFFICIENT or "insufficient" in lowered:
        return InsufficientResources(f"{where}: {message} (code {code})", code=code)
    if code == 409 or "already subscribed" in lowered:
        return AlreadySubscribed(f"{where}: {message}", code=code)
    if code in AUTH_CODES or AUTH_WORDS.search(words):
        return HostedAIAuthError(
            f"{where}: {message} (code {code}): the API key was refused or the team is not the key's"
        )
    return HostedAIRejected(f"{where}: {message} (code {code})", code=code)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
