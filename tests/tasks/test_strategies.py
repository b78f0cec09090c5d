"""The routing strategies (`tasks.strategies`): answers normalised per task type, routing stats
that round-trip through their file and are narrowed to what a request allows; then in the live
flow, where each model call has its own allocation, provenance keeps them all, and the answer is
the one the policy chose."""

import pytest

from connectors.recordings import load
from flows.fusion import fuse_request
from homeskillet.errors import InvalidRequest, NoRoute
from tasks.evaluation import fit
from tasks.strategies import Stats, normalise
from tests.support import write_bench

LIVE = pytest.mark.usefixtures("local_services", "assert_no_leaks")  # the flow


def test_normalisation_per_task_type():
    assert normalise("multiple_choice", "The answer is C.") == "C"
    assert normalise("multiple_choice", "2") == "B"  # Winogrande's options 1/2 are A/B
    assert normalise("multiple_choice", "I cannot tell") == ""
    assert normalise("math", "12 apples, so 1,234.5 in all") == "1234.5"
    assert normalise("code", "Sure:\n```python\ndef f():\n    return 1\n```") == "def f(): return 1"


def test_routing_stats_round_trip_and_bad_files(tmp_path):
    records = load(
        write_bench(
            tmp_path / "arc_challenge_train.csv", [dict(gold="A", **{"cheap-a": "A", "cheap-b": "B", "big": "A"})] * 5
        )
    )
    stats = fit(records)
    stats.save(tmp_path / "stats.json")
    assert Stats.load(tmp_path / "stats.json") == stats
    assert stats.quality["multiple_choice"] == {"big": 1.0, "cheap-a": 1.0, "cheap-b": 0.0}
    narrowed = stats.only("multiple_choice", ["big", "smollm2-135m"])
    assert narrowed.quality == {"multiple_choice": {"big": 1.0}}
    with pytest.raises(NoRoute, match="no figures for task type 'code'"):
        stats.only("code", ["big"])
    with pytest.raises(NoRoute, match="no allowed model has routing figures"):
        stats.only("multiple_choice", ["smollm2-135m"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InvalidRequest, match="not a routing-stats file"):
        Stats.load(tmp_path / "bad.json")


async def run(test_catalog, prompt, strategy, **constraints):
    return await fuse_request(
        prompt=prompt,
        tenant="acme",
        strategy=strategy,
        catalog_path=test_catalog,
        constraints={"pool": "roomy", "max_tokens": 24, **constraints},
    )


@LIVE
async def test_cascade_accepts_when_two_cheap_models_agree(test_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    result = await run(test_catalog, "What is 2 + 2?", "cascade")
    (fragment,) = result.fragments
    assert fragment.task_type == "math"
    assert fragment.models_called == ["echo-lite", "echo"]  # best quality first among the cheap ones
    assert fragment.confidence == 1.0 and "agree" in fragment.reason
    assert len(set(fragment.allocation_ids)) == 2 and fragment.strategy == "cascade"


@LIVE
async def test_cascade_sends_free_text_straight_to_the_best_model(test_catalog, monkeypatch):
    """A haiku gives no signal a probe could be judged by: no probe is paid for."""
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    result = await run(test_catalog, "Write a haiku about the sea.", "cascade")
    (fragment,) = result.fragments
    assert fragment.models_called == ["smollm2-135m"] and fragment.model == "smollm2-135m"
    assert fragment.confidence is None and "asked smollm2-135m at once" in fragment.reason
    assert not fragment.text.startswith("echo:")
    assert fragment.cost_usd > 0 and len(fragment.allocation_ids) == 1


@LIVE
async def test_cascade_escalates_code_that_is_not_valid(test_catalog, monkeypatch):
    """The echo models answer with the prompt, which is no Python function: escalated."""
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    result = await run(test_catalog, "Write a Python function that reverses a string.", "cascade", task_type="code")
    (fragment,) = result.fragments
    assert fragment.models_called[0] != "smollm2-135m" and fragment.models_called[-1] == "smollm2-135m"
    assert fragment.confidence == 0.0 and "no probe gave valid code" in fragment.reason


@LIVE
async def test_ensemble_votes_and_moa_aggregates(test_catalog, monkeypatch):
    monkeypatch.setenv("ECHO_DELAY_S", "0")
    voted = (await run(test_catalog, "What is 2 + 2?", "ensemble")).fragments[0]
    assert voted.confidence == 1.0 and voted.models_called == ["echo-lite", "echo"]
    mixed = (await run(test_catalog, "Write a haiku about the sea.", "moa")).fragments[0]
    assert mixed.models_called[-1] == "smollm2-135m" and "aggregator smollm2-135m" in mixed.reason


@LIVE
async def test_unknown_strategy_is_refused(test_catalog):
    from homeskillet.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="strategy"):
        await run(test_catalog, "Hi?", "magic")


@LIVE
async def test_learned_routing_stats_decide_instead_of_the_catalog(test_catalog, tmp_path, monkeypatch):
    """A routing-stats file (learned figures) overrides the catalog's priors; one that does not
    cover the fragment's task type is a clear error, with nothing left allocated."""
    from homeskillet.errors import NoRoute
    from tasks.cascade import CascadePlan
    from tasks.strategies import Stats

    monkeypatch.setenv("ECHO_DELAY_S", "0")
    costs = {"echo-lite": 0.001, "echo": 0.002, "smollm2-135m": 0.01}
    learned = Stats(
        {"math": {"echo-lite": 0.2, "echo": 0.9, "smollm2-135m": 0.5}},
        {"math": costs},
        plans={"math": CascadePlan(["echo"], 1, "agreement", "smollm2-135m")},
    )
    learned.save(tmp_path / "stats.json")
    single = (await run(test_catalog, "What is 2 + 2?", "single")).fragments[0]
    assert single.models_called == ["smollm2-135m"]  # the catalog's priors: smollm2 is the best at math
    routed = await fuse_request(
        prompt="What is 2 + 2?",
        tenant="acme",
        strategy="single",
        catalog_path=test_catalog,
        constraints={"pool": "roomy", "max_tokens": 24},
        routing_stats=str(tmp_path / "stats.json"),
    )
    assert routed.fragments[0].models_called == ["echo"]  # learned: echo is far better at math
    cascaded = await fuse_request(
        prompt="What is 2 + 2?",
        tenant="acme",
        strategy="cascade",
        catalog_path=test_catalog,
        constraints={"pool": "roomy", "max_tokens": 24},
        routing_stats=str(tmp_path / "stats.json"),
    )
    (fragment,) = cascaded.fragments
    assert fragment.models_called == ["echo"] and "learned cascade" in fragment.reason
    with pytest.raises(NoRoute, match="no figures for task type 'chat'"):
        await fuse_request(
            prompt="Write a haiku about the sea.",
            tenant="acme",
            strategy="single",
            catalog_path=test_catalog,
            constraints={"pool": "roomy", "max_tokens": 24},
            routing_stats=str(tmp_path / "stats.json"),
        )
