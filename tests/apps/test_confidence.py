"""The confidence bench (`apps.confidence`, `homeskillet bench-confidence`): the local models on
a few labelled questions through their real llama.cpp servers, the figures summarised from
per-question rows, the outcomes in RouterBench's format, and the figures shipped with the package."""

import json
import math
from pathlib import Path

import pytest

from apps.confidence import EVAL_NAMES, eval_name, recordings_frame, report, run, summarise, write
from connectors.recordings import EVAL_TASK_TYPES, load
from tasks.decompose import classify

DATA = Path(__file__).resolve().parents[2] / "homeskillet" / "data"


async def test_the_bench_on_a_few_questions_through_the_real_models(local_models, tmp_path):
    figures = await run(per_task=1, samples=2, folds=2)
    rows = figures["rows"]
    assert figures["questions"] == 3 and len(rows) == 6
    assert {r["model"] for r in rows} == {"smollm2-135m", "gemma3-270m"}
    assert sorted({r["task_type"] for r in rows}) == ["factual_qa", "math", "multiple_choice"]
    for row in rows:
        # llama-server gives log-probabilities: every answer has a token confidence
        assert 0 <= row["token_confidence"] <= 1
        assert (row["mean_probability"] is None) == (row["answer"] == "")  # an empty answer has no tokens
        assert (row["option_probability"] is None) == (row["task_type"] == "factual_qa" or row["token_confidence"] == 0)
        assert len(row["samples"]) == 2 and row["agreement"] in (0.0, 0.5, 1.0)
        assert row["agreement_with_answer"] in (0.0, 0.5, 1.0)
        assert row["cost_usd"] > 0 and row["samples_cost_usd"] > 0
    for model, m in figures["models"].items():
        assert set(m["auc"]) == {
            "token_confidence",
            "mean_probability",
            "option_probability",
            "agreement_with_answer",
            "agreement",
        }
        assert m["auc"]["token_confidence"]["n"] == 3
        assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in rows if r["model"] == model) / 3, abs=1e-4)
    cascade = figures["cascade"]
    assert {cascade["cheap"], cascade["strong"]} == {"smollm2-135m", "gemma3-270m"}
    assert set(cascade["signals"]) == {"token_confidence", "mean_probability", "agreement_with_answer", "agreement"}
    assert set(cascade["signals_per_task"]) == set(cascade["signals"])
    assert "smollm2-135m" in report(figures) and "always escalate" in report(figures)

    # the outcomes in RouterBench's format load as recordings, answers and costs kept
    path = tmp_path / "local.csv"
    recordings_frame(rows).to_csv(path, index=False)
    records = load(path, classify)
    assert [r.task for r in records] == ["multiple_choice", "math", "factual_qa"]
    for record in records:
        for row in (r for r in rows if r["id"] == record.sample_id):
            assert record.responses[row["model"]] == row["answer"]
            assert record.correct[row["model"]] == row["correct"]
            assert record.cost[row["model"]] == pytest.approx(row["cost_usd"])

    # the figures go under the set's name, beside what the file held
    out = tmp_path / "confidence.json"
    out.write_text(json.dumps({"other_set": {"questions": 7}}))
    write(figures, out, "quality_set")
    saved = json.loads(out.read_text())
    assert saved["other_set"] == {"questions": 7} and saved["quality_set"]["questions"] == 3
    assert "samples" not in saved["quality_set"]["rows"][0] and "question" not in saved["quality_set"]["rows"][0]


def test_each_item_has_its_eval_name():
    assert eval_name("arc-challenge.test.1108") == "arc-challenge"
    assert eval_name("winogrande.dev.949") == "winogrande"
    assert eval_name("arith-12") == EVAL_NAMES["arith"] and eval_name("fact-3") == EVAL_NAMES["fact"]


def row(qid, model, correct, confidence, cost):
    return {
        "id": qid,
        "task_type": "multiple_choice",
        "model": model,
        "correct": correct,
        "majority_correct": correct,
        "token_confidence": confidence,
        "mean_probability": confidence,
        "option_probability": confidence,
        "agreement": confidence,
        "agreement_with_answer": confidence,
        "cost_usd": cost,
        "samples_cost_usd": 5 * cost,
        "answer_and_samples_cost_usd": 5 * cost,
    }


def test_the_cascade_asks_the_cheaper_model_first_and_is_compared_with_each_alone():
    # the cheap model is right exactly when it is sure; the strong one is always right
    rows = []
    for i in range(20):
        sure = i % 2 == 0
        rows += [row(f"q{i}", "small", sure, 0.9 if sure else 0.3, 1.0), row(f"q{i}", "big", True, 0.8, 4.0)]
    figures = summarise(rows, folds=4)
    assert figures["models"]["small"]["auc"]["token_confidence"]["auc"] == 1.0
    assert figures["models"]["big"]["auc"]["token_confidence"]["auc"] is None  # all right: nothing to rank
    cascade = figures["cascade"]
    assert (cascade["cheap"], cascade["strong"]) == ("small", "big")
    assert cascade["single"] == {"small": {"accuracy": 0.5, "cost_usd": 1.0}, "big": {"accuracy": 1.0, "cost_usd": 4.0}}
    assert cascade["always_escalate"] == {"accuracy": 1.0, "cost_usd": 5.0}
    learned = cascade["signals"]["token_confidence"]
    assert learned["accuracy"] == 1.0 and learned["escalated"] == 0.5 and learned["cost_usd"] == 3.0
    assert all(0.3 < t <= 0.9 for t in learned["thresholds"]) and learned["threshold"] == pytest.approx(0.6)
    per_task = cascade["signals_per_task"]["token_confidence"]
    assert per_task["accuracy"] == 1.0 and per_task["threshold"] == {"multiple_choice": pytest.approx(0.6)}


def test_the_shipped_outcomes_load_as_recordings_and_the_figures_cover_them():
    records = load(DATA / "local_recordings.csv", classify)
    assert len(records) >= 100 and {m for r in records for m in r.responses} == {"smollm2-135m", "gemma3-270m"}
    assert {r.task for r in records} == {"multiple_choice", "math", "factual_qa"}
    named = {eval_name(r.sample_id) for r in records}
    assert named - {"arc-challenge", "winogrande"} == set(EVAL_NAMES.values())
    figures = json.loads((DATA / "confidence.json").read_text())
    shipped = figures["quality_set"]
    assert shipped["questions"] == 100 and len(shipped["rows"]) == 200
    for m in shipped["models"].values():
        assert 0 <= m["auc"]["token_confidence"]["auc"] <= 1
    assert all(t is None or not math.isnan(t) for s in shipped["cascade"]["signals"].values() for t in s["thresholds"])
    # every eval name the file uses gives its task type once connectors.recordings knows it
    for name in {"arc-challenge", "winogrande"}:
        assert name in EVAL_TASK_TYPES
