"""Covenants: each tenant's contract, as catalog data, enforced by routing, the ledger and the flow."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from connectors.ledger import Ledger, new_allocation_id, open_ledger
from flows.fusion import fuse_request
from homeskillet.catalog import load_catalog
from homeskillet.errors import CovenantViolation, InvalidRequest
from homeskillet.schemas import Covenant, PoolSpec
from homeskillet.settings import get_settings
from tasks import runtime
from tasks.routing import estimate_cost

HOMESKILLET = str(Path(sys.executable).with_name("homeskillet"))


def write_catalog(path: Path, base: str, covenants: dict[str, dict]) -> str:
    """The test catalog with these tenants and covenants; a rewrite gets a later mtime."""
    raw = yaml.safe_load(Path(base).read_text())
    raw["tenants"] = [{"id": t, "covenant": c} for t, c in covenants.items()]
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(yaml.safe_dump(raw))
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a changed file, whatever the clock's resolution
    return str(path)


# --- the covenant as data -----------------------------------------------------------------


def test_the_version_changes_with_any_term():
    assert Covenant().version == Covenant().version
    assert Covenant(max_tflops=2).version != Covenant(max_tflops=3).version != Covenant().version


@pytest.mark.parametrize(
    ("covenant", "message"),
    [
        ({"allowed_models": ["echo", "gpt-9"]}, "tenant 'acme' covenant.allowed_models: unknown model 'gpt-9'"),
        ({"allowed_pools": ["nowhere"]}, "tenant 'acme' covenant.allowed_pools: unknown pool 'nowhere'"),
        ({"max_tflops": -1}, "tenant 'acme' covenant.max_tflops: Input should be greater than or equal to 0"),
        ({"budget_usd_per_dai": 1}, "tenant 'acme' covenant.budget_usd_per_dai: Extra inputs are not permitted"),
    ],
)
def test_a_bad_covenant_fails_on_load_naming_the_tenant_and_the_field(tmp_path, test_catalog, covenant, message):
    path = write_catalog(tmp_path / "c.yaml", test_catalog, {"globex": {}, "acme": covenant})
    with pytest.raises(InvalidRequest) as failure:
        load_catalog(Path(path))
    assert message in str(failure.value)


# --- the ledger: quota and concurrency across processes -------------------------------------


@pytest.fixture
async def ledger(request):
    """A ledger with two roomy pools of its own."""
    led = Ledger((await asyncio.to_thread(open_ledger, get_settings().pgdata, 60.0))._dsn, lease_s=60)
    name = request.node.name[:30]
    led.pools = [f"cov-{name}-a", f"cov-{name}-b"]
    await led.sync_pools([PoolSpec(id=p, tier="dedicated", tflops=8, vram_gb=8, price_per_hour=1) for p in led.pools])
    yield led
    for a in await led.held():
        if a.pool in led.pools:
            await led.release(a.allocation_id, a.tenant)


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
        subprocess.Popen([sys.executable, "-c", RACER, ledger._dsn, tenant, pool], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=os.getcwd())  # fmt: skip
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
        # both racers hold a running request, and the cap is 2: a third is refused, naming the term
        with pytest.raises(CovenantViolation, match="max_concurrent_requests: limit 2 at once, current usage 2 running"):
            await ledger.admit(tenant, "third", Covenant(max_tflops=2.0, max_concurrent_requests=2))
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    # the dead processes' slices and requests count no more
    assert await ledger.held(tenant) == []
    allocation = await ledger.reserve(allocation_id=new_allocation_id(), tenant=tenant, request_id="r",
                                      pool=ledger.pools[0], model="m", tflops=2.0, vram_gb=0.1, wait_s=0)  # fmt: skip
    await ledger.release(allocation.allocation_id, tenant)
    with pytest.raises(CovenantViolation, match="max_tflops: limit 2 TFLOPS held at once.*one slice asks 3"):
        await ledger.reserve(allocation_id=new_allocation_id(), tenant=tenant, request_id="r",
                             pool=ledger.pools[0], model="m", tflops=3.0, vram_gb=0.1, wait_s=5)  # fmt: skip
