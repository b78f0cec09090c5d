"""The scheduled flows: benchmark across model sizes, cost report over the telemetry."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from flows.benchmark import benchmark
from flows.cost_report import cost_report
from homeskillet.catalog import load_catalog, with_measurements
from homeskillet.settings import PACKAGED_CATALOG, get_settings
from tasks.benchmarking import summarise
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


def test_benchmark_summary_percentiles():
    samples = pd.DataFrame(
        [
            {
                "model": "m",
                "parameters_m": 1,
                "concurrency": 1,
                "ttft_s": 0.1,
                "latency_s": float(i),
                "alloc_overhead_s": 0.01,
                "tokens_out": 10,
                "tokens_per_s": 50.0,
                "cost_usd": 0.001,
            }
            for i in range(1, 21)
        ]
    )
    row = summarise(samples).iloc[0]
    assert row.latency_p50_s == pytest.approx(10.5) and row.latency_p95_s == pytest.approx(19.05)
    assert row.usd_per_1k_tokens == pytest.approx(0.1)


@pytest.fixture
def own_home(tmp_path, monkeypatch):
    """The benchmark's outputs (latest.json, which changes routing) and the telemetry the cost
    report reads go to this test's own folder, not the session's, so later tests route as before."""
    from homeskillet.settings import get_settings
    from tasks import runtime

    settings = get_settings().model_copy(update={"home": tmp_path, "telemetry_dir": tmp_path / "telemetry"})
    monkeypatch.setattr(runtime.Services, "settings", property(lambda self: settings))
    return tmp_path


@pytest.mark.usefixtures("local_services", "assert_no_leaks")
async def test_benchmark_then_cost_report_on_real_models(own_home):
    session_latest = get_settings().home / "benchmarks" / "latest.json"
    before = session_latest.read_bytes() if session_latest.exists() else None
    out = await benchmark(
        models=["smollm2-135m", "gemma3-270m"], repetitions=1, concurrency=[1, 2], max_tokens=8, quality_questions=4
    )
    samples = pd.read_parquet(out["parquet"])
    assert len(samples) == 2 * (1 + 2) and set(samples.model) == {"smollm2-135m", "gemma3-270m"}
    # a base model may stop at once (its first token is a stop string): then there is no first token
    assert samples.ttft_s.notna().sum() >= 4 and (samples.ttft_s.dropna() > 0).all()
    assert (samples.alloc_overhead_s > 0).all()
    assert Path(out["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(out["parquet"]).parent == own_home / "benchmarks"
    assert (
        session_latest.read_bytes() if session_latest.exists() else None
    ) == before  # the session's routing is untouched
    latest = json.loads((Path(out["parquet"]).parent / "latest.json").read_text())
    assert set(latest["tokens_per_second"]) == {"smollm2-135m", "gemma3-270m"}
    measured = with_measurements(CATALOG, Path(out["parquet"]).parent / "latest.json")
    smol = next(m for m in measured.models if m.name == "smollm2-135m")
    assert smol.tokens_per_second == latest["tokens_per_second"]["smollm2-135m"]  # the router's estimate now
    # quality: 4 labelled questions per task type and model, scored; the router's quality now
    assert latest["quality_questions"] == 12 and set(latest["quality"]) == {"smollm2-135m", "gemma3-270m"}
    answered = pd.read_parquet(Path(out["parquet"]).parent / f"quality-{latest['measured']}.parquet")
    assert len(answered) == 24 and set(answered.task_type) == {"multiple_choice", "math", "factual_qa"}
    smol_math = answered[(answered.model == "smollm2-135m") & (answered.task_type == "math")].right.mean()
    assert latest["quality"]["smollm2-135m"]["math"] == pytest.approx(smol_math, abs=1e-4)
    assert smol.task_types["math"] == pytest.approx(smol_math, abs=1e-4)
    assert smol.measured_task_types == ["factual_qa", "math", "multiple_choice"]
    assert smol.task_types["chat"] == 0.7  # a task type nobody measured keeps its prior

    path = await cost_report()
    text = Path(path).read_text()
    assert "## By model" in text and "smollm2-135m" in text and "gemma3-270m" in text


def test_labelled_answers_are_scored_by_task_type():
    import operator
    import re

    from tasks.quality import is_right, load_set, per_task_type

    items = load_set()
    chosen = per_task_type(items, 2)
    assert [i["task_type"] for i in chosen].count("math") == 2 and len(chosen) == 6
    choice = {"task_type": "multiple_choice", "accept": ["B"]}
    assert is_right(choice, "B) steam") and not is_right(choice, "A") and not is_right(choice, "")
    math = {"task_type": "math", "accept": ["282"]}
    assert is_right(math, "94 times 3 is 282.") and not is_right(math, "It is 28.")
    fact = {"task_type": "factual_qa", "accept": ["Au"]}
    assert is_right(fact, "The symbol is Au.") and not is_right(fact, "because gold")  # a word, not a substring
    ops = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}
    for item in (i for i in items if i["task_type"] == "math"):  # the generated results are right
        a, op, b = re.fullmatch(r"What is (\d+) (\w+) (\d+)\?", item["question"]).groups()
        assert item["accept"] == [str(ops[op](int(a), int(b)))]
