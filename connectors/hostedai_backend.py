"""The hosted·ai GPU backend: logical leases carved out of per-tenant subscriptions.

Every fragment gets its own allocation (its own id, TFLOPS/VRAM slice and lease) in the shared
ledger, in a ledger pool that belongs to one tenant and one catalog pool (`<pool>/<tenant>`),
so no tenant can ever touch another's capacity. The physical capacity behind it is one
hosted·ai subscription per tenant and pool, made with that tenant's own team and key on first
use, shared by that tenant's fragments while warm, and unsubscribed when idle (and only when
the ledger shows no allocation of any process on it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from connectors.backend import lease
from connectors.hostedai import HostedAIClient, HostedPool, Policy, vgpus_for
from connectors.ledger import Ledger, open_ledger
from homeskillet.errors import (
    HostedAIError,
    HostedAIRejected,
    HostedAIUnavailable,
    InsufficientResources,
    NoRoute,
)
from homeskillet.schemas import Allocation, CardSpec, Catalog, HostedAICredentials, HostedAIMatch, ModelSpec, PoolSpec
from homeskillet.settings import Settings

log = logging.getLogger(__name__)
Credentials = Callable[[str], Awaitable[HostedAICredentials]]

# The words that mark a hosted·ai pool's tier in its name or label, when the catalog's
# `hostedai_match` does not say otherwise. A pool that neither marks counts as dedicated.
TIER_PATTERNS: dict[str, tuple[str, ...]] = {
    "preemptible": (r"spot", r"preempt", r"interrupt", r"low[-_ ]?prio", r"community", r"burst", r"evict"),
    "dedicated": (r"dedicated", r"reserved", r"on[-_ ]?demand", r"guaranteed", r"private", r"committed"),
}
_VENDOR_WORDS = {"nvidia", "amd", "tesla", "geforce", "gpu"}
RECHECK_S = 1.0  # a share that another process still uses is looked at again after this (at least)
RETIRE_TRIES = 5


@dataclass
class _Share:
    """One tenant's subscription behind one catalog pool."""

    client: HostedAIClient
    hosted_pool: HostedPool
    subscription_id: int
    endpoint: str
    users: set[str] = field(default_factory=set)
    idle_since: float = field(default_factory=time.monotonic)


def ledger_pool(pool_id: str, tenant: str) -> str:
    """The ledger pool of one tenant's share of a catalog pool."""
    return f"{pool_id}/{tenant}"


def catalog_pool_of(ledger_pool_id: str) -> str:
    """The catalog pool behind a ledger pool (itself for a local pool)."""
    return ledger_pool_id.split("/", 1)[0]


class HostedAIBackend:
    name = "hostedai"

    def __init__(self, settings: Settings, catalog: Catalog, credentials: Credentials, policy: Policy | None = None):
        self._settings = settings
        self._catalog = catalog
        self._credentials = credentials
        self._policy = policy or Policy()
        self._shares: dict[tuple[str, str], _Share] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._synced: set[str] = set()
        self._ledger: Ledger | None = None

    async def ledger(self) -> Ledger:
        if self._ledger is None:  # opened once: no thread hop per ledger call
            self._ledger = await asyncio.to_thread(open_ledger, self._settings.pgdata, self._settings.lease_s)
        return self._ledger

    def _pool(self, pool_id: str) -> PoolSpec:
        pool = next((p for p in self._catalog.pools if p.id == pool_id and p.backend == "hostedai"), None)
        if pool is None:
            raise NoRoute(f"{pool_id!r} is not a hosted·ai pool of the catalog")
        return pool

    async def allocate(
        self, *, allocation_id: str, tenant: str, request_id: str, pool: str, model: ModelSpec, wait_s: float
    ) -> Allocation:
        spec = self._pool(pool)
        ledger = await self.ledger()
        share_pool = ledger_pool(spec.id, tenant)
        if share_pool not in self._synced:
            await ledger.sync_pools([spec.model_copy(update={"id": share_pool})])
            self._synced.add(share_pool)

        async def endpoint() -> str:
            return (await self._share(tenant, spec, allocation_id)).endpoint

        return await lease(
            ledger,
            self,
            allocation_id=allocation_id,
            tenant=tenant,
            request_id=request_id,
            pool=share_pool,
            model=model,
            wait_s=wait_s,
            endpoint=endpoint,
        )

    async def _share(self, tenant: str, pool: PoolSpec, user: str) -> _Share:
        key = (tenant, pool.id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            share = self._shares.get(key)
            if share is None:
                share = await self._subscribe(tenant, pool)
                self._shares[key] = share
            share.users.add(user)
            return share

    async def _subscribe(self, tenant: str, pool: PoolSpec) -> _Share:
        """Subscribe the tenant's team to the cheapest matching hosted·ai pool with room; on
        "Insufficient resources" fail over to the next."""
        client = HostedAIClient(await self._credentials(tenant), self._policy)
        wanted = choose_pools(pool, await client.pools(), self._catalog.cards)
        tried = []
        for hosted in wanted:
            found = card_for(hosted.gpu_model_type, self._catalog.cards)
            if found is None:
                tried.append(f"{hosted.name} (unknown card {hosted.gpu_model_type})")
                continue
            card = found[1]
            vgpus = vgpus_for(pool.tflops, pool.vram_gb, card.tflops, card.vram_gb, hosted.sharing_ratio)
            if hosted.available_vgpus < vgpus:
                tried.append(f"{hosted.name} ({hosted.available_vgpus} of {vgpus} vGPUs free)")
                continue
            try:
                subscription_id = await client.subscribe(hosted.id, vgpus)
            except InsufficientResources:
                tried.append(f"{hosted.name} (insufficient resources)")
                continue
            try:
                await client.wait_ready(subscription_id)
                endpoint = await client.inference_url(subscription_id)
            except BaseException:
                try:
                    await self._unsubscribe(client, subscription_id, hosted.id)
                except HostedAIError:
                    pass  # logged there; the error that matters is the one below
                raise
            log.info("tenant %s subscribed to hosted·ai pool %s (%d vGPUs) for %s", tenant, hosted.name, vgpus, pool.id)
            return _Share(client, hosted, subscription_id, endpoint)
        raise InsufficientResources(f"no hosted·ai pool for {pool.id} has room: tried {', '.join(tried)}")

    async def release(self, allocation_id: str, tenant: str) -> datetime:
        ended = await (await self.ledger()).release(allocation_id, tenant)
        for (owner, pool_id), share in list(self._shares.items()):
            if owner == tenant and allocation_id in share.users:
                share.users.discard(allocation_id)
                share.idle_since = time.monotonic()
                if share.users:
                    continue
                idle_s = self._settings.hostedai_idle_s
                if idle_s == 0:
                    try:
                        await self._retire(tenant, pool_id)
                    except HostedAIError as exc:  # the fragment is done; the share is retried later
                        log.warning("hosted·ai share of %s in %s stays until the next retire: %s", tenant, pool_id, exc)
                        self._retire_soon(self._retry_s())
                else:  # look again once it has been idle long enough
                    self._retire_soon(idle_s)
        return ended

    async def verify(self, allocation: Allocation) -> bool:
        """Whether the allocation's subscription still exists; a vanished one is forgotten, so the
        next allocation subscribes anew."""
        pool_id = catalog_pool_of(allocation.pool)
        share = self._shares.get((allocation.tenant, pool_id))
        if share is None:
            return False
        try:
            alive = await share.client.exists(share.subscription_id)
        except HostedAIError:
            return True  # cannot tell: do not call it a preemption
        if not alive:
            log.warning(
                "hosted·ai subscription %s of tenant %s is gone (preempted)", share.subscription_id, allocation.tenant
            )
            self._shares.pop((allocation.tenant, pool_id), None)
        return alive

    async def retire_idle(self, idle_s: float | None = None) -> int:
        """Unsubscribe the shares idle longer than idle_s (default: the setting); how many went."""
        limit = self._settings.hostedai_idle_s if idle_s is None else idle_s
        now = time.monotonic()
        gone = 0
        for (tenant, pool_id), share in list(self._shares.items()):
            if not share.users and now - share.idle_since >= limit:
                gone += await self._retire(tenant, pool_id)
        return gone

    async def _retire(self, tenant: str, pool_id: str) -> int:
        key = (tenant, pool_id)
        async with self._locks.setdefault(key, asyncio.Lock()):
            share = self._shares.get(key)
            if share is None or share.users:
                return 0
            # another process of this tenant may be using the same team subscription: it stays,
            # and is looked at again later (that process may end without retiring it)
            if any(a.pool == ledger_pool(pool_id, tenant) for a in await (await self.ledger()).held(tenant)):
                self._retire_soon(max(self._settings.hostedai_idle_s, RECHECK_S))
                return 0
            self._shares.pop(key)
            try:
                await self._unsubscribe(share.client, share.subscription_id, share.hosted_pool.id)
            except BaseException:
                self._shares.setdefault(key, share)  # still ours: a later retire or shutdown tries again
                raise
            return 1

    def _retry_s(self) -> float:
        return max(self._policy.backoff_max_s, self._policy.poll_s)

    def _retire_soon(self, delay: float, tries: int = RETIRE_TRIES) -> None:
        """Look at the idle shares again in `delay` seconds. A retire that fails then is tried
        again, `tries` times in all, each wait twice the last; after that the share stays until
        the next release, retire or shutdown."""

        async def again() -> None:
            try:
                await self.retire_idle()
            except HostedAIError as exc:
                if tries > 1:
                    log.warning("hosted·ai retire of idle shares failed, trying again in %gs: %s", delay * 2, exc)
                    self._retire_soon(delay * 2, tries - 1)
                else:
                    log.error(
                        "hosted·ai retire of idle shares failed %d times; they stay until the next: %s",
                        RETIRE_TRIES,
                        exc,
                    )

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next release or shutdown retires
        loop.call_later(delay, lambda: asyncio.ensure_future(again()))

    async def _unsubscribe(self, client: HostedAIClient, subscription_id: int, hosted_pool_id: int) -> None:
        try:
            await client.unsubscribe(subscription_id, hosted_pool_id)
        except (HostedAIUnavailable, HostedAIRejected) as exc:
            log.error("hosted·ai unsubscribe of %s failed: %s", subscription_id, exc)
            raise

    async def held(self, tenant: str | None = None) -> list[Allocation]:
        return await (await self.ledger()).held(tenant, self.name)

    async def warm_up(self, model: ModelSpec) -> None:
        """Nothing ahead of time: a subscription is made for a tenant on its first allocation."""

    def subscriptions(self) -> dict[tuple[str, str], int]:
        """(tenant, pool) → subscription id, for what this process holds."""
        return {key: share.subscription_id for key, share in self._shares.items()}

    async def shutdown(self) -> None:
        """Unsubscribe every idle share (used when the process ends its work)."""
        await self.retire_idle(0)


# --- pool choice: which of the account's hosted·ai pools can serve a catalog pool --------------


def _gpu_tokens(name: str) -> list[str]:
    """'NVIDIA A100 80GB PCIe' → ['a100', '80gb', 'pcie']: lower case, split at anything not a
    letter or digit, vendor words dropped."""
    return [t for t in re.split(r"[^0-9a-z]+", name.lower()) if t and t not in _VENDOR_WORDS]


def _gpu_is(gpu_model_type: str, name: str) -> bool:
    """Whether a pool's GPU is the named one: the name's words begin the GPU's words, whole
    words only (A10 is not A100; A100 is A100 80GB PCIe)."""
    want, have = _gpu_tokens(name), _gpu_tokens(gpu_model_type)
    return bool(want) and have[: len(want)] == want


def card_for(gpu_model_type: str, cards: dict[str, CardSpec]) -> tuple[str, CardSpec] | None:
    """The catalog card a pool's `gpu_model_type` names: exactly, else the card whose name's words
    begin the GPU's (the longest such name); None when no card fits."""
    if gpu_model_type in cards:
        return gpu_model_type, cards[gpu_model_type]
    fitting = [name for name in cards if _gpu_is(gpu_model_type, name)]
    if not fitting:
        return None
    name = max(fitting, key=lambda n: len(_gpu_tokens(n)))
    return name, cards[name]


def match_rules(pool: PoolSpec) -> HostedAIMatch:
    """The pool's `hostedai_match` with its tier's defaults filled in."""
    rules = pool.hostedai_match
    other = "dedicated" if pool.tier == "preemptible" else "preemptible"
    return rules.model_copy(
        update={
            "patterns": list(TIER_PATTERNS[pool.tier]) if rules.patterns is None else rules.patterns,
            "exclude": list(TIER_PATTERNS[other]) if rules.exclude is None else rules.exclude,
            "unmarked": pool.tier == "dedicated" if rules.unmarked is None else rules.unmarked,
        }
    )


def _marked(hosted: HostedPool, patterns: list[str]) -> bool:
    text = f"{hosted.name}\n{hosted.label}"
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def mismatch(hosted: HostedPool, rules: HostedAIMatch, cards: dict[str, CardSpec]) -> str | None:
    """Why a hosted·ai pool does not fit the (filled-in) rules, or None when it does."""
    if _marked(hosted, rules.exclude or []):
        return "name or label excluded"
    if not rules.unmarked and not _marked(hosted, rules.patterns or []):
        return "name or label matches no pattern"
    if rules.gpu_types and not any(_gpu_is(hosted.gpu_model_type, g) for g in rules.gpu_types):
        return f"GPU {hosted.gpu_model_type} not in {rules.gpu_types}"
    if card_for(hosted.gpu_model_type, cards) is None:
        return f"GPU {hosted.gpu_model_type} not in the catalog's cards"
    if rules.max_price_per_vgpu_hour is not None and hosted.price_per_vgpu_hour > rules.max_price_per_vgpu_hour + 1e-12:
        return f"US${hosted.price_per_vgpu_hour:g}/vGPU-hour over {rules.max_price_per_vgpu_hour:g}"
    return None


def choose_pools(pool: PoolSpec, offered: list[HostedPool], cards: dict[str, CardSpec]) -> list[HostedPool]:
    """The account's hosted·ai pools that may serve a catalog pool, cheapest first (then the most
    free vGPUs): those `hostedai_pools` names (or ids), else those `hostedai_match` finds. When
    none fits, NoRoute lists what the account offers and why each does not fit."""
    named = [p for p in offered if p.name in pool.hostedai_pools or str(p.id) in pool.hostedai_pools]
    if named:
        chosen = named
    else:
        rules = match_rules(pool)
        chosen = [p for p in offered if mismatch(p, rules, cards) is None]
        if not chosen:
            raise NoRoute(_no_match(pool, rules, offered, cards))
        if pool.hostedai_pools:
            log.warning(
                "hosted·ai offers none of the pools %s for %s; matched by rules: %s",
                pool.hostedai_pools,
                pool.id,
                ", ".join(p.name for p in chosen),
            )
    return sorted(chosen, key=lambda p: (p.price_per_vgpu_hour, -p.available_vgpus, p.id))


def _no_match(pool: PoolSpec, rules: HostedAIMatch, offered: list[HostedPool], cards: dict[str, CardSpec]) -> str:
    named = f"none of the pools {pool.hostedai_pools} and " if pool.hostedai_pools else ""
    wanted = [f"name or label matching {rules.patterns}"]
    if rules.unmarked:
        wanted[0] = f"any name or label not matching {rules.exclude}"
    if rules.gpu_types:
        wanted.append(f"GPU in {rules.gpu_types}")
    if rules.max_price_per_vgpu_hour is not None:
        wanted.append(f"at most US${rules.max_price_per_vgpu_hour:g}/vGPU-hour")
    offers = "; ".join(
        f"{p.name} (id {p.id}, label {p.label!r}, {p.gpu_model_type}, US${p.price_per_vgpu_hour:g}/vGPU-hour, "
        f"{p.available_vgpus} vGPUs free: {mismatch(p, rules, cards)})"
        for p in offered
    )
    return (
        f"hosted·ai offers {named}no pool for {pool.id} ({pool.tier}) with {', '.join(wanted)}; "
        f"the account offers: {offers or 'no pools at all'}. Name its pools in the catalog's hostedai_pools "
        f"or widen the pool's hostedai_match"
    )
