"""Pool choice on a hosted·ai account whose pool names nobody typed into the catalog:
the catalog's names first, else rules (tier from name/label patterns, GPU type, price), else an
error that lists what the account offers. Pure rules first, then a real backend against an
emulator of such an account over loopback."""

import pytest

from connectors.hostedai import HostedPool
from connectors.hostedai_backend import HostedAIBackend, card_for, choose_pools, match_rules, mismatch
from connectors.ledger import new_allocation_id
from homeskillet.errors import NoRoute
from homeskillet.schemas import CardSpec, HostedAICredentials, HostedAIMatch, PoolSpec

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


def test_a_pattern_that_is_no_regex_is_refused_in_the_catalog():
    with pytest.raises(ValueError, match="not a regular expression"):
        HostedAIMatch(patterns=["spot("])


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
