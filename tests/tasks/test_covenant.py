"""Covenants: each tenant's contract, as catalog data, enforced by routing, the ledger and the flow."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
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
from tests.support import HOMESKILLET


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
async def ledger(request, postgres):
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


# --- the flow: routing narrowed, refusals, budgets, changes without a restart ----------------

NARROW = {"allowed_models": ["echo", "echo-lite"], "allowed_tiers": ["preemptible"], "allowed_regions": ["local"]}


@pytest.fixture
def covenant_catalog(tmp_path, test_catalog, local_services):
    """A catalog file whose tenants have covenants; `write(**covenants)` rewrites them."""
    path = tmp_path / "covenants.yaml"

    def write(**covenants):
        return write_catalog(path, test_catalog, {"acme": {}, **{t.replace("_", "-"): c for t, c in covenants.items()}})

    write.path = write(cov_narrow=NARROW)
    return write


@pytest.mark.usefixtures("assert_no_leaks")
@pytest.mark.parametrize(
    ("constraints", "strategy", "term"),
    [
        ({"allowed_models": ["smollm2-135m"]}, "single", "allowed_models"),
        ({"tier": "dedicated"}, "single", "allowed_tiers"),
        ({"backend": "hostedai", "pool": "hostedai-preemptible"}, "single", "allowed_regions"),
        ({"pool": "tiny"}, "single", "allowed_tiers"),
    ],
)
async def test_a_request_asking_for_what_its_covenant_forbids_is_refused_before_anything_runs(
    covenant_catalog, echo_server, constraints, strategy, term
):
    seen = len(echo_server.seen)
    with pytest.raises(CovenantViolation) as refusal:
        await fuse_request(
            prompt="Say hi.",
            tenant="cov-narrow",
            strategy=strategy,
            constraints=constraints,
            catalog_path=covenant_catalog.path,
        )
    assert refusal.value.term == term and refusal.value.tenant == "cov-narrow"
    assert f"tenant 'cov-narrow' covenant term {term}: limit" in str(refusal.value)
    assert len(echo_server.seen) == seen  # no model was called


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_request_is_routed_within_its_covenant_and_its_provenance_says_so(covenant_catalog):
    result = await fuse_request(prompt="Say hi.", tenant="cov-narrow", catalog_path=covenant_catalog.path)
    (fragment,) = result.fragments
    assert fragment.model in ("echo", "echo-lite") and fragment.tier == "preemptible"
    assert fragment.covenant_version == Covenant(**NARROW).version
    assert fragment.covenant_terms == ["allowed_models", "allowed_regions", "allowed_tiers"]


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_covenant_change_holds_from_the_next_request_without_a_restart(covenant_catalog):
    asked = {"allowed_models": ["echo"], "pool": "roomy", "max_tokens": 8}
    first = await fuse_request(
        prompt="Say hi.", tenant="cov-change", constraints=asked, catalog_path=covenant_catalog(cov_change={})
    )
    assert first.fragments[0].model == "echo"
    covenant_catalog(cov_change={"allowed_models": ["echo-lite"]})
    with pytest.raises(CovenantViolation, match="covenant term allowed_models: limit \\['echo-lite'\\]"):
        await fuse_request(prompt="Say hi.", tenant="cov-change", constraints=asked, catalog_path=covenant_catalog.path)
    second = await fuse_request(
        prompt="Say hi.", tenant="cov-change", constraints={"max_tokens": 8}, catalog_path=covenant_catalog.path
    )
    assert second.fragments[0].model == "echo-lite"
    assert second.fragments[0].covenant_version != first.fragments[0].covenant_version


def one_echo_call_on_tiny(catalog_path) -> float:
    """The estimated cost of one short echo call on the one-slice pool `tiny`."""
    catalog = runtime.catalog(catalog_path)
    echo = next(m for m in catalog.models if m.name == "echo")
    tiny = next(p for p in catalog.pools if p.id == "tiny")
    return estimate_cost(echo, tiny, 5, 128)


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_budget_crossed_mid_request_stops_it_and_releases_everything(covenant_catalog, echo_server):
    """Three fragments that take turns on the one-slice pool `tiny`: the first spends more than
    the budget has left for another call, so the second is refused once its slice is held, and
    the request stops with everything released."""
    path = covenant_catalog(cov_budget={"budget_usd_per_day": 1.5 * one_echo_call_on_tiny(covenant_catalog.path)})
    seen = len(echo_server.seen)
    with pytest.raises(CovenantViolation, match="covenant term budget_usd_per_day: limit .* spent today"):
        await fuse_request(
            prompt="1. Say one.\n2. Say two.\n3. Say three.",
            tenant="cov-budget",
            constraints={"allowed_models": ["echo"], "pool": "tiny"},
            catalog_path=path,
        )
    assert len(echo_server.seen) - seen == 1  # one call ran; the others were stopped before theirs
    ledger = await runtime.services(path).ledger()
    day, month = await ledger.spend("cov-budget")
    assert 0 < day == month
    seen = len(echo_server.seen)
    with pytest.raises(CovenantViolation, match="budget_usd_per_day"):  # the next request does not start
        await fuse_request(
            prompt="Say hi.",
            tenant="cov-budget",
            catalog_path=path,
            constraints={"allowed_models": ["echo"], "pool": "tiny"},
        )
    assert len(echo_server.seen) == seen
    usage = await ledger.usage("cov-budget")
    assert usage["held_slices"] == 0 and usage["requests_running"] == 0


def test_the_cli_exits_2_naming_the_term_and_shows_the_usage(covenant_catalog):
    env = os.environ | {"HOMESKILLET_CATALOG": covenant_catalog.path}
    done = subprocess.run(
        [HOMESKILLET, "run", "Say hi.", "--tenant", "cov-narrow", "--tier", "dedicated"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "tenant 'cov-narrow' covenant term allowed_tiers: limit ['preemptible']" in done.stderr
    assert "Traceback" not in done.stderr
    shown = subprocess.run(
        [HOMESKILLET, "covenant", "show", "cov-narrow", "--json"], capture_output=True, text=True, timeout=300, env=env
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["version"] == Covenant(**NARROW).version and report["terms"] == NARROW
    assert report["usage"]["held_slices"] == 0 and report["usage"]["spend_usd_today"] >= 0


# --- visible: cost report and metrics ------------------------------------------------------


def test_the_cost_report_shows_spend_against_budget():
    from tasks.cost_analysis import analyse, budgets

    table = budgets({"acme": Covenant(budget_usd_per_day=0.001), "globex": Covenant()}, {"acme": (0.00025, 0.0005)})
    assert table.set_index("tenant").loc["acme", "day_used"] == "25%"
    assert table.set_index("tenant").loc["globex", "spend_month_usd"] == 0.0
    report = analyse(pd.DataFrame(), runtime.catalog(), table)
    assert "## Spend against budget" in report.markdown and "| acme | 0.00025 | 0.001 | 25% |" in report.markdown


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_call_waiting_for_room_counts_the_spend_of_the_call_before_it(
    covenant_catalog, echo_server, spend_writes_held
):
    """The spend is written while the slice is still held. With the first call's spend write held
    up, the second call, waiting for the one-slice pool, must not get the room and run before that
    spend, which leaves too little budget for it, is counted."""
    path = covenant_catalog(cov_turns={"budget_usd_per_day": 1.5 * one_echo_call_on_tiny(covenant_catalog.path)})
    seen = len(echo_server.seen)
    run = asyncio.create_task(
        fuse_request(
            prompt="1. Say one.\n2. Say two.",
            tenant="cov-turns",
            constraints={"allowed_models": ["echo"], "pool": "tiny"},
            catalog_path=path,
        )
    )
    assert await spend_writes_held.writer_waiting(run)
    await asyncio.sleep(1.5)  # the second call looks for room meanwhile (every ≤ 0.5 s)
    assert len(echo_server.seen) - seen == 1
    await spend_writes_held.let_go()
    with pytest.raises(CovenantViolation, match="budget_usd_per_day"):
        await run
    assert len(echo_server.seen) - seen == 1


@pytest.mark.usefixtures("assert_no_leaks")
async def test_prometheus_counts_spend_per_tenant(covenant_catalog):
    from prometheus_client import REGISTRY

    def spent() -> float:
        return REGISTRY.get_sample_value("homeskillet_tenant_spend_usd_total", {"tenant": "cov-metrics"}) or 0.0

    before = spent()
    result = await fuse_request(
        prompt="Say hi.",
        tenant="cov-metrics",
        constraints={"max_tokens": 8},
        catalog_path=covenant_catalog(cov_metrics={}),
    )
    assert spent() - before == pytest.approx(result.cost_usd)
    assert REGISTRY.get_sample_value("homeskillet_tenant_allocations_held", {"tenant": "cov-metrics"}) == 0
