"""The confidence signals (tasks.confidence): a closed answer's option probability, renormalised
over the options among its first token's alternatives; the mean token probability; agreement of
samples; ROC AUC by Mann-Whitney; and a two-stage cascade's threshold chosen by cross-validation."""

import math

import pytest

from homeskillet.errors import InvalidRequest
from homeskillet.schemas import TokenLogprob
from tasks.confidence import (
    Outcome,
    agreement,
    answer_start,
    auc,
    auc_interval,
    cascade,
    choose_threshold,
    choose_thresholds,
    cross_validate,
    majority,
    mean_probability,
    option_probability,
    token_confidence,
)


def tok(token: str, p: float, **alternatives: float) -> TokenLogprob:
    """A token of probability p and its alternatives (name → probability; `sp_X` is " X")."""
    top = {token: math.log(p)} | {k.replace("sp_", " "): math.log(v) for k, v in alternatives.items()}
    return TokenLogprob(token=token, logprob=math.log(p), top=top)


# what the local models answered (shapes as llama-server returned them)
SMOL_CHOICE = [tok("A", 0.6, B=0.1, The=0.05, C=0.05), tok(")", 0.9), tok(" Logan", 0.7), tok("", 0.2)]
GEMMA_CHOICE = [tok("  ", 0.2, sp_A=0.18, sp_B=0.07), tok("A", 0.3, B=0.1, The=0.03), tok("", 0.3)]
SUM = [tok(" ", 0.7), tok("2", 0.7, **{"1": 0.1}), tok("7", 0.9), tok(" =", 0.5), tok(" ", 0.9)]
SUM += [tok("3", 0.5, **{"4": 0.3, "2": 0.1, "The": 0.05}), tok("5", 0.6)]


def test_the_option_probability_is_renormalised_over_the_options_seen():
    # A 0.6 against B 0.1 and C 0.05; "The" is no option
    assert option_probability("multiple_choice", SMOL_CHOICE) == pytest.approx(0.6 / 0.75)
    # the answer starts at the second token: its own alternatives count, not the first token's
    assert answer_start("multiple_choice", GEMMA_CHOICE) == 1
    assert option_probability("multiple_choice", GEMMA_CHOICE) == pytest.approx(0.3 / 0.4)
    # math: the last number's first digit against the other digits
    assert answer_start("math", SUM) == 5
    assert option_probability("math", SUM) == pytest.approx(0.5 / 0.9)


def test_options_written_differently_count_as_one():
    # "(B", " B" and "2" are all the second option; a sampled "B" outside the listed alternatives counts too
    answer = [
        tok("The", 0.5),
        tok(" answer", 0.9),
        tok(" is", 0.9),
        tok(" (B", 0.2, sp_B=0.2, **{"2": 0.1, "sp_A": 0.5}),
    ]
    assert option_probability("multiple_choice", answer) == pytest.approx(0.5 / 1.0)
    sampled = TokenLogprob(token="C", logprob=math.log(0.05), top={"A": math.log(0.8), "B": math.log(0.15)})
    assert option_probability("multiple_choice", [sampled]) == pytest.approx(0.05)


def test_no_option_no_option_probability():
    prose = [tok("I", 0.5), tok(" think", 0.5), tok(" so", 0.5)]
    assert option_probability("multiple_choice", prose) is None
    assert option_probability("math", prose) is None
    assert option_probability("factual_qa", SMOL_CHOICE) is None
    assert option_probability("math", None) is None and option_probability("math", []) is None


def test_the_mean_probability_is_the_geometric_mean_of_the_answer_tokens():
    assert mean_probability([tok(" Paris", 0.5), tok(".", 0.8)]) == pytest.approx(math.sqrt(0.4))
    # an end token without text does not count (a stream reports it, a whole answer may not)
    assert mean_probability([tok(" Paris", 0.5), tok("", 0.01)]) == pytest.approx(0.5)
    assert mean_probability([]) is None and mean_probability(None) is None


def test_token_confidence_is_the_option_probability_for_closed_answers_else_the_mean():
    assert token_confidence("multiple_choice", SMOL_CHOICE) == option_probability("multiple_choice", SMOL_CHOICE)
    assert token_confidence("factual_qa", SMOL_CHOICE) == mean_probability(SMOL_CHOICE)
    assert token_confidence("multiple_choice", [tok("I", 0.9)]) == 0.0  # no choice at all: nothing to be sure of
    # an empty answer (a completion model that stopped at once) is no answer either
    assert token_confidence("multiple_choice", []) == 0.0 and token_confidence("factual_qa", [tok("", 0.9)]) == 0.0
    assert token_confidence("math", None) is None and token_confidence("chat", None) is None


def test_agreement_is_the_share_with_the_most_common_normalised_answer():
    assert agreement("multiple_choice", ["A) Steven", "A", "The answer is B", "1.", "C"]) == 3 / 5
    assert agreement("math", ["27 + 7 = 34", "34", "35"]) == pytest.approx(2 / 3)
    assert agreement("factual_qa", ["Paris.", "paris", " Paris", "Lyon"]) == 3 / 4
    # answers with no choice agree with none
    assert agreement("multiple_choice", ["no idea", "hmm", "B"]) == pytest.approx(1 / 3)
    assert agreement("multiple_choice", ["no idea", "hmm"]) == 0.0
    assert majority("multiple_choice", ["B.", "A", "B"]) == ("B.", pytest.approx(2 / 3))
    with pytest.raises(InvalidRequest, match="at least one answer"):
        agreement("math", [])


def test_auc_on_known_cases():
    assert auc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert auc([0.5, 0.5, 0.5], [True, False, True]) == 0.5  # all tied: half
    # 2 right (0.8, 0.4) x 2 wrong (0.6, 0.4): 0.8 beats both, 0.4 loses to 0.6 and ties 0.4
    assert auc([0.8, 0.4, 0.6, 0.4], [True, True, False, False]) == pytest.approx((2 + 0.5) / 4)
    with pytest.raises(InvalidRequest, match="all 3 are right"):
        auc([0.1, 0.2, 0.3], [True, True, True])
    with pytest.raises(InvalidRequest, match="all 2 are wrong"):
        auc([0.1, 0.2], [False, False])
    with pytest.raises(InvalidRequest, match="3 scores for 2 labels"):
        auc([0.1, 0.2, 0.3], [True, False])


def test_the_auc_interval_holds_the_auc_and_repeats_for_a_seed():
    scores = [i / 40 for i in range(40)]
    labels = [i % 3 != 0 or i > 30 for i in range(40)]
    low, high = auc_interval(scores, labels)
    assert low <= auc(scores, labels) <= high and high - low > 0.05
    assert auc_interval(scores, labels) == (low, high)


def outcome(signal, cheap_right, strong_right=True):
    return Outcome(signal, cheap_right, 1.0, strong_right, 3.0)


def test_a_cascade_accepts_at_the_threshold_and_escalates_below_it():
    outcomes = [outcome(0.9, True), outcome(0.4, False), outcome(None, True), outcome(0.6, True, False)]
    assert cascade(outcomes, 0.5) == {"accuracy": 1.0, "cost_usd": (1 + 4 + 4 + 1) / 4, "escalated": 2 / 4}
    assert cascade(outcomes, math.inf) == {"accuracy": 3 / 4, "cost_usd": 4.0, "escalated": 1.0}
    # the most right answers, then the cheapest: accept from 0.6 up, placed halfway down to 0.4
    assert choose_threshold(outcomes) == pytest.approx(0.5)
    assert choose_threshold([outcome(0.3, True), outcome(0.7, True)]) == 0.3  # accept all: from the lowest
    assert choose_threshold([outcome(0.3, False), outcome(None, False)]) == math.inf


def test_the_threshold_is_chosen_on_training_folds_and_scored_on_held_out_ones():
    # the signal separates right from wrong cheap answers: a threshold between them is learned
    outcomes = [outcome(0.5 + i / 100, True) for i in range(20)] + [outcome(i / 100, False) for i in range(20)]
    figures = cross_validate(outcomes, folds=5)
    assert len(figures["thresholds"]) == 5 and all(0.19 < t < 0.5 for t in figures["thresholds"])
    assert figures["accuracy"] == 1.0 and figures["escalated"] == 0.5
    assert figures["cost_usd"] == pytest.approx((20 * 1 + 20 * 4) / 40)
    assert cross_validate(outcomes, folds=5) == figures
    with pytest.raises(InvalidRequest, match="2 to 40 folds"):
        cross_validate(outcomes, folds=1)


async def test_a_fragment_carries_the_model_own_confidence_or_none(
    test_catalog, local_services, local_models, monkeypatch
):
    """Through the flow: SmolLM2 on llama.cpp gives log-probabilities, so its multiple-choice
    answer carries its option probability; the echo endpoint gives none, so its answer carries None."""
    from flows.fusion import fuse_request

    monkeypatch.setenv("ECHO_DELAY_S", "0")
    question = (
        'Steven asked Logan for a pen. _ had none.\nA) Steven\nB) Logan\nPrint only a single choice from "A" or "B".'
    )

    async def fragment(model: str):
        constraints = {"allowed_models": [model], "pool": "roomy", "split": False, "max_tokens": 8}
        constraints["task_type"] = "multiple_choice"
        result = await fuse_request(prompt=question, tenant="acme", catalog_path=test_catalog, constraints=constraints)
        (only,) = result.fragments
        return only

    smol = await fragment("smollm2-135m")
    assert smol.task_type == "multiple_choice" and 0 < smol.token_confidence <= 1
    echo = await fragment("echo")
    assert echo.text.startswith("echo:") and echo.token_confidence is None


def test_a_threshold_per_task_type_is_chosen_on_that_type_alone():
    # multiple choice: wrong up to 0.39, right from 0.6; facts: right from 0.3; one threshold cannot serve both
    outcomes, groups = [], []
    for i in range(20):
        outcomes += [outcome(0.6 + i / 100, True), outcome(0.2 + i / 100, False)]
        outcomes += [outcome(0.3 + i / 100, True), outcome(0.1 - i / 400, False)]
        groups += ["multiple_choice", "multiple_choice", "factual_qa", "factual_qa"]
    chosen = choose_thresholds(outcomes, groups)
    assert 0.39 < chosen["multiple_choice"] <= 0.6 and 0.1 < chosen["factual_qa"] <= 0.3
    together = cross_validate(outcomes, folds=5)
    apart = cross_validate(outcomes, folds=5, groups=groups)
    assert apart["accuracy"] == 1.0 and apart["cost_usd"] < together["cost_usd"]
    assert all(set(fold) == {"multiple_choice", "factual_qa"} for fold in apart["thresholds"])
    # per question thresholds: the cascade takes one for each
    assert cascade([outcome(0.5, True), outcome(0.5, False)], [0.4, 0.6])["escalated"] == 0.5
    assert choose_threshold([]) == math.inf
