"""The local GPU backend (the embedded default): pools of this machine, a shared ledger, and
llama.cpp model servers on loopback as the endpoints that allocations hand out."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime

from connectors import postgres
from connectors.ledger import Ledger, new_allocation_id
from connectors.model_server import ModelServers
from homeskillet.schemas import Allocation, Catalog, LlamaCppServing, ModelSpec
from homeskillet.settings import Settings


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings, catalog: Catalog):
        self._settings = settings
        self._catalog = catalog
        self._ledger: Ledger | None = None
        self._setup_lock = threading.Lock()
        self.servers = ModelServers(
            cache_dir=settings.home / "models",
            log_dir=settings.home / "logs",
            idle_s=settings.model_idle_s,
            threads=settings.model_threads,
        )

    async def ledger(self) -> Ledger:
        """The ledger, after making sure PostgreSQL runs and the pools match the catalog (once)."""
        if self._ledger is None:
            await asyncio.to_thread(self._setup)
        assert self._ledger is not None
        return self._ledger

    def _setup(self) -> None:
        with self._setup_lock:  # once per process, whichever coroutine or thread comes first
            if self._ledger is None:
                postgres.ensure_postgres(self._settings.pgdata)
                ledger = Ledger(postgres.dsn(self._settings.pgdata, "homeskillet"), lease_s=self._settings.lease_s)
                asyncio.run(ledger.sync_pools(self._catalog.pools))
                self._ledger = ledger

    @staticmethod
    def new_allocation_id() -> str:
        return new_allocation_id()

    async def allocate(
        self, *, allocation_id: str, tenant: str, request_id: str, pool: str, model: ModelSpec, wait_s: float
    ) -> Allocation:
        """Reserve the model's slice of the pool under allocation_id (from new_allocation_id, so
        that a caller interrupted at any point can still release it) and hand back an
        OpenAI-compatible endpoint for it."""
        ledger = await self.ledger()
        allocation = await ledger.reserve(
            allocation_id=allocation_id,
            tenant=tenant,
            request_id=request_id,
            pool=pool,
            model=model.name,
            tflops=model.tflops,
            vram_gb=model.vram_gb,
            wait_s=wait_s,
        )
        try:
            if isinstance(model.serving, LlamaCppServing):
                endpoint = await asyncio.to_thread(self.servers.acquire, model, allocation.allocation_id)
            else:
                endpoint = model.serving.base_url
            return await ledger.set_endpoint(allocation.allocation_id, endpoint)
        except BaseException:
            await self.release(allocation_id, tenant)
            raise

    async def release(self, allocation_id: str, tenant: str) -> datetime:
        """End the tenant's allocation (idempotent for its owner); return when it ended."""
        ended = await (await self.ledger()).release(allocation_id, tenant)
        self.servers.done(allocation_id)
        return ended

    async def held(self, tenant: str | None = None) -> list[Allocation]:
        return await (await self.ledger()).held(tenant)
