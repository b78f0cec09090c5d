"""The hosted·ai backend (`connectors.hostedai_backend`). Pool choice on an account whose pool names
nobody typed into the catalog: the catalog's names first, else rules (tier from name/label
patterns, GPU type, price), else an error that lists what the account offers; pure rules first,
then a real backend against an emulator of such an account over loopback. Then, on the session's
emulator, guarantees a one-line break must fail: the API key absent from every error and log line
of the backend's fault paths, tenants unable to release each other's allocations, retire leaving
alone a subscription that another process still uses (`homeskillet allocations` showing both
processes' allocations as they are), verify telling a live share from a vanished one. Real HTTP,
the real ledger, real processes; credentials are handed to the backend directly, except where the
tenants' Secret blocks are used (the Prefect server)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from connectors.hostedai import HostedPool, Policy
from connectors.hostedai_backend import HostedAIBackend, card_for, choose_pools, match_rules, mismatch
from connectors.ledger import new_allocation_id
from homeskillet.errors import AllocationNotFound, InferenceError, InsufficientResources, NoRoute, Preempted
from homeskillet.schemas import CardSpec, HostedAICredentials, HostedAIMatch, PoolSpec
from tasks import runtime
from tests.support import HOMESKILLET
from tests.support import emulator_credentials as creds

NO_SUBSCRIPTIONS_LEFT = pytest.mark.usefixtures("no_subscriptions_left")
TENANTS_ON_HOSTEDAI = pytest.mark.usefixtures(
    "local_services", "assert_no_leaks", "no_subscriptions_left", "hostedai_tenants"
)


CARDS = {
    "H100": CardSpec(tflops=989, vram_gb=80),
    "A100-80GB": CardSpec(tflops=312, vram_gb=80),
    "L4": CardSpec(tflops=121, vram_gb=24),
    "A10": CardSpec(tflops=125, vram_gb=24),
}


def hosted(id, name, label, gpu, price, free=8) -> HostedPool:
    return HostedPool(
        id=id,
        name=name,
        label=label,
        gpu_model_type=gpu,
        available_vgpus=free,
        sharing_ratio=4,
        price_per_vgpu_hour=price,
    )


OTHER = [
    hosted(311, "h100-sxm-ondemand", "H100 80GB on-demand", "NVIDIA H100 80GB HBM3", 1.10),
    hosted(312, "a100-80g-eu", "A100 reserved capacity", "NVIDIA A100 80GB PCIe", 0.70),
    hosted(321, "gpu-l4-interruptible", "NVIDIA L4 (interruptible)", "NVIDIA L4", 0.14),
    hosted(322, "rtx-a10-community", "A10 community cloud", "NVIDIA A10", 0.10),
    hosted(329, "b200-spot", "B200 spot", "NVIDIA B200", 0.05),
]


def pool(tier, names=(), **match) -> PoolSpec:
    return PoolSpec(
        id=f"hostedai-{tier}",
        backend="hostedai",
        tier=tier,
        tflops=16,
        vram_gb=4,
        price_per_hour=0.5,
        hostedai_pools=list(names),
        hostedai_match=HostedAIMatch(**match),
    )


def names(pools) -> list[str]:
    return [p.name for p in pools]


def test_cards_are_found_by_whole_words_not_by_substrings():
    assert card_for("L4", CARDS)[0] == "L4"  # exact
    assert card_for("NVIDIA L4", CARDS)[0] == "L4"
    assert card_for("nvidia-a100-80gb-pcie", CARDS)[0] == "A100-80GB"
    assert card_for("NVIDIA A100 40GB", CARDS) is None  # A100 40GB is not the 80 GB card, nor an A10
    assert card_for("A10G", CARDS) is None
    assert card_for("NVIDIA A10", CARDS)[0] == "A10"
    assert card_for("H100 80GB HBM3", CARDS)[0] == "H100"
    assert card_for("NVIDIA B200", CARDS) is None
    assert card_for("", CARDS) is None
    # the longest fitting name wins: an "A100" card and an "A100-80GB" card, for an A100 80GB
    both = {**CARDS, "A100": CardSpec(tflops=300, vram_gb=40)}
    assert card_for("NVIDIA A100 80GB SXM", both)[0] == "A100-80GB"
    assert card_for("NVIDIA A100 SXM", both)[0] == "A100"


def test_the_catalogs_names_win_when_the_account_offers_them():
    offered = OTHER + [hosted(201, "l4-spot", "L4 spot", "L4", 0.12), hosted(202, "a10-spot", "A10 spot", "A10", 0.09)]
    assert names(choose_pools(pool("preemptible", ["l4-spot", "a10-spot"]), offered, CARDS)) == ["a10-spot", "l4-spot"]
    assert names(choose_pools(pool("preemptible", ["321"]), offered, CARDS)) == ["gpu-l4-interruptible"]  # by id


def test_preemptible_pools_are_found_by_their_names_and_labels():
    """The catalog names l4-spot and a10-spot; the account has neither."""
    chosen = choose_pools(pool("preemptible", ["l4-spot", "a10-spot"]), OTHER, CARDS)
    # cheapest first; the B200 is cheaper still, but no card in the catalog can size it
    assert names(chosen) == ["rtx-a10-community", "gpu-l4-interruptible"]


def test_dedicated_takes_what_no_preemptible_word_marks():
    assert names(choose_pools(pool("dedicated"), OTHER, CARDS)) == ["a100-80g-eu", "h100-sxm-ondemand"]
    unmarked = [hosted(400, "gpu-pool-7", "", "H100", 2.0)]
    assert names(choose_pools(pool("dedicated"), unmarked, CARDS)) == ["gpu-pool-7"]
    with pytest.raises(NoRoute):  # preemptible needs a word that says so
        choose_pools(pool("preemptible"), unmarked, CARDS)
    with pytest.raises(NoRoute):  # unless told that unmarked pools count
        choose_pools(pool("dedicated", unmarked=False), unmarked, CARDS)
    assert names(choose_pools(pool("preemptible", unmarked=True, exclude=[]), unmarked, CARDS)) == ["gpu-pool-7"]


def test_rules_narrow_by_gpu_type_and_price_and_take_the_catalogs_patterns():
    assert names(choose_pools(pool("preemptible", gpu_types=["L4"]), OTHER, CARDS)) == ["gpu-l4-interruptible"]
    assert names(choose_pools(pool("dedicated", gpu_types=["H100"]), OTHER, CARDS)) == ["h100-sxm-ondemand"]
    assert names(choose_pools(pool("dedicated", max_price_per_vgpu_hour=0.7), OTHER, CARDS)) == ["a100-80g-eu"]
    assert names(choose_pools(pool("preemptible", max_price_per_vgpu_hour=0.12), OTHER, CARDS)) == ["rtx-a10-community"]
    own = pool("preemptible", patterns=[r"^gpu-"], exclude=[])
    assert names(choose_pools(own, OTHER, CARDS)) == ["gpu-l4-interruptible"]
    assert mismatch(OTHER[4], match_rules(pool("preemptible")), CARDS) == "GPU NVIDIA B200 not in the catalog's cards"
    assert mismatch(OTHER[0], match_rules(pool("preemptible", exclude=[])), CARDS) == "name or label matches no pattern"
    assert "excluded" in mismatch(OTHER[0], match_rules(pool("preemptible", patterns=["h100"])), CARDS)


def test_equal_prices_prefer_the_pool_with_more_room():
    offered = [hosted(1, "x-spot", "", "L4", 0.1, free=2), hosted(2, "y-spot", "", "L4", 0.1, free=6)]
    assert names(choose_pools(pool("preemptible"), offered, CARDS)) == ["y-spot", "x-spot"]


def test_defaults_come_from_the_tier():
    rules = match_rules(pool("preemptible"))
    assert "spot" in rules.patterns and "dedicated" in rules.exclude and rules.unmarked is False
    rules = match_rules(pool("dedicated"))
    assert "dedicated" in rules.patterns and "spot" in rules.exclude and rules.unmarked is True
    rules = match_rules(pool("dedicated", patterns=["x"], exclude=["y"], unmarked=False))
    assert (rules.patterns, rules.exclude, rules.unmarked) == (["x"], ["y"], False)


def test_nothing_matching_is_an_error_that_lists_what_the_account_offers():
    with pytest.raises(NoRoute) as caught:
        choose_pools(pool("preemptible", ["l4-spot"], gpu_types=["H200"]), OTHER, CARDS)
    message = str(caught.value)
    assert "none of the pools ['l4-spot']" in message and "hostedai-preemptible (preemptible)" in message
    assert "GPU in ['H200']" in message
    for p in OTHER:  # every pool the account offers, with why it does not fit
        assert p.name in message
    assert "gpu-l4-interruptible (id 321, label 'NVIDIA L4 (interruptible)', NVIDIA L4, US$0.14/vGPU-hour" in message
    assert "GPU NVIDIA L4 not in ['H200']" in message and "name or label excluded" in message
    with pytest.raises(NoRoute, match="the account offers: no pools at all"):
        choose_pools(pool("dedicated"), [], CARDS)
    with pytest.raises(NoRoute) as caught:
        choose_pools(pool("dedicated", max_price_per_vgpu_hour=0.5), OTHER, CARDS)
    message = str(caught.value)
    assert message.startswith("hosted·ai offers no pool for hostedai-dedicated (dedicated) with any name or label")
    assert ", at most US$0.5/vGPU-hour; the account offers: h100-sxm-ondemand (id 311" in message
    assert "US$1.1/vGPU-hour over 0.5); a100-80g-eu (id 312" in message  # one pool after another, each with why


# --- a real backend on such an account -----------------------------------------------------


@pytest.fixture(scope="module")
def other_account(emulator, asgi_server):
    """A second emulator: same teams, pools named as nobody typed them; pods serve the same models."""
    from types import SimpleNamespace

    from doubles.hostedai_emulator import create_app, other_account_config

    config = other_account_config()
    app = create_app(config, model_endpoint=emulator.endpoint)
    url, stop = asgi_server(app)
    yield SimpleNamespace(url=url, state=app.state.emulator, teams={t.name: t for t in config.teams})
    stop()


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_backend_on_an_account_with_other_pool_names_allocates_infers_and_retires(other_account, test_catalog):
    from connectors import openai_client
    from homeskillet import catalog as cat
    from homeskillet.settings import get_settings
    from tasks import runtime

    catalog = runtime.catalog(test_catalog)
    assert cat.pool(catalog, "hostedai-preemptible").hostedai_pools == ["l4-spot", "a10-spot"]  # not on this account
    team = other_account.teams["acme"]

    async def credentials(tenant: str) -> HostedAICredentials:
        return HostedAICredentials(url=other_account.url, api_key=team.api_key, team_id=team.id)

    backend = HostedAIBackend(get_settings(), catalog, credentials)
    echo = cat.model(catalog, "echo")
    for catalog_pool, hosted_pool in (("hostedai-preemptible", 322), ("hostedai-dedicated", 312)):
        allocation_id = new_allocation_id()
        allocation = await backend.allocate(
            allocation_id=allocation_id, tenant="acme", request_id="r-other", pool=catalog_pool, model=echo, wait_s=5
        )
        (sub,) = other_account.state.subs.values()
        assert (sub.pool_id, sub.team_id) == (hosted_pool, team.id)  # the cheapest that fits the tier
        out = await openai_client.complete(
            allocation.endpoint, "echo-1", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert out.text == "echo: hi"
        await backend.release(allocation_id, "acme")  # the last release retires the subscription
        assert backend.subscriptions() == {}
        other_account.state.sweep()
        assert all(s.unsubscribed is not None for s in other_account.state.subs.values())


@pytest.mark.usefixtures("postgres")  # the backend's ledger
async def test_a_backend_that_finds_no_pool_says_what_the_account_offers(other_account, test_catalog):
    from homeskillet import catalog as cat
    from homeskillet.settings import get_settings
    from tasks import runtime

    catalog = runtime.catalog(test_catalog)
    narrow = cat.pool(catalog, "hostedai-dedicated").model_copy(
        update={"hostedai_pools": [], "hostedai_match": HostedAIMatch(gpu_types=["H200"])}
    )
    catalog = catalog.model_copy(update={"pools": [narrow if p.id == narrow.id else p for p in catalog.pools]})
    team = other_account.teams["globex"]

    async def credentials(tenant: str) -> HostedAICredentials:
        return HostedAICredentials(url=other_account.url, api_key=team.api_key, team_id=team.id)

    backend = HostedAIBackend(get_settings(), catalog, credentials)
    allocation_id = new_allocation_id()
    with pytest.raises(NoRoute, match="the account offers: h100-sxm-ondemand") as caught:
        await backend.allocate(
            allocation_id=allocation_id,
            tenant="globex",
            request_id="r-none",
            pool="hostedai-dedicated",
            model=cat.model(catalog, "echo"),
            wait_s=5,
        )
    assert team.api_key not in str(caught.value)
    assert await backend.held("globex") == []  # the reserved slice was given back
    assert other_account.state.subs == {}


# --- secrets on every fault path ----------------------------------------------------------------


def backend(emulator, test_catalog, tenant="acme", policy: Policy | None = None) -> HostedAIBackend:
    """A hosted·ai backend of its own (its ledger on the session's PostgreSQL: a test that makes
    one asks for `postgres`)."""
    from homeskillet.settings import get_settings
    from tasks import runtime

    async def credentials(name: str) -> HostedAICredentials:
        assert name == tenant
        return creds(emulator, tenant)

    return HostedAIBackend(get_settings(), runtime.catalog(test_catalog), credentials, policy)


@NO_SUBSCRIPTIONS_LEFT
@pytest.mark.usefixtures("postgres")
async def test_insufficient_everywhere_names_the_pools_not_the_key(emulator, faults, sweep, test_catalog):
    faults(insufficient_pools=[101, 102])
    b = backend(emulator, test_catalog)
    from homeskillet import catalog as cat

    echo = cat.model(b._catalog, "echo")
    with pytest.raises(InsufficientResources, match="h100-dedicated .insufficient resources.") as caught:
        await b.allocate(
            allocation_id=new_allocation_id(),
            tenant="acme",
            request_id="r",
            pool="hostedai-dedicated",
            model=echo,
            wait_s=5,
        )
    sweep.error(caught.value)
    sweep.check(emulator.teams["acme"].api_key)
    assert await b.held("acme") == []


@NO_SUBSCRIPTIONS_LEFT
@pytest.mark.usefixtures("postgres")
async def test_an_unsubscribe_that_fails_is_logged_without_the_key_and_retried_later(
    emulator, faults, sweep, test_catalog
):
    """The fragment is done, the share stays for now (error logged), and a later retire gives it
    back once hosted·ai answers again, with no release or shutdown to prompt it."""
    b = backend(emulator, test_catalog, policy=Policy(attempts=2, backoff_initial_s=0.01, backoff_max_s=0.2))
    from homeskillet import catalog as cat

    allocation_id = new_allocation_id()
    await b.allocate(
        allocation_id=allocation_id,
        tenant="acme",
        request_id="r",
        pool="hostedai-dedicated",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    (sub_id,) = b.subscriptions().values()
    errors = emulator.state.fired["error"]
    faults(error_rate=1.0, fault_paths=["/gpuaas/pool/unsubscribe"])
    await b.release(allocation_id, "acme")
    assert sweep.seen(logging.ERROR, f"unsubscribe of {sub_id} failed")
    assert sweep.seen(logging.WARNING, "stays until the next retire")
    assert b.subscriptions() == {("acme", "hostedai-dedicated"): sub_id}  # still ours, not forgotten
    assert emulator.state.fired["error"] - errors >= 2 and emulator.state.subs[sub_id].unsubscribed is None
    faults()
    deadline = time.monotonic() + 10
    while b.subscriptions() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert b.subscriptions() == {}  # the scheduled retry gave it back
    sweep.check(emulator.teams["acme"].api_key)


@NO_SUBSCRIPTIONS_LEFT
@pytest.mark.usefixtures("postgres")
async def test_a_preempted_fragment_errs_without_the_key(emulator, faults, sweep, test_catalog):
    from connectors import openai_client
    from homeskillet import catalog as cat
    from tasks.resources import infer

    b = backend(emulator, test_catalog)
    allocation_id = new_allocation_id()
    allocation = await b.allocate(
        allocation_id=allocation_id,
        tenant="acme",
        request_id="r",
        pool="hostedai-preemptible",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    preempted = emulator.state.fired["preempt"]
    faults(preempt_rate=1.0)
    try:
        with pytest.raises(InferenceError, match="preempted") as caught:
            await openai_client.complete(
                allocation.endpoint, "echo-1", messages=[{"role": "user", "content": "x"}], max_tokens=4
            )
        sweep.error(caught.value)
        assert emulator.state.fired["preempt"] == preempted + 1
        assert await b.verify(allocation) is False  # gone: forgotten, so the next allocation subscribes anew
        assert sweep.seen(logging.WARNING, "(preempted)")
        with pytest.raises(Preempted) as task_error:  # what the flow's infer task raises
            await infer.fn(runtime.services(test_catalog), allocation, "x", 4)
        sweep.error(task_error.value)
    finally:
        await b.release(allocation_id, "acme")
    assert b.subscriptions() == {}
    sweep.check(emulator.teams["acme"].api_key)


# --- what hosted·ai answers, parsed: the pod's service in another shape, under another name, hostile --


@NO_SUBSCRIPTIONS_LEFT
@pytest.mark.usefixtures("postgres")
async def test_a_pod_listed_under_its_subscription_with_its_server_under_another_name_serves(
    emulator, faults, test_catalog
):
    """connection-info as subscription entries each with its pods, the server discovered as
    "vllm-openai": the backend's fragment is served there, and no expose-service is sent (the
    panel would refuse one for a port already exposed)."""
    from connectors import openai_client
    from homeskillet import catalog as cat

    faults(connection_info_shape="subscriptions", discovered_as="vllm-openai")
    b = backend(emulator, test_catalog)
    exposed = emulator.state.calls_by_route["POST /pods/expose-service"]
    allocation_id = new_allocation_id()
    allocation = await b.allocate(
        allocation_id=allocation_id,
        tenant="acme",
        request_id="r",
        pool="hostedai-preemptible",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    try:
        out = await openai_client.complete(
            allocation.endpoint, "echo-1", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert out.text == "echo: hi"
        assert emulator.state.calls_by_route["POST /pods/expose-service"] == exposed
    finally:
        await b.release(allocation_id, "acme")
    assert b.subscriptions() == {}


@NO_SUBSCRIPTIONS_LEFT
@pytest.mark.usefixtures("postgres")
@pytest.mark.parametrize("service_url", ["http://169.254.169.254/latest/meta-data", "http://127.0.0.1:{port}/v1"])
async def test_a_hostile_service_url_fails_the_allocation_and_gives_the_subscription_back(
    emulator, faults, sweep, test_catalog, service_url
):
    from homeskillet import catalog as cat
    from homeskillet.errors import HostedAIRejected
    from homeskillet.settings import get_settings

    faults(service_url=service_url.format(port=get_settings().prefect_port))
    b = backend(emulator, test_catalog)
    with pytest.raises(HostedAIRejected, match=r"hosted·ai service URL of subscription \d+: host ") as caught:
        await b.allocate(
            allocation_id=new_allocation_id(),
            tenant="acme",
            request_id="r",
            pool="hostedai-preemptible",
            model=cat.model(b._catalog, "echo"),
            wait_s=5,
        )
    assert "meta-data" not in str(caught.value)
    assert await b.held("acme") == [] and b.subscriptions() == {}
    sweep.check(emulator.teams["acme"].api_key)


# --- tenants apart; retire respects other processes, and the CLI shows them -----------------------


@TENANTS_ON_HOSTEDAI
async def test_tenants_cannot_release_each_others_hostedai_allocations(emulator, test_catalog):
    backend = runtime.backend(test_catalog, "hostedai")
    from homeskillet import catalog as cat

    echo = cat.model(runtime.catalog(test_catalog), "echo")
    ids = {}
    for tenant in ("acme", "globex"):
        ids[tenant] = new_allocation_id()
        allocation = await backend.allocate(
            allocation_id=ids[tenant], tenant=tenant, request_id="r", pool="hostedai-dedicated", model=echo, wait_s=5
        )
        assert allocation.pool == f"hostedai-dedicated/{tenant}"
    subscriptions = backend.subscriptions()
    assert subscriptions[("acme", "hostedai-dedicated")] != subscriptions[("globex", "hostedai-dedicated")]
    with pytest.raises(AllocationNotFound):
        await backend.release(ids["globex"], "acme")
    assert {a.tenant for a in await backend.held()} == {"acme", "globex"}
    for tenant, allocation_id in ids.items():
        await backend.release(allocation_id, tenant)


OTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from connectors import openai_client
    from connectors.hostedai_backend import HostedAIBackend
    from connectors.ledger import new_allocation_id
    from homeskillet import catalog as cat
    from homeskillet.catalog import load_catalog
    from homeskillet.schemas import HostedAICredentials
    from homeskillet.settings import get_settings

    async def main():
        catalog = load_catalog(sys.argv[1])
        creds = HostedAICredentials(url=os.environ["EMU_URL"], api_key=os.environ["EMU_KEY"], team_id=os.environ["EMU_TEAM"])

        async def credentials(tenant):
            return creds

        backend = HostedAIBackend(get_settings(), catalog, credentials)
        allocation_id = new_allocation_id()
        allocation = await backend.allocate(allocation_id=allocation_id, tenant="acme", request_id="r-other-process",
                                            pool="hostedai-dedicated", model=cat.model(catalog, "echo"), wait_s=10)
        print(json.dumps({"allocation_id": allocation_id, "subscription": backend.subscriptions()[("acme", "hostedai-dedicated")],
                          "pid": os.getpid()}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # go on when the test says so
        out = await openai_client.complete(allocation.endpoint, "echo-1", messages=[{"role": "user", "content": "from B"}],
                                           max_tokens=8)
        await backend.release(allocation_id, "acme")
        print(json.dumps({"answer": out.text, "left": list(backend.subscriptions().values())}), flush=True)

    asyncio.run(main())
    """
)


def cli_allocations(*args: str) -> list[dict]:
    done = subprocess.run([HOMESKILLET, "allocations", "--json", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@NO_SUBSCRIPTIONS_LEFT
@pytest.mark.usefixtures("postgres")  # `homeskillet allocations` reads the ledger
async def test_retire_leaves_a_subscription_another_process_uses_and_the_cli_shows_both(emulator, test_catalog):
    from homeskillet import catalog as cat

    here = backend(emulator, test_catalog)
    mine = new_allocation_id()
    allocation = await here.allocate(
        allocation_id=mine,
        tenant="acme",
        request_id="r-this-process",
        pool="hostedai-dedicated",
        model=cat.model(here._catalog, "echo"),
        wait_s=5,
    )
    (sub_id,) = here.subscriptions().values()
    team = emulator.teams["acme"]
    env = os.environ | {"EMU_URL": emulator.url, "EMU_KEY": team.api_key, "EMU_TEAM": team.id}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER_PROCESS, test_catalog],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        started = json.loads(await asyncio.to_thread(other.stdout.readline) or "{}")
        assert started.get("subscription") == sub_id  # adopted the tenant's subscription: no second one
        assert [s.id for s in emulator.state.subs.values() if s.team_id == team.id] == [sub_id]

        # `homeskillet allocations`, a third process, lists both, as they are
        listed = {a["allocation_id"]: a for a in cli_allocations()}
        assert {mine, started["allocation_id"]} <= set(listed)
        for allocation_id, request_id in ((mine, "r-this-process"), (started["allocation_id"], "r-other-process")):
            row = listed[allocation_id]
            assert (row["tenant"], row["pool"], row["model"], row["request_id"], row["state"]) == (
                "acme",
                "hostedai-dedicated/acme",
                "echo",
                request_id,
                "active",
            )
            assert row["endpoint"] == allocation.endpoint  # the subscription's pod
            assert row["tflops"] == 1.0 and row["vram_gb"] == 0.5
        assert mine in {a["allocation_id"] for a in cli_allocations("--tenant", "acme")}
        assert not {mine, started["allocation_id"]} & {
            a["allocation_id"] for a in cli_allocations("--tenant", "globex")
        }

        # this process's last release must not unsubscribe what the other process still uses
        await here.release(mine, "acme")
        assert emulator.state.subs[sub_id].unsubscribed is None
        assert await here.retire_idle(0) == 0  # held off again: nothing retired, none counted
        assert emulator.state.subs[sub_id].unsubscribed is None
        other.stdin.write("go\n")
        other.stdin.flush()
        finished = json.loads(await asyncio.to_thread(other.stdout.readline) or "{}")
        assert finished == {"answer": "echo: from B", "left": []}  # it worked on, then retired the subscription
        assert await asyncio.to_thread(other.wait, 30) == 0
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    emulator.state.sweep()
    assert sub_id not in emulator.state.subs or emulator.state.subs[sub_id].unsubscribed is not None
    # this process forgets its share of it once it looks again (it was held off, not dropped)
    deadline = time.monotonic() + 10
    while here.subscriptions() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert here.subscriptions() == {}
    assert cli_allocations("--tenant", "acme") == []


@NO_SUBSCRIPTIONS_LEFT
@pytest.mark.usefixtures("postgres")
async def test_verify_tells_a_live_share_from_a_vanished_one_and_does_not_guess(emulator, faults, test_catalog):
    """verify() says True for a live subscription and when hosted·ai cannot be asked (not a
    preemption), False once the subscription is gone; the hosted·ai backend lists only its own
    (per-tenant ledger pool) allocations."""
    from homeskillet import catalog as cat
    from tasks import runtime

    b = backend(emulator, test_catalog, policy=Policy(attempts=1, breaker_threshold=100))
    allocation_id = new_allocation_id()
    allocation = await b.allocate(
        allocation_id=allocation_id,
        tenant="acme",
        request_id="r",
        pool="hostedai-dedicated",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    local = runtime.backend(test_catalog)
    local_id = new_allocation_id()
    await local.allocate(
        allocation_id=local_id,
        tenant="acme",
        request_id="r",
        pool="tiny",
        model=cat.model(b._catalog, "echo"),
        wait_s=5,
    )
    try:
        assert [a.allocation_id for a in await b.held("acme")] == [allocation_id]
        assert await b.verify(allocation) is True
        faults(error_rate=1.0)
        assert await b.verify(allocation) is True  # cannot tell: no preemption is declared
        assert b.subscriptions() != {}
        faults()
        (sub_id,) = b.subscriptions().values()
        emulator.state.preempt(emulator.state.subs[sub_id])
        assert await b.verify(allocation) is False
        assert b.subscriptions() == {}  # forgotten: the next allocation subscribes anew
    finally:
        await local.release(local_id, "acme")
        await b.release(allocation_id, "acme")
