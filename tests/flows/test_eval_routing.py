"""Routing evaluation through the flow itself (`flows.eval_routing`): RouterBench records as real
`fuse_request` runs on the replay provider give the same decisions, accuracy and cost as the
in-process evaluation, on made-up records and on real ones through `eval-routing --through-flow`."""

import asyncio
import json
import os
import subprocess

import pytest

from connectors.recordings import load
from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tasks.evaluation import evaluate
from tests.support import HOMESKILLET, write_bench

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
