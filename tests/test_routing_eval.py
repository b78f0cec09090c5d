"""Routing strategies over recorded answers: the replay provider, scoring, and eval-routing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest

from connectors.replay import ReplayProvider, create_app, load
from homeskillet.errors import InvalidRequest, NoRoute
from tasks.policy import evaluate, is_correct, normalise, oracle, single_models

ROUTERBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "routerbench"
HOMESKILLET = str(Path(sys.executable).with_name("homeskillet"))


def write_bench(path: Path, rows: list[dict]) -> Path:
    """A RouterBench-format file: models cheap-a, cheap-b (cost 1) and big (cost 10)."""
    table = []
    for i, r in enumerate(rows):
        row = {"sample_id": f"s{i}", "prompt": str([f"Q{i}?\nA) x\nB) y\nAnswer:"]), "eval_name": "arc"}
        for model, cost in (("cheap-a", 1.0), ("cheap-b", 1.0), ("big", 10.0)):
            answer = r[model]
            row[model] = 1.0 if answer == r["gold"] else 0.0
            row[f"{model}|model_response"] = str([answer])
            row[f"{model}|total_cost"] = cost
        table.append(row)
    pd.DataFrame(table).to_csv(path)
    return path


def test_normalisation_per_task():
    assert normalise("arc_challenge_train", "The answer is C.") == "C"
    assert normalise("winograde_train", "2") == "B"
    assert normalise("mbpp_train", "Sure:\n```python\ndef f():\n    return 1\n```") == "def f(): return 1"


def test_cascade_accepts_agreement_and_escalates_disagreement(tmp_path):
    # big is always right; the cheap pair agree (and are right) on 3 of 4 records, disagree on the 4th
    rows = [dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"})] * 3 + [
        dict(gold="B", **{"cheap-a": "A", "cheap-b": "C", "big": "B"})
    ]
    records = load(write_bench(tmp_path / "arc_challenge_train.csv", rows * 5))
    assert len({r.prompt for r in records}) == 20
    score, decisions = evaluate(records, "cascade", folds=5)
    assert score.accuracy == 1.0
    assert score.cost == pytest.approx(15 * 2 + 5 * 12)  # agreements pay 2, escalations 12
    escalated = [d for d in decisions if "escalated" in d.why]
    assert len(escalated) == 5 and all(d.models[-1] == "big" and d.confidence == 0 for d in escalated)
    assert oracle(records).cost == pytest.approx(15 * 1 + 5 * 10)  # the cheapest right model each time
    assert single_models(records)["big"].accuracy == 1.0


def test_an_answer_no_correct_model_gave_is_wrong(tmp_path):
    records = load(write_bench(tmp_path / "arc_challenge_train.csv",
                               [dict(gold="A", **{"cheap-a": "B", "cheap-b": "B", "big": "A"})]))  # fmt: skip
    assert not is_correct(records[0], "B") and is_correct(records[0], "A") and not is_correct(records[0], "")


def test_bad_inputs_are_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidRequest, match="not in RouterBench format"):
        load(bad)
    records = load(write_bench(tmp_path / "arc_challenge_train.csv", [dict(gold="A", **{"cheap-a": "A", "cheap-b": "A", "big": "A"})] * 5))
    with pytest.raises(InvalidRequest, match="unknown strategy 'magic'"):
        evaluate(records, "magic")
    with pytest.raises(NoRoute, match="have no recordings"):
        evaluate(records, "single", allowed=["gpt-9"])


async def test_replay_provider_serves_recorded_answers_over_the_openai_api(tmp_path):
    records = load(write_bench(tmp_path / "arc_challenge_train.csv",
                               [dict(gold="A", **{"cheap-a": "B", "cheap-b": "A", "big": "A"})]))  # fmt: skip
    app = create_app(ReplayProvider(records))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replay") as client:
        body = {"model": "cheap-a", "messages": [{"role": "user", "content": records[0].prompt}]}
        answer = (await client.post("/v1/chat/completions", json=body)).json()
        assert answer["choices"][0]["message"]["content"] == "B" and answer["usage"]["cost_usd"] == 1.0
        unknown = await client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "?"}]})
        assert unknown.status_code == 404


@pytest.mark.skipif(not ROUTERBENCH.exists(), reason="the shared RouterBench files are not beside the checkout")
def test_eval_routing_command_prints_figures_and_ends_with_json():
    files = [str(ROUTERBENCH / f) for f in ("arc_challenge_train.csv", "mbpp_train.csv")]
    done = subprocess.run([HOMESKILLET, "eval-routing", *files, "--strategy", "cascade", "--json"],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    arc = figures["files"]["arc_challenge_train"]
    assert arc["best_single"]["model"] == "gpt-4-1106-preview"
    assert arc["oracle"]["accuracy"] >= arc["accuracy"] and arc["cost"] < arc["best_single"]["cost"]
    assert set(figures["overall"]) == {"accuracy", "cost"}
    bad = subprocess.run([HOMESKILLET, "eval-routing", files[0], "--strategy", "magic", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "unknown strategy" in bad.stderr and bad.stdout.strip() == ""
