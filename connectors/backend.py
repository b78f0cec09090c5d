"""The one interface every GPU backend implements, and the ledger steps they share.

A backend hands out allocations: a tenant's slice (TFLOPS + VRAM) of one of its pools, held in
the shared ledger under its own id, with an OpenAI-compatible endpoint to run the model on.
`LocalBackend` serves this machine's pools, `HostedAIBackend` carves slices out of per-tenant
hosted·ai subscriptions. An `Allocation` names its backend, so whoever holds one can release or
verify it without knowing anything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from connectors.ledger import Ledger
from homeskillet.schemas import Allocation, ModelSpec


@runtime_checkable
class Backend(Protocol):
    name: str

    async def allocate(
        self, *, allocation_id: str, tenant: str, request_id: str, pool: str, model: ModelSpec, wait_s: float
    ) -> Allocation:
        """Reserve the model's slice of the pool under allocation_id (from
        `connectors.ledger.new_allocation_id`, made by the caller first so that a caller
        interrupted at any point can still release it), waiting up to wait_s for room, and hand
        back an endpoint for it."""
        ...

    async def release(self, allocation_id: str, tenant: str) -> datetime:
        """End the tenant's allocation (idempotent for its owner); return when it ended.
        Another tenant's id, or an unknown one, raises AllocationNotFound."""
        ...

    async def verify(self, allocation: Allocation) -> bool:
        """Whether the allocation's capacity still exists (False: it was preempted)."""
        ...

    async def held(self, tenant: str | None = None) -> list[Allocation]:
        """This backend's active allocations, of all tenants or one."""
        ...

    async def warm_up(self, model: ModelSpec) -> None:
        """Make the model ready to answer, so that the first request does not pay for it."""
        ...

    async def shutdown(self) -> None:
        """Give back what this process holds for the backend (idle subscriptions)."""
        ...


async def lease(
    ledger: Ledger,
    backend: Backend,
    *,
    allocation_id: str,
    tenant: str,
    request_id: str,
    pool: str,
    model: ModelSpec,
    wait_s: float,
    endpoint: Callable[[], Awaitable[str]],
) -> Allocation:
    """The steps every backend's `allocate` shares: reserve the slice in the ledger, then find the
    endpoint and record it; anything failing after the reservation releases it."""
    await ledger.reserve(
        allocation_id=allocation_id,
        tenant=tenant,
        request_id=request_id,
        pool=pool,
        model=model.name,
        tflops=model.tflops,
        vram_gb=model.vram_gb,
        wait_s=wait_s,
        backend=backend.name,
    )
    try:
        return await ledger.set_endpoint(allocation_id, await endpoint())
    except BaseException:
        await backend.release(allocation_id, tenant)
        raise
