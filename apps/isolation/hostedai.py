"""B against A's work on hosted·ai: A's subscription and team through hosted·ai's API with B's own
key, A's pod at the URLs B's own suggests, A's allocation through the backend; and A's requests
pointed elsewhere by the service URL a panel answers (a loopback service such as the Prefect API,
a cloud metadata address). `work` sets up that work: the emulator on loopback, lent to A and B as
their Secret blocks (each tenant its own team and key), and one allocation each on its own team's
subscription."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import httpx

from apps.isolation.report import A, Attack, B, Report, Target, attempt
from connectors.hostedai import HostedAIClient
from connectors.hostedai_backend import HostedAIBackend
from connectors.hostedai_models import SubscriptionItem, parse_list
from connectors.ledger import new_allocation_id
from homeskillet.errors import (
    AllocationNotFound,
    HomeskilletError,
    HostedAIError,
    HostedAIRejected,
    InvalidRequest,
)
from homeskillet.schemas import Allocation, HostedAICredentials, ModelSpec
from homeskillet.settings import get_settings
from tasks import credentials


@dataclass
class Hosted:
    """A's and B's work on hosted·ai: one allocation each, on their own teams' subscriptions."""

    backend: HostedAIBackend
    pool: str  # the catalog pool
    model: ModelSpec
    allocations: dict[str, Allocation]
    credentials: dict[str, HostedAICredentials]
    subscriptions: dict[str, int]  # tenant → its subscription's id, as the backend made it
    said_to_b: list[str] = field(default_factory=list)  # every answer and error B got: no key may be in it

    def client(self, tenant: str, **update) -> HostedAIClient:
        return HostedAIClient(self.credentials[tenant].model_copy(update=update))

    def keys(self) -> list[str]:
        return [c.api_key.get_secret_value() for c in self.credentials.values()]


@contextlib.asynccontextmanager
async def work(report: Report, services, request_id: str, lend_emulator: bool, wanted: bool):
    """A's and B's allocations on hosted·ai; None when no group needs them, or when the tenants hold
    credentials that are not the emulator's to lend (then an n/a row says why)."""
    if not wanted:
        yield None
        return
    from apps.loadtest import start_emulator

    lent = None
    if lend_emulator:
        try:
            lent = await start_emulator("", [A, B])
        except InvalidRequest as exc:
            report.rows.append(Attack("reach A's work on hosted·ai", "hosted·ai emulator", "n/a", f"not tried: {exc}"))
            yield None
            return
    backend = services.backend("hostedai")
    pool = next(p for p in services.catalog.pools if p.backend == "hostedai")
    model = next(m for m in services.catalog.models if m.serving.kind == "llama_cpp")
    allocations: dict[str, Allocation] = {}
    try:
        for tenant in (A, B):
            allocations[tenant] = await backend.allocate(
                allocation_id=new_allocation_id(),
                tenant=tenant,
                request_id=request_id,
                pool=pool.id,
                model=model,
                wait_s=30,
            )
        made = backend.subscriptions()
        yield Hosted(
            backend,
            pool.id,
            model,
            allocations,
            {t: await credentials.hostedai_credentials(t) for t in (A, B)},
            {t: made[(t, pool.id)] for t in (A, B)},
        )
    finally:
        for tenant, allocation in allocations.items():
            with contextlib.suppress(AllocationNotFound):
                await backend.release(allocation.allocation_id, tenant)
        await backend.shutdown()
        if lent is not None:
            await lent.stop()


async def attacks(report: Report, target: Target) -> None:
    await service_url_attacks(report)  # a panel of its own: needs no lent Secret blocks
    hosted = target.hosted
    if hosted is None:
        return
    await _api_attacks(report, hosted)
    await _pod_attacks(report, hosted)
    await _backend_attacks(report, hosted)  # last: a release that works ends A's share


async def _backend_attacks(report: Report, hosted: Hosted) -> None:
    """B against A's hosted·ai allocation through the backend: list, verify, allocate in A's
    ledger pool, share A's subscription, release."""
    backend, mine = hosted.backend, hosted.allocations[A]
    theirs = hosted.allocations[B]
    report.check(
        "list A's hosted·ai allocations as B",
        "hostedai backend.held(tenant=B)",
        mine.allocation_id not in [a.allocation_id for a in await backend.held(B)],
        control=mine.allocation_id in [a.allocation_id for a in await backend.held(A)],
    )
    answer = await backend.verify(mine.model_copy(update={"tenant": B}))
    report.check(
        "verify A's hosted·ai allocation as B (and make A's share be forgotten)",
        "hostedai backend.verify(A's id, tenant B)",
        backend.subscriptions().get((A, hosted.pool)) == hosted.subscriptions[A],
        detail=f"answered from B's own share ({answer}); A's share kept",
    )
    refused, detail, got = await attempt(
        backend.allocate(
            allocation_id=new_allocation_id(),
            tenant=B,
            request_id="iso-attack",
            pool=mine.pool,
            model=hosted.model,
            wait_s=1,
        ),
        HomeskilletError,
    )
    if got is not None:
        await backend.release(got.allocation_id, B)
    hosted.said_to_b.append(detail)
    report.check(
        "allocate in A's hosted·ai share as B", f"hostedai backend.allocate(pool={mine.pool})", refused, detail=detail
    )
    a_team, b_team = hosted.client(A), hosted.client(B)
    pool_of = {s.id: s.pool_id for s in await a_team.subscriptions()}
    b_live = await b_team.find(pool_of.get(hosted.subscriptions[A], -1))
    report.check(
        "use A's hosted·ai subscription for B's fragments",
        "HostedAIBackend share per (tenant, pool), made with B's own key",
        hosted.subscriptions[B] != hosted.subscriptions[A]
        and b_live is not None
        and b_live.id == hosted.subscriptions[B]
        and theirs.endpoint != mine.endpoint,
        control=hosted.subscriptions[A] in pool_of,
        detail=f"A's subscription {hosted.subscriptions[A]}, B's {hosted.subscriptions[B]} (B's team)",
    )
    refused, detail, _ = await attempt(backend.release(mine.allocation_id, B), AllocationNotFound)
    hosted.said_to_b.append(detail)
    kept = mine.allocation_id in [a.allocation_id for a in await backend.held(A)]
    report.check(
        "release A's hosted·ai allocation id as B",
        "hostedai backend.release(A's id, B)",
        refused and kept and await a_team.exists(hosted.subscriptions[A]),
        detail=detail,
    )


async def _api_attacks(report: Report, hosted: Hosted) -> None:
    """B with its own key against A's subscription and team on hosted·ai's API."""
    a_team, b_team = hosted.client(A), hosted.client(B)
    sub = hosted.subscriptions[A]
    pool_id = next((s.pool_id for s in await a_team.subscriptions() if s.id == sub), -1)
    a_team_id = hosted.credentials[A].team_id
    listed = await b_team.subscriptions()
    hosted.said_to_b.append(repr(listed))
    report.check(
        "list A's hosted·ai subscriptions as B",
        "HostedAIClient.subscriptions (B's key; the API's list carries other teams' items)",
        all(s.team_id != a_team_id for s in listed),
        control=pool_id != -1,
    )
    attempts = (
        (
            "read A's pod connection info as B",
            "GET /gpuaas/connection-info (B's key, A's subscription)",
            lambda: b_team.inference_url(sub),
        ),
        (
            "retire A's subscription as B",
            "POST /gpuaas/pool/unsubscribe (B's key, A's subscription)",
            lambda: b_team.call(
                "POST",
                "/gpuaas/pool/unsubscribe",
                body={"subscription_id": sub, "team_id": b_team.team_id, "pool_id": pool_id},
            ),
        ),
        (
            "act as A's team with B's key",
            "GET /gpuaas/pool-subscription?team_id=A's team (B's key)",
            lambda: hosted.client(B, team_id=a_team_id).subscriptions(),
        ),
    )
    for attack, path, call in attempts:
        refused, detail, _ = await attempt(call(), HostedAIError)
        hosted.said_to_b.append(detail)
        report.check(attack, path, refused and await a_team.exists(sub), detail=detail)


async def _pod_attacks(report: Report, hosted: Hosted) -> None:
    """B learns the name of A's pod from the API's leaky list and calls it at the URLs its own
    pod's URL suggests."""
    b_team = hosted.client(B)
    data = await b_team.call("GET", "/gpuaas/pool-subscription", params={"team_id": b_team.team_id})
    listed = parse_list(SubscriptionItem, data, "GET /gpuaas/pool-subscription")  # every team's, as the API leaks them
    pods: dict[str, list[str]] = {}
    for item in listed:
        pods.setdefault(item.team_id, []).extend(p.pod_name for p in item.pods)
    theirs = hosted.allocations[B].endpoint
    base = hosted.credentials[B].url.rstrip("/")
    own = next((p for p in pods.get(hosted.credentials[B].team_id, []) if p in theirs), None)
    guesses = [
        url
        for pod in pods.get(hosted.credentials[A].team_id, [])
        for url in ({theirs.replace(own, pod)} if own else set()) | {f"{base}/pods/{pod}/v1"}
    ]
    headers = {"X-API-Key": hosted.credentials[B].api_key.get_secret_value()}
    async with httpx.AsyncClient(timeout=10) as http:
        control = (await http.get(f"{hosted.allocations[A].endpoint}/models")).status_code == 200
        answers = {url: (await http.get(f"{url}/models", headers=headers)).status_code for url in guesses}
    reached = [url for url, status in answers.items() if status == 200]
    report.check(
        "reach A's pod endpoint as B",
        "the pod's OpenAI-compatible URL, A's pod name from the list",
        not reached,
        control=control,
        detail=f"reached {reached}" if reached else f"tried {len(guesses)} URLs: HTTP {sorted(set(answers.values()))}",
    )


async def service_url_attacks(report: Report) -> None:
    """A panel (an emulator of its own on loopback, A its team) answers connection-info with a
    service URL of its choosing: the Prefect API's port on loopback, or the cloud metadata
    address. A's client must refuse the URL before anything is sent there; the control is the
    same client taking the pod's real service URL, which answers."""
    from connectors.processes import serve_in_thread
    from doubles.hostedai_emulator import Faults, create_app, default_config

    async def no_models(name: str) -> str:
        raise LookupError(f"model {name!r} is not served in this pod")

    config = default_config()
    app = create_app(config, model_endpoint=no_models)
    state = app.state.emulator
    team = next(t for t in config.teams if t.name == A)
    with contextlib.ExitStack() as serving:
        url = await asyncio.to_thread(serving.enter_context, serve_in_thread(app, "hostile hosted·ai panel"))
        client = HostedAIClient(HostedAICredentials(url=url, api_key=team.api_key, team_id=team.id))
        sub = await client.subscribe(config.pools[0].id, 1)
        try:
            await client.wait_ready(sub)
            state.set_faults(Faults())
            real = await client.inference_url(sub)
            async with httpx.AsyncClient(timeout=10) as http:
                control = (await http.get(f"{real}/models")).status_code == 200
            targets = (
                (f"http://127.0.0.1:{get_settings().prefect_port}/api", "the Prefect API on loopback"),
                ("http://169.254.169.254/latest/meta-data", "the cloud metadata address"),
            )
            for service_url, where in targets:
                state.set_faults(Faults(service_url=service_url))
                refused, detail, got = await attempt(client.inference_url(sub), HostedAIRejected)
                report.check(
                    "point A's requests at a loopback service through a hosted·ai service URL",
                    f"GET /gpuaas/connection-info answering {where} as the pod's service URL",
                    refused and got is None,
                    control=control,
                    detail=detail if refused else f"A's client would post to {got}",
                )
        finally:
            state.set_faults(Faults())
            with contextlib.suppress(HostedAIError):
                await client.unsubscribe(sub, config.pools[0].id, wait=False)
