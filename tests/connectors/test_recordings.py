"""RouterBench recordings (`connectors.recordings`): a record's task type comes from its eval name,
and a prompt that quotes a recorded question (an aggregator's) gets the answer recorded for it."""

import pytest

from connectors.recordings import Recordings, load
from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tests.support import write_bench


def test_records_take_their_task_type_from_the_eval_name():
    arc = load(ROUTERBENCH / "arc_challenge_train.csv")[:3]
    mbpp = load(ROUTERBENCH / "mbpp_train.csv")[:3]
    assert {r.task for r in arc} == {"multiple_choice"} and {r.task for r in mbpp} == {"code"}
    assert {r.source for r in arc} == {"arc_challenge_train"}


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
