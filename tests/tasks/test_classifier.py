"""The request classifier: deterministic features, committed weights, reproducible training."""

import pytest

from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tasks.classifier import WEIGHTS, Classifier, cross_validate, features, train, training_examples


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
