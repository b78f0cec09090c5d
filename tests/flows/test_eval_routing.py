"""Routing strategies over recorded answers: the replay provider, scoring, and eval-routing."""

import asyncio
import json
import os
import subprocess
from pathlib import Path

import httpx
import pandas as pd
import pytest

from connectors.recordings import Recordings, load
from doubles.replay import create_app
from homeskillet.errors import InvalidRequest, NoRoute
from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tasks.evaluation import evaluate, fit, is_correct, oracle, single_models
from tasks.strategies import Stats, normalise
from tests.support import HOMESKILLET


def write_bench(path: Path, rows: list[dict], eval_name: str = "arc-challenge") -> Path:
    """A RouterBench-format file: models cheap-a, cheap-b (cost 1) and big (cost 10)."""
    table = []
    for i, r in enumerate(rows):
        row = {"sample_id": f"s{i}", "prompt": str([f"Q{i}?\nA) x\nB) y\nAnswer:"]), "eval_name": eval_name}
        for model, cost in (("cheap-a", 1.0), ("cheap-b", 1.0), ("big", 10.0)):
            answer = r[model]
            row[model] = 1.0 if answer == r["gold"] else 0.0
            row[f"{model}|model_response"] = str([answer])
            row[f"{model}|total_cost"] = cost
        table.append(row)
    pd.DataFrame(table).to_csv(path)
    return path


def test_normalisation_per_task_type():
    assert normalise("multiple_choice", "The answer is C.") == "C"
    assert normalise("multiple_choice", "2") == "B"  # Winogrande's options 1/2 are A/B
    assert normalise("multiple_choice", "I cannot tell") == ""
    assert normalise("math", "12 apples, so 1,234.5 in all") == "1234.5"
    assert normalise("code", "Sure:\n```python\ndef f():\n    return 1\n```") == "def f(): return 1"


def test_records_take_their_task_type_from_the_eval_name():
    arc = load(ROUTERBENCH / "arc_challenge_train.csv")[:3]
    mbpp = load(ROUTERBENCH / "mbpp_train.csv")[:3]
    assert {r.task for r in arc} == {"multiple_choice"} and {r.task for r in mbpp} == {"code"}
    assert {r.source for r in arc} == {"arc_challenge_train"}


def test_cascade_accepts_agreement_and_escalates_disagreement(tmp_path):
    # big is always right; the cheap pair agree (and are right) on 3 of 4 records, disagree on the 4th
    rows = [dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"})] * 3 + [
        dict(gold="B", **{"cheap-a": "A", "cheap-b": "C", "big": "B"})
    ]
    records = load(write_bench(tmp_path / "arc_challenge_train.csv", rows * 5))
    assert len({r.prompt for r in records}) == 20
    # the plan "both cheap models agree, else big" costs 4.5 a record on average: half of big's 10
    score, decisions = evaluate(records, "cascade", folds=5, budget_share=0.5)
    assert score.accuracy == 1.0
    assert score.cost == pytest.approx(15 * 2 + 5 * 12)  # agreements pay 2, escalations 12
    escalated = [d for d in decisions if "escalated" in d.why]
    assert len(escalated) == 5 and all(d.models[-1] == "big" and d.confidence == 0 for d in escalated)
    assert all(
        d.confidence == 1.0 and "learned cascade: 2 of 2 probes agree" in d.why for d in decisions if d not in escalated
    )
    # within a quarter of big's cost the most accurate plan left is one cheap model on its own
    cheap, decisions = evaluate(records, "cascade", folds=5, budget_share=0.25)
    assert (cheap.accuracy, cheap.cost) == (0.75, 20.0) and all(len(d.models) == 1 for d in decisions)
    assert oracle(records).cost == pytest.approx(15 * 1 + 5 * 10)  # the cheapest right model each time
    assert single_models(records)["big"].accuracy == 1.0


def test_auto_runs_the_learned_cascade_where_there_is_one_and_says_so(tmp_path):
    rows = [dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"})] * 3 + [
        dict(gold="B", **{"cheap-a": "A", "cheap-b": "C", "big": "B"})
    ]
    records = load(write_bench(tmp_path / "arc_challenge_train.csv", rows * 5))
    cascade, _ = evaluate(records, "cascade", folds=5, budget_share=0.5)
    auto, decisions = evaluate(records, "auto", folds=5, budget_share=0.5)
    assert (auto.accuracy, auto.cost) == (cascade.accuracy, cascade.cost)
    assert all(d.strategy == "cascade" and d.why.startswith("auto chose cascade (a cascade learned") for d in decisions)
    # free text has no learned plan and nothing to compare: auto asks the single best-value model
    chat = load(
        write_bench(
            tmp_path / "mt_bench.csv", [dict(gold="x", **{"cheap-a": "x", "cheap-b": "y", "big": "x"})] * 5, "mt-bench"
        )
    )
    _, decisions = evaluate(chat, "auto", folds=5)
    assert all(d.strategy == "single" and len(d.models) == 1 for d in decisions)


def test_a_code_cascade_escalates_answers_that_are_not_valid_code(tmp_path):
    from tasks.cascade import CascadePlan, is_valid

    assert is_valid("code", "", "Here:\n```python\ndef f(x):\n    return x\n```")
    assert not is_valid("code", "", "```python\ndef f(x) return x\n```")  # does not parse
    assert not is_valid("code", "", "```python\nprint(1)\n```")  # defines no function
    plan = CascadePlan(["cheap-a", "cheap-b"], 1, "validity", "big")
    assert plan.step(["x"], [False]) == ("ask", None)
    assert plan.step(["x", "y"], [False, True]) == ("accept", 1)
    assert plan.step(["x", "y"], [False, False]) == ("escalate", None)
    vote = CascadePlan(["a", "b", "c"], 2, "agreement", "big")
    assert vote.step(["A", "A"], [True, True]) == ("accept", 0)  # stops early: the third is not asked
    assert vote.step(["A", "B"], [True, True]) == ("ask", None)
    assert vote.step(["A", "B", "C"], [True] * 3) == ("escalate", None)
    assert vote.step(["", ""], [False, False]) == ("escalate", None)  # no answers: 2 votes are out of reach


def test_an_answer_no_correct_model_gave_is_wrong(tmp_path):
    records = load(
        write_bench(
            tmp_path / "arc_challenge_train.csv", [dict(gold="A", **{"cheap-a": "B", "cheap-b": "B", "big": "A"})]
        )
    )
    assert not is_correct(records[0], "B") and is_correct(records[0], "A") and not is_correct(records[0], "")


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidRequest, match="not in RouterBench format"):
        load(bad)
    records = load(
        write_bench(
            tmp_path / "arc_challenge_train.csv", [dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"})] * 5
        )
    )
    with pytest.raises(InvalidRequest, match="unknown strategy 'magic'"):
        evaluate(records, "magic")
    with pytest.raises(NoRoute, match="have no recordings"):
        evaluate(records, "single", allowed=["gpt-9"])
    with pytest.raises(InvalidRequest, match="budget share must be above 0"):
        evaluate(records, "cascade", budget_share=0)


async def test_replay_provider_serves_recorded_answers_over_the_openai_api(tmp_path):
    records = load(
        write_bench(
            tmp_path / "arc_challenge_train.csv", [dict(gold="A", **{"cheap-a": "B", "cheap-b": "A", "big": "A"})]
        )
    )
    app = create_app(Recordings(records))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replay") as client:
        body = {"model": "cheap-a", "messages": [{"role": "user", "content": records[0].prompt}]}
        answer = (await client.post("/v1/chat/completions", json=body)).json()
        assert answer["choices"][0]["message"]["content"] == "B" and answer["usage"]["cost_usd"] == 1.0
        unknown = await client.post(
            "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "?"}]}
        )
        assert unknown.status_code == 404


def test_an_aggregator_prompt_gets_the_answer_recorded_for_its_question(tmp_path):
    records = load(
        write_bench(
            tmp_path / "arc_challenge_train.csv",
            [
                dict(gold="A", **{"cheap-a": "B", "cheap-b": "A", "big": "A"}),
                dict(gold="B", **{"cheap-a": "B", "cheap-b": "A", "big": "C"}),
            ]
            * 6,
        )
    )
    provider = Recordings(records)
    question = records[11].prompt  # "Q11?…", whose text extends no other record's ("Q1?…" is not its prefix)
    aggregate = f"{question}\n\nCandidate answers from other models:\n1. B\n\nUsing them, give the single best answer."
    assert provider.answer("big", aggregate) == ("C", 10.0)
    with pytest.raises(LookupError, match="not in the recordings"):
        provider.answer("big", "Q99?\nA) x")


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


THROUGH_FLOW_ROWS = (
    [dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"})] * 3  # agree, right
    + [dict(gold="B", **{"cheap-a": "A", "cheap-b": "C", "big": "B"})]  # disagree: big is right
    + [dict(gold="B", **{"cheap-a": "A", "cheap-b": "A", "big": "B"})]  # agree, both wrong
)


@pytest.mark.usefixtures("local_services")  # flows
@pytest.mark.parametrize("strategy", ["cascade", "moa"])
async def test_through_flow_gives_the_in_process_figures(tmp_path, strategy, assert_no_leaks):
    """Each record as a real fuse_request run (replay provider on loopback, recorded costs reported
    in usage): the same decisions, accuracy and cost as the in-process evaluation."""
    from flows.eval_routing import evaluate_through_flow

    records = load(write_bench(tmp_path / "arc_challenge_train.csv", list(THROUGH_FLOW_ROWS) * 3))
    expected, decisions = await asyncio.to_thread(evaluate, records, strategy, 3, None, 10, 0.5)
    score, fused = await evaluate_through_flow(
        records, strategy, tmp_path / "work", folds=3, limit=10, budget_share=0.5
    )
    assert len(fused) == 10
    assert score.accuracy == expected.accuracy and score.cost == pytest.approx(expected.cost)
    for decision, result in zip(decisions, fused):
        (fragment,) = result.fragments
        assert fragment.models_called == decision.models and fragment.strategy == strategy
        assert len(set(fragment.allocation_ids)) == len(decision.models)  # one GPU share per call
    if strategy == "cascade":
        assert 0 < expected.accuracy < 1 and any("escalated" in f.fragments[0].reason for f in fused)


@pytest.mark.usefixtures("local_services")  # the `homeskillet` executable
def test_eval_routing_command_prints_figures_and_ends_with_json():
    files = [str(ROUTERBENCH / f) for f in ("arc_challenge_train.csv", "mbpp_train.csv")]
    done = subprocess.run(
        [HOMESKILLET, "eval-routing", *files, "--strategy", "cascade", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    arc = figures["files"]["arc_challenge_train"]
    assert arc["best_single"]["model"] == "gpt-4-1106-preview"
    assert arc["oracle"]["accuracy"] >= arc["accuracy"] and arc["cost"] < arc["best_single"]["cost"]
    assert set(figures["overall"]) == {"accuracy", "cost"}
    mbpp = figures["files"]["mbpp_train"]
    assert figures["overall"]["cost"] == pytest.approx(arc["cost"] + mbpp["cost"])
    assert "overall: 1338 records" in done.stdout  # the oracle and every single model over both files too
    bad = subprocess.run(
        [HOMESKILLET, "eval-routing", files[0], "--strategy", "magic", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown strategy" in bad.stderr and bad.stdout.strip() == ""


@pytest.mark.usefixtures("local_services")  # the `homeskillet` executable
def test_eval_routing_through_flow_matches_in_process_on_real_records():
    arc = str(ROUTERBENCH / "arc_challenge_train.csv")
    figures = []
    for extra in ([], ["--through-flow"]):
        done = subprocess.run(
            [HOMESKILLET, "eval-routing", arc, "--strategy", "cascade", "--limit", "6", "--json", *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env=os.environ.copy(),
        )
        assert done.returncode == 0, done.stderr
        figures.append(json.loads(done.stdout.strip().splitlines()[-1])["files"]["arc_challenge_train"])
    in_process, through_flow = figures
    assert through_flow["accuracy"] == in_process["accuracy"]
    assert through_flow["cost"] == pytest.approx(in_process["cost"]) and in_process["cost"] > 0


@pytest.mark.usefixtures("local_services")  # the `homeskillet` executable
def test_learn_routing_writes_stats_the_flow_can_use(tmp_path):
    out = tmp_path / "stats.json"
    done = subprocess.run(
        [HOMESKILLET, "learn-routing", str(ROUTERBENCH / "mbpp_train.csv"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    stats = Stats.load(out)
    assert max(stats.quality["code"], key=stats.quality["code"].get) == "gpt-4-1106-preview"
    plan = stats.plans["code"]
    assert plan.signal == "validity" and plan.escalate == "gpt-4-1106-preview"
    assert sum(stats.cost["code"][m] for m in plan.probes) <= 0.25 * stats.cost["code"]["gpt-4-1106-preview"]
    bad = subprocess.run(
        [HOMESKILLET, "learn-routing", str(tmp_path / "missing.csv"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "missing.csv" in bad.stderr
