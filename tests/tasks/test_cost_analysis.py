"""The cost optimisation analysis over the telemetry (`tasks.cost_analysis`, pure pandas): cost per
tenant and model, idle and over-provisioned cost, tiers weighed against preemption, spend against
each tenant's budget, and a report that says when there is no telemetry yet."""

from datetime import UTC, datetime

import pandas as pd
import pytest

from homeskillet.catalog import load_catalog
from homeskillet.schemas import Covenant
from homeskillet.settings import PACKAGED_CATALOG
from tasks import runtime
from tasks.cost_analysis import analyse

CATALOG = load_catalog(PACKAGED_CATALOG)


def frame(rows):
    base = dict(
        ts=datetime.now(UTC),
        strategy="single",
        backend="local",
        tflops=1.0,
        vram_gb=0.5,
        queue_s=0.0,
        first_token_s=None,
        tokens_in=5,
        error_class=None,
        allocation_id="a",
    )
    return pd.DataFrame([{**base, **r} for r in rows])


def test_cost_analysis_finds_idle_cost_rightsizes_and_weighs_preemption():
    rows = [
        dict(
            request_id=f"r{i}",
            tenant=t,
            fragment_id="f1",
            task_type=k,
            model="smollm2-135m",
            pool=p,
            tier=tier,
            allocate_s=0.5,
            infer_s=1.0,
            release_s=0.5,
            tokens_out=90,
            cost_usd=c,
            outcome="ok",
        )
        for i, (t, k, p, tier, c) in enumerate(
            [
                ("acme", "chat", "local-dedicated", "dedicated", 0.004),
                ("acme", "chat", "local-preemptible", "preemptible", 0.001),
                ("globex", "factual_qa", "local-preemptible", "preemptible", 0.001),
            ]
        )
    ] + [
        dict(
            request_id="r9",
            tenant="globex",
            fragment_id="f1",
            task_type="factual_qa",
            model="smollm2-135m",
            pool="local-preemptible",
            tier="preemptible",
            outcome="error",
            error_class="Preempted",
            tokens_out=0,
            cost_usd=0.0,
            allocate_s=0.1,
            infer_s=None,
            release_s=None,
        )
    ] * 3
    report = analyse(frame(rows), CATALOG)
    assert report.by_tenant.set_index("tenant").cost_usd.to_dict() == pytest.approx({"acme": 0.005, "globex": 0.001})
    # held 2 s, decoding 1 s: half of each slice's cost was idle
    assert report.by_model.idle_cost_usd.iloc[0] == pytest.approx(0.003)
    size = report.rightsizing.set_index("model").loc["smollm2-135m"]
    assert size.used_tflops == pytest.approx(2 * 135e6 * 90 / 1e12, rel=1e-3)  # 2 FLOPs/param/token at 90 tokens/s
    assert size.recommended_tflops < size.requested_tflops and size.over_provisioned_x > 10
    tiers = report.tiers.set_index("task_type")
    assert tiers.loc["factual_qa", "preemption_rate"] == pytest.approx(0.75)  # 3 of 4 attempts preempted
    assert tiers.loc["factual_qa", "recommended_tier"] == "dedicated"  # paying 4x for preemptible loses
    assert tiers.loc["chat", "recommended_tier"] == "preemptible"
    assert "## Recommendations" in report.markdown and "smollm2-135m" in report.markdown


def test_empty_telemetry_gives_a_report_that_says_so():
    assert "No telemetry yet" in analyse(frame([]).iloc[0:0], CATALOG).markdown


def test_the_cost_report_shows_spend_against_budget():
    from tasks.cost_analysis import analyse, budgets

    table = budgets({"acme": Covenant(budget_usd_per_day=0.001), "globex": Covenant()}, {"acme": (0.00025, 0.0005)})
    assert table.set_index("tenant").loc["acme", "day_used"] == "25%"
    assert table.set_index("tenant").loc["globex", "spend_month_usd"] == 0.0
    report = analyse(pd.DataFrame(), runtime.catalog(), table)
    assert "## Spend against budget" in report.markdown and "| acme | 0.00025 | 0.001 | 25% |" in report.markdown
