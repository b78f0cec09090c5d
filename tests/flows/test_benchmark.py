"""The scheduled benchmark flow (`flows.benchmark`) on the real local models: samples, chart and
`latest.json`, whose speeds and measured quality the router then uses; the cost report flow
(`flows.cost_report`) then reads the telemetry the benchmark left."""

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.benchmark import benchmark
from flows.cost_report import cost_report
from homeskillet.catalog import load_catalog, with_measurements
from homeskillet.settings import PACKAGED_CATALOG, get_settings

CATALOG = load_catalog(PACKAGED_CATALOG)


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
