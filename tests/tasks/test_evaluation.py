"""Offline evaluation of the routing strategies over recorded answers (`tasks.evaluation`): the
figures fitted per fold, a strategy replayed record by record (a learned cascade, auto),
correctness after normalisation, bad inputs named, a strategy's score set beside every single
model's and the oracle's (and several files as one); and the `eval-routing` and `learn-routing`
commands that print those figures and write them for the flow."""

import json
import os
import subprocess

import pytest

from connectors.recordings import load
from homeskillet.errors import InvalidRequest, NoRoute
from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tasks.evaluation import Comparison, Score, compare, evaluate, is_correct, oracle, overall, single_models
from tasks.learned import Router
from tasks.strategies import Stats
from tests.support import HOMESKILLET, write_bench


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


def test_without_a_router_auto_runs_the_learned_cascade_where_there_is_one_and_says_so(tmp_path):
    rows = [dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"})] * 3 + [
        dict(gold="B", **{"cheap-a": "A", "cheap-b": "C", "big": "B"})
    ]
    records = load(write_bench(tmp_path / "arc_challenge_train.csv", rows * 5))
    cascade, _ = evaluate(records, "cascade", folds=5, budget_share=0.5)
    auto, decisions = evaluate(records, "auto", folds=5, budget_share=0.5, router=False)
    assert (auto.accuracy, auto.cost) == (cascade.accuracy, cascade.cost)
    assert all(d.strategy == "cascade" and d.why.startswith("auto chose cascade (a cascade learned") for d in decisions)
    # free text has no learned plan and nothing to compare: auto asks the single best-value model
    chat = load(
        write_bench(
            tmp_path / "mt_bench.csv", [dict(gold="x", **{"cheap-a": "x", "cheap-b": "y", "big": "x"})] * 5, "mt-bench"
        )
    )
    _, decisions = evaluate(chat, "auto", folds=5, router=False)
    assert all(d.strategy == "single" and len(d.models) == 1 for d in decisions)


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
def test_learn_routing_writes_stats_the_flow_can_use(tmp_path):
    out = tmp_path / "stats.json"
    done = subprocess.run(
        [
            HOMESKILLET,
            "learn-routing",
            str(ROUTERBENCH / "mbpp_train.csv"),
            "-o",
            str(out),
            "--router",
            str(tmp_path / "router.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    router = Router.load(tmp_path / "router.json")  # the learned router, with a head per recorded model
    assert len(router.heads) == 11 and router.heads["gpt-4-1106-preview"].examples == 299
    assert "router written to" in done.stdout
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


def test_a_strategy_is_set_beside_every_single_model_and_the_oracle_and_files_add_up(tmp_path):
    records = load(
        write_bench(
            tmp_path / "arc_challenge_train.csv",
            [
                dict(gold="A", **{"cheap-a": "A", "cheap-b": "B", "big": "A"}),
                dict(gold="B", **{"cheap-a": "A", "cheap-b": "B", "big": "B"}),
                dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"}),
                dict(gold="B", **{"cheap-a": "A", "cheap-b": "A", "big": "A"}),
            ],
        )
    )
    first = compare(records, Score(1.0, 4.0), limit=3)  # the strategy's score on the first 3 records
    assert (first.records, first.score) == (3, Score(1.0, 4.0))
    assert first.singles == {
        "big": Score(1.0, 30.0),
        "cheap-a": Score(pytest.approx(2 / 3), 3.0),
        "cheap-b": Score(pytest.approx(2 / 3), 3.0),
    }
    assert first.best == "big" and first.oracle == Score(1.0, 3.0)  # the cheapest right model each time
    assert compare(records, Score(1.0, 1.0), limit=1).best == "cheap-a"  # as accurate as big, and cheaper
    assert compare(records, Score(0.0, 0.0)).oracle == Score(0.75, 4.0)  # none right: the cheapest one counts
    other_file = Comparison(1, Score(0.0, 2.0), {"big": Score(0.0, 10.0)}, "big", Score(0.0, 1.0))
    both = overall([first, other_file])
    assert both.records == 4
    assert both.score == Score(0.75, 6.0)  # accuracy weighted by records, costs added
    assert both.singles == {"big": Score(0.75, 40.0)}  # only the models every file recorded
    assert both.best == "big" and both.oracle == Score(0.75, 4.0)


@pytest.mark.usefixtures("local_services")  # the `homeskillet` executable
def test_eval_routing_held_out_fits_on_train_and_reports_curves_aiq_and_operating_points(tmp_path):
    rows = [dict(gold="A", **{"cheap-a": "A", "cheap-b": "B", "big": "A"})] * 2 + [
        dict(gold="B", **{"cheap-a": "A", "cheap-b": "B", "big": "B"})
    ]
    train = write_bench(tmp_path / "train.csv", rows * 8)
    test = write_bench(tmp_path / "test.csv", rows * 4)
    png = tmp_path / "curves.png"
    done = subprocess.run(
        [HOMESKILLET, "eval-routing", "--train", str(train), str(test), "--strategy", "learned", "--json"]
        + ["--png", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["protocol"] == "held-out" and report["train"] == ["train"] and report["test"] == ["test"]
    pooled = report["pooled"]
    assert pooled["records"] == 12 and report["files"]["test"]["records"] == 12
    assert len(pooled["curve"]) > 10 and 0 < pooled["curve_aiq"] <= 1 and 0 < pooled["singles_hull_aiq"] <= 1
    assert set(pooled["operating_points"]) == {"best_at_20pct_of_best_single", "cheapest_matching_best_single"}
    assert pooled["best_single"]["model"] == "big" and pooled["oracle"]["accuracy"] == 1.0
    assert png.stat().st_size > 10_000 and "AIQ" in done.stdout
