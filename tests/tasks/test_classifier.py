"""The request classifier's Python reference (`tasks.classifier`): deterministic features and
byte-level text rules, exp and log without a math library, committed weights, reproducible
training."""

import math
import random

import pytest

from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tasks.classifier import (
    MAX_TEXT,
    WEIGHTS,
    Classifier,
    _exp_neg,
    cross_validate,
    f32,
    features,
    log_table,
    train,
    training_examples,
)


def test_features_are_deterministic_sparse_and_normalised():
    a, b = features("Translate 'hello' into French."), features("Translate 'hello' into French.")
    assert a == b and len(a) > 20
    assert sum(v * v for v in a.values()) == pytest.approx(1.0)
    assert features("") == {} or sum(v * v for v in features("").values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Which gas do plants absorb?\nA) oxygen\nB) carbon dioxide\nC) helium\nD) neon\nAnswer:", "multiple_choice"),
        ("Write a Python function that returns the largest element of a list.", "code"),
        ("Translate 'where is the station' into Spanish.", "translate"),
        ("Solve 4x - 8 = 12 for x.", "math"),
        ("Extract every email address from this paragraph: write to ann@example.com.", "extract"),
    ],
)
def test_committed_weights_classify_unseen_requests(text, label):
    assert Classifier.load(WEIGHTS).predict(text)[0] == label


def test_weights_round_trip_through_the_file(tmp_path):
    model = Classifier.load(WEIGHTS)
    model.save(tmp_path / "c.json")
    again = Classifier.load(tmp_path / "c.json")
    text = "Summarize this article in two sentences: prices rose."
    assert again.probabilities(text) == pytest.approx(model.probabilities(text))


@pytest.mark.slow  # trains on all the recordings, then three more times to cross-validate
def test_training_command_reproduces_the_committed_model():
    texts, labels = training_examples(ROUTERBENCH)
    retrained, committed = train(texts, labels), Classifier.load(WEIGHTS)
    probe = texts[::7]
    agree = sum(retrained.predict(t)[0] == committed.predict(t)[0] for t in probe)
    assert agree == len(probe)
    scores = cross_validate(texts, labels, folds=3)
    assert scores["overall"] > 0.85 and scores["multiple_choice"] > 0.95 and scores["code"] > 0.9


def test_text_rules_are_byte_level(reference):
    from tasks.classifier import features

    same = reference.probabilities
    assert same("HeLLo   WORLD\t\n") == same("hello world")  # ASCII case, ASCII whitespace runs
    assert same("İ") != same("i̇")  # no Unicode case mapping
    assert same("a\u00a0b") != same("a b") and same("a\u0085b") != same("a b")  # NBSP, NEL are not spaces
    assert same("a\x0bb") == same("a b")  # vertical tab is
    assert features("") == {}
    x = features("Translate 'hello' into French.")
    assert list(x) == sorted(x) and all(f32(v) == v for v in x.values())
    assert sum(v * v for v in x.values()) == pytest.approx(1.0, abs=1e-6)
    # only the first MAX_TEXT bytes of normalised text count
    assert features("q" * MAX_TEXT + " solve") == features("q" * MAX_TEXT + " translate")


def test_exp_and_log_are_accurate_without_a_math_library():
    rng = random.Random(3)
    for d in [0.0, -1e-30, -0.5, -1.0, -10.0, -87.0, -103.0] + [-rng.uniform(0, 104) for _ in range(2_000)]:
        assert _exp_neg(d) == pytest.approx(math.exp(d), rel=2e-15, abs=1e-300)
    assert _exp_neg(-105.0) == 0.0 and _exp_neg(0.0) == 1.0
    table = log_table()
    for n in range(1, len(table)):
        assert abs(table[n] - (1 + math.log(n))) <= 2**-20 * (1 + math.log(n))  # within a float32 ulp
