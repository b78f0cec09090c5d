"""The local GPU backend (the embedded default): pools of this machine, a shared ledger, and
llama.cpp model servers on loopback as the endpoints that allocations hand out."""

from __future__ import annotations

import asyncio
from datetime import datetime

from connectors.backend import lease
from connectors.ledger import Ledger, open_ledger
from connectors.model_server import ModelServers, slots_for, threads_for
from homeskillet.schemas import Allocation, Catalog, LlamaCppServing, ModelSpec
from homeskillet.settings import Settings


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings, catalog: Catalog):
        self._settings = settings
        self._catalog = catalog
        self._ledger: Ledger | None = None
        self.servers = ModelServers(
            settings.home,
            idle_s=settings.model_idle_s,
            threads=settings.model_threads or threads_for(catalog.models),
            binary=settings.llama_server,
        )
        self._local_pools = [p for p in catalog.pools if p.backend == "local"]

    async def ledger(self) -> Ledger:
        """The shared ledger, with the catalog's local pools in it (synced once)."""
        if self._ledger is None:  # opened and synced once: no thread hop per ledger call
            ledger = await asyncio.to_thread(open_ledger, self._settings.pgdata, self._settings.lease_s)
            await ledger.sync_pools(self._local_pools)
            self._ledger = ledger
        return self._ledger

    async def allocate(
        self, *, allocation_id: str, tenant: str, request_id: str, pool: str, model: ModelSpec, wait_s: float
    ) -> Allocation:
        """The model's slice of a local pool, and the endpoint of the model's server on loopback."""

        async def endpoint() -> str:
            if isinstance(model.serving, LlamaCppServing):
                return await asyncio.to_thread(self.model_endpoint, model)
            return model.serving.base_url

        return await lease(
            await self.ledger(),
            self,
            allocation_id=allocation_id,
            tenant=tenant,
            request_id=request_id,
            pool=pool,
            model=model,
            wait_s=wait_s,
            endpoint=endpoint,
        )

    async def release(self, allocation_id: str, tenant: str) -> datetime:
        """End the tenant's allocation (idempotent for its owner); return when it ended."""
        return await (await self.ledger()).release(allocation_id, tenant)

    def model_endpoint(self, model: ModelSpec) -> str:
        """The machine-wide llama.cpp server of a local model, with a slot for every allocation of
        it that the local pools can hold at once; started if none runs. Blocking."""
        return self.servers.endpoint(model, slots_for(model, self._local_pools))

    async def held(self, tenant: str | None = None) -> list[Allocation]:
        return await (await self.ledger()).held(tenant, self.name)

    async def warm_up(self, model: ModelSpec) -> None:
        """Start the model's server if none runs (it stays up while used, machine-wide)."""
        if isinstance(model.serving, LlamaCppServing):
            await asyncio.to_thread(self.model_endpoint, model)

    async def verify(self, allocation: Allocation) -> bool:
        """Whether the allocation's capacity still exists: local pools are never reclaimed."""
        return True

    async def shutdown(self) -> None:
        """Nothing to give back: model servers are machine-wide and stop when idle."""
