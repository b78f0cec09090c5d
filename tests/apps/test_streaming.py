"""The fused answer as it streams (`apps.streaming.FusedStream`): what a client has received is
always the start of the answer `tasks.fusion.fuse_results` writes, and the whole of it at the end,
whatever order the fragments' tokens arrive in."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from apps.streaming import FusedStream
from homeskillet.schemas import Fragment, Plan
from tasks.fusion import fuse_results
from tests.support import fragment_result


def plan(texts: list[str], fusion: str = "ordered") -> Plan:
    fragments = [Fragment(id=f"f{i}", text=t, task_type="chat", est_prompt_tokens=5) for i, t in enumerate(texts, 1)]
    if fusion == "reduce":
        last = fragments[-1].model_copy(update={"depends_on": [f.id for f in fragments[:-1]], "task_type": "reduce"})
        fragments = [*fragments[:-1], last]
    return Plan(request_id="r", fusion=fusion, fragments=fragments)


def answer_of(p: Plan, answers: dict[str, str]) -> str:
    results = {fid: fragment_result(fid, text) for fid, text in answers.items()}
    return fuse_results(p, results, "t", 0.0).answer


def stream(p: Plan, answers: dict[str, str], seed: int, streamed: set[str]) -> tuple[list[str], str]:
    """Feed the events of a run whose `streamed` fragments send their answers token by token
    (interleaved at random), the others at once; the deltas sent and the final remainder."""
    s = FusedStream()
    sent = [s.feed({"event": "planned", "fusion": p.fusion, "fragments": [f.model_dump() for f in p.fragments]})]
    rng = random.Random(seed)
    pending = {fid: [answers[fid][i : i + 3] for i in range(0, len(answers[fid]), 3)] for fid in streamed}
    order = [f.id for f in p.fragments]
    rng.shuffle(order)
    while any(pending.values()) or order:
        live = [fid for fid, tokens in pending.items() if tokens]
        if live and (not order or rng.random() < 0.7):
            fid = rng.choice(live)
            sent.append(s.feed({"event": "token", "fragment_id": fid, "text": pending[fid].pop(0)}))
        elif order and not pending.get(order[0]):
            fid = order.pop(0)
            sent.append(s.feed({"event": "answered", "fragment_id": fid, "text": answers[fid]}))
        elif order:
            order.append(order.pop(0))
    return sent, s.finish(answer_of(p, answers))


def test_an_ordered_plan_streams_in_fusion_order_and_ends_with_the_whole_answer():
    p = plan(["What is 2+2?", "Name a river.", "Say hi."])
    answers = {"f1": " Four. ", "f2": "\nThe Nile", "f3": "Hi there!\n"}
    for seed in range(20):
        sent, rest = stream(p, answers, seed, streamed={"f1", "f2", "f3"})
        assert "".join(sent) + rest == answer_of(p, answers)
        assert rest == ""  # every fragment was answered: nothing was left for the end


def test_a_later_fragments_tokens_wait_until_every_fragment_before_it_is_answered():
    p = plan(["A?", "B?"])
    s = FusedStream()
    assert (
        s.feed({"event": "planned", "fusion": "ordered", "fragments": [f.model_dump() for f in p.fragments]})
        == "1. A?\n"
    )
    assert s.feed({"event": "token", "fragment_id": "f2", "text": "bee"}) == ""  # f1 is not answered yet
    assert s.feed({"event": "token", "fragment_id": "f1", "text": " ay "}) == "ay"  # its trailing space held back
    assert s.feed({"event": "answered", "fragment_id": "f1", "text": " ay "}) == "\n\n2. B?\nbee"
    assert s.feed({"event": "answered", "fragment_id": "f2", "text": "bee."}) == "."


def test_a_reduce_plan_streams_the_combining_fragment_only():
    p = plan(["Summarize part one.", "Summarize part two.", "Combine."], fusion="reduce")
    answers = {"f1": "one", "f2": "two", "f3": " Both parts, combined."}
    sent, rest = stream(p, answers, 1, streamed={"f3"})
    assert "".join(sent) + rest == answer_of(p, answers) == "Both parts, combined."
    assert "one" not in "".join(sent)


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4),
    answers=st.lists(st.text(max_size=20), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
    streamed=st.sets(st.integers(1, 4)),
)
def test_what_was_sent_is_always_the_start_of_the_answer(texts, answers, seed, streamed):
    p = plan(texts)
    given_answers = {f.id: answers[i] for i, f in enumerate(p.fragments)}
    sent, rest = stream(p, given_answers, seed, streamed={f"f{i}" for i in streamed if i <= len(texts)})
    assert "".join(sent) + rest == answer_of(p, given_answers)
