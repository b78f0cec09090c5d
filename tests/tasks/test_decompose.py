"""Decomposition (`tasks.decompose`): a prompt becomes a plan of fragments (numbered items,
several questions, map-reduce for long text to summarise), each classified by the request
classifier (the .wasm, else the Python reference); sizes and limits are checked."""

import pytest

from homeskillet.errors import InvalidRequest
from tasks.classifier import Classifier
from tasks.decompose import MAX_FRAGMENTS, classify, decompose_prompt, estimate_tokens, fill
from tasks.edge_classifier import WasmClassifier


def texts(plan):
    return [f.text for f in plan.fragments]


def test_several_questions_become_one_fragment_each():
    plan = decompose_prompt(
        "What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea.", "r", 2048, 128
    )
    assert texts(plan) == [
        "What is the capital of France?",
        "Who wrote Romeo and Juliet?",
        "Write a haiku about the sea.",
    ]
    assert [f.task_type for f in plan.fragments] == ["factual_qa", "factual_qa", "chat"]
    assert plan.fusion == "ordered"
    assert all(not f.depends_on for f in plan.fragments)


@pytest.mark.parametrize(
    "prompt",
    [
        "1. What is 2+2?\n2. Name a planet.\n3. Who painted the Mona Lisa?",
        "Answer these: 1) What is 2+2? 2) Name a planet. 3) Who painted the Mona Lisa?",
        "Q1: What is 2+2?\nQ2: Name a planet.\nQ3: Who painted the Mona Lisa?",
    ],
)
def test_numbered_items_become_fragments(prompt):
    plan = decompose_prompt(prompt, "r", 2048, 128)
    assert texts(plan) == ["What is 2+2?", "Name a planet.", "Who painted the Mona Lisa?"]
    assert plan.fragments[0].task_type == "math"


def test_numbers_inside_items_do_not_split_them():
    plan = decompose_prompt("1. Say alpha 2.\n2. Say beta 2.", "r", 2048, 64)
    assert texts(plan) == ["Say alpha 2.", "Say beta 2."]


def test_statements_are_kept_as_context_for_each_question():
    plan = decompose_prompt("I fly to Oslo in May. What should I pack? Which museums open on Mondays?", "r", 2048, 64)
    assert texts(plan) == [
        "I fly to Oslo in May. What should I pack?",
        "I fly to Oslo in May. Which museums open on Mondays?",
    ]


def test_a_single_question_is_one_fragment():
    plan = decompose_prompt("Tell me about the sea, in one sentence.", "r", 2048, 64)
    assert texts(plan) == ["Tell me about the sea, in one sentence."]


def test_long_text_to_summarize_is_chunked_into_a_map_reduce_dag():
    body = "\n\n".join(f"Paragraph {i}. " + "The tide rises and falls with the moon. " * 30 for i in range(12))
    plan = decompose_prompt("Summarize the following:\n" + body, "r", 2048, 128)
    *maps, reduce = plan.fragments
    assert plan.fusion == "reduce"
    assert len(maps) >= 2
    assert all(m.task_type == "summarize" and not m.depends_on for m in maps)
    assert reduce.task_type == "reduce" and reduce.depends_on == [m.id for m in maps]
    assert all(m.est_prompt_tokens <= 2048 - 128 for m in plan.fragments)
    # every word of the text lands in exactly one chunk, in order
    joined = " ".join(m.text.split(":\n\n", 1)[1] for m in maps)
    assert joined.split() == body.split()
    filled = fill(reduce, {m.id: f"summary {m.id}" for m in maps})
    assert all(f"summary {m.id}" in filled for m in maps)


def test_short_text_to_summarize_stays_one_fragment():
    plan = decompose_prompt("Summarize: The cat sat on the mat. It was warm.", "r", 2048, 128)
    assert len(plan.fragments) == 1 and plan.fragments[0].task_type == "summarize"


def test_prompt_beyond_every_context_is_rejected_with_sizes():
    with pytest.raises(InvalidRequest, match=r"beyond every allowed model's context \(largest 2048 tokens"):
        decompose_prompt("Why " + "really " * 2000 + "?", "r", 2048, 128)


def test_text_too_long_even_for_map_reduce_is_rejected():
    with pytest.raises(InvalidRequest, match="chunks"):
        decompose_prompt("Summarize this:\n" + "word " * 200_000, "r", 2048, 128)


def test_too_many_parts_are_rejected():
    prompt = "\n".join(f"{i}. Name a color." for i in range(1, MAX_FRAGMENTS + 2))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_FRAGMENTS}"):
        decompose_prompt(prompt, "r", 2048, 64)


def test_output_budget_must_leave_room_for_a_prompt():
    with pytest.raises(InvalidRequest, match="max_tokens"):
        decompose_prompt("Hi?", "r", 512, 500)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("What is 17 * 23?", "math"),
        ("Who discovered penicillin?", "factual_qa"),
        ("Write a limerick about cats.", "chat"),
        ("Translate good night into German.", "translate"),
        ("Summarize: a b c", "summarize"),
    ],
)
def test_classify(text, kind):
    assert classify(text) == kind


def test_estimate_tokens_is_conservative():
    assert estimate_tokens("abcdef") == 2
    assert estimate_tokens("") == 1


def test_a_request_may_keep_its_prompt_whole_and_declare_its_task_type():
    few_shot = "Which is a gas?\nA) ice\nB) steam\nAnswer: B\n\nWhich is a metal?\nA) iron\nB) wood\nAnswer:"
    assert len(decompose_prompt(few_shot, "r", 2048, 64).fragments) == 2  # split by default: two questions
    (whole,) = decompose_prompt(few_shot, "r", 2048, 64, split=False, task_type="multiple_choice").fragments
    assert whole.text == few_shot and whole.task_type == "multiple_choice"
    (declared,) = decompose_prompt("Tell me about the sea.", "r", 2048, 64, task_type="code").fragments
    assert declared.task_type == "code"
    with pytest.raises(InvalidRequest, match="beyond every allowed model's context"):
        decompose_prompt("Summarize: " + "word " * 3000, "r", 2048, 64, split=False)  # no map-reduce either


def test_the_flow_classifies_through_the_wasm(wasm, reference):
    from tasks import decompose

    assert isinstance(decompose.request_classifier(), WasmClassifier)
    text = "Translate 'where is the station' into Spanish."
    assert decompose.classify(text) == wasm.predict(text)[0] == reference.predict(text)[0] == "translate"


def test_without_the_wasm_the_flow_falls_back_to_the_reference(monkeypatch, wasm):
    from tasks import decompose, edge_classifier

    def missing():
        raise FileNotFoundError("edge/classifier.wasm")

    monkeypatch.setattr(decompose, "wasm_classifier", missing)
    decompose.request_classifier.cache_clear()
    try:
        assert isinstance(decompose.request_classifier(), Classifier)
        text = "Write a SQL query that lists customers by city."
        assert decompose.request_classifier().probabilities(text) == wasm.probabilities(text)
    finally:
        decompose.request_classifier.cache_clear()
    monkeypatch.undo()
    assert decompose.request_classifier() is edge_classifier.wasm_classifier()


def test_splitting_is_linear_and_stops_past_the_fragment_limit():
    """A prompt of tens of thousands of questions: refused as soon as it has more parts than a
    request may have, without building a part per question (the old split copied the shared
    context into each: about 1.6 GB of text for this prompt)."""
    import tracemalloc

    prompt = "Ok. Why? " * 14000  # 126 KB, within the prompt size limit
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest, match="more than 16 parts"):
            decompose_prompt(prompt, "r", 2048, 64)
        with pytest.raises(InvalidRequest, match="more than 3 parts"):
            decompose_prompt(prompt, "r", 2048, 64, max_fragments=3)
        numbered = "".join(f"{i}. Say {i}.\n" for i in range(1, 60))
        with pytest.raises(InvalidRequest, match="more than 16 parts"):
            decompose_prompt(numbered, "r", 2048, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * len(prompt)  # a few copies of the prompt at most, not one per question
    with pytest.raises(InvalidRequest, match="more than 2 parts"):  # a limit below the default holds too
        decompose_prompt("What is 1+1? What is 2+2? What is 3+3?", "r", 2048, 64, max_fragments=2)


def test_a_long_summary_that_cannot_fit_is_refused_before_it_is_cut_up():
    with pytest.raises(InvalidRequest, match="needs more than .* chunks"):
        decompose_prompt("Summarize this:\n" + "word. " * 20000, "r", 2048, 128)
