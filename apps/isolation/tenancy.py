"""B against A's work through the backend and the result store: list, release, tell A's ids from
unknown ones by the error, read A's result."""

from __future__ import annotations

from apps.isolation.report import A, B, Report, Target
from homeskillet.errors import AllocationNotFound


async def backend_attacks(report: Report, target: Target) -> None:
    services, allocation = target.services, target.allocation
    local = services.local
    held_by_b = [a.allocation_id for a in await local.held(B)]
    report.check(
        "list A's allocations as B",
        "backend.held(tenant=B)",
        allocation.allocation_id not in held_by_b,
        control=allocation.allocation_id in [a.allocation_id for a in await local.held(A)],
    )
    everything_b = [a.allocation_id for a in await services.held(B)]
    report.check(
        "list A's allocations as B",
        "homeskillet allocations --tenant B (Services.held)",
        allocation.allocation_id not in everything_b,
    )
    try:
        await local.release(allocation.allocation_id, B)
        refused, detail = False, "released"
    except AllocationNotFound as exc:
        refused, detail = True, str(exc)
    still = allocation.allocation_id in [a.allocation_id for a in await local.held(A)]
    report.check("release A's allocation id as B", "backend.release(A's id, B)", refused and still, detail=detail)
    try:
        await local.release("alloc-" + "x" * 22, B)
        unknown = ""
    except AllocationNotFound as exc:
        unknown = str(exc)
    report.check(
        "tell A's id from an unknown one by B's error",
        "backend.release",
        detail.replace(allocation.allocation_id, "ID") == unknown.replace("alloc-" + "x" * 22, "ID"),
        detail="the same message for both",
    )


async def result_attacks(report: Report, target: Target) -> None:
    store, request_id = target.store, target.request_id
    report.check(
        "read A's request result as B",
        "TokenStore.result(B, A's request id)",
        await store.result(B, request_id) is None,
        control=(await store.result(A, request_id) or {}).get("answer") == "A's answer",
    )
