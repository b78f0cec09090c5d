import pytest

from homeskillet.catalog import load_catalog
from homeskillet.errors import NoRoute, UnknownModel, UnknownPool
from homeskillet.schemas import Constraints, Fragment, Plan
from homeskillet.settings import PACKAGED_CATALOG
from tasks.routing import candidates, estimate_cost, fragment_cost, route_plan, slice_rate

CATALOG = load_catalog(PACKAGED_CATALOG)


def plan(*pairs):
    return Plan(
        request_id="r",
        fusion="ordered",
        fragments=[Fragment(id=f"f{i}", text=t, task_type=k, est_prompt_tokens=10) for i, (t, k) in enumerate(pairs)],
    )


def test_each_task_type_goes_to_its_most_suitable_model_on_the_cheapest_pool():
    choices = route_plan(plan(("Who?", "factual_qa"), ("Write.", "chat")), CATALOG, Constraints())
    assert choices["f0"].model == "gemma3-270m"
    assert choices["f1"].model == "smollm2-135m"
    assert {c.pool for c in choices.values()} == {"local-preemptible"}  # cheaper per slice
    assert "quality" in choices["f0"].reason and "catalog prior" in choices["f0"].reason


def test_tier_constraint_selects_dedicated_pools():
    choices = route_plan(plan(("Write.", "chat")), CATALOG, Constraints(tier="dedicated"))
    assert choices["f0"].pool == "local-dedicated" and choices["f0"].tier == "dedicated"


def test_allowed_models_limit_the_choice():
    choices = route_plan(plan(("Who?", "factual_qa")), CATALOG, Constraints(allowed_models=["smollm2-135m"]))
    assert choices["f0"].model == "smollm2-135m"


def test_unknown_model_and_pool_are_named():
    with pytest.raises(UnknownModel, match="'gpt-9'.*smollm2-135m"):
        candidates(CATALOG, Constraints(allowed_models=["gpt-9"]))
    with pytest.raises(UnknownPool, match="'nowhere'"):
        candidates(CATALOG, Constraints(pool="nowhere"))


def test_max_cost_nothing_satisfies_is_a_clear_error():
    with pytest.raises(NoRoute, match="no model fits max_cost"):
        route_plan(plan(("Write.", "chat")), CATALOG, Constraints(max_cost_usd=1e-12))


def test_pool_too_small_for_any_model():
    tiny = CATALOG.model_copy(
        update={"pools": [CATALOG.pools[0].model_copy(update={"id": "mini", "tflops": 0.2, "vram_gb": 0.1})]}
    )
    with pytest.raises(NoRoute, match=r"mini \(0.2 TFLOPS, 0.1 GB\) is too small for any allowed model"):
        candidates(tiny, Constraints(pool="mini"))


def test_tier_and_pool_must_agree():
    with pytest.raises(NoRoute, match="preemptible"):
        candidates(CATALOG, Constraints(pool="local-preemptible", tier="dedicated"))


def test_costs_follow_the_larger_share_of_the_pool():
    smol = CATALOG.models[0]
    pool = CATALOG.pools[1]  # 4 TFLOPS, 2 GB, $0.24/h
    assert slice_rate(smol, pool) == pytest.approx(0.24 * max(1 / 4, 0.5 / 2))
    assert fragment_cost(smol, pool, 3600, 0) == pytest.approx(slice_rate(smol, pool))
    assert estimate_cost(smol, pool, 100, 90) > estimate_cost(smol, pool, 100, 9)
