"""Refitting the learned router from feedback (`tasks.refit`), on real sentence embeddings of short
prompts: a split that keeps each request on one side, for good; a refit that learns what the
feedback says and keeps the rest of the router; held-out scores; the publish decision; the
atomic write; the comparison table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from homeskillet.errors import InvalidRequest
from tasks.embedding import embed
from tasks.learned import Head, Router
from tasks.learning import Examples
from tasks.refit import (
    FEEDBACK_SHARE,
    comparison_markdown,
    decide_publish,
    feedback_weight,
    held_out_score,
    publish,
    refit,
    split,
)

SUMS = [f"What is {a} plus {b}?" for a, b in [(3, 4), (12, 9), (25, 17), (8, 30), (41, 2), (7, 7), (19, 23), (5, 60)]]
CODE = [
    f"Write a Python function that {t}."
    for t in [
        "reverses a list",
        "sorts a dictionary by value",
        "counts the vowels in a string",
        "checks whether a number is prime",
        "merges two sorted lists",
        "removes duplicates from a list",
        "flattens a nested list",
        "parses one line of CSV",
    ]
]


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    return dict(zip(SUMS + CODE, embed(SUMS + CODE)))


def base_router(models=("small", "big")) -> Router:
    """Every head at P(correct) = 0.5 everywhere (no weights, no bias)."""
    heads = {m: Head(np.zeros(385), (0.001 * (i + 1), 0.0), 100, 0.5) for i, m in enumerate(models)}
    return Router(heads, 0.25, {"math": (0.1, 0.02), "code": None}, {"files": ["x.csv"], "l2": 1000.0}, 0.9)


def rows_for(vectors, tenant="acme", model="small", sums_right=True, prefix="r") -> pd.DataFrame:
    """One row per prompt: the model right on the sums and wrong on the code (or the reverse)."""
    out = []
    for i, text in enumerate(SUMS + CODE):
        right = (text in SUMS) == sums_right
        out.append(
            dict(
                tenant=tenant,
                request_id=f"{prefix}{i}",
                fragment_id="f1",
                task_type="math" if text in SUMS else "code",
                model=model,
                embedding=vectors[text].astype(np.float32),
                score=1.0 if right else 0.0,
            )
        )
    return pd.DataFrame(out)


def test_split_keeps_each_request_on_one_side_whenever_it_is_split():
    rows = pd.DataFrame(
        {"request_id": [f"q{i // 3}" for i in range(300)], "fragment_id": [f"f{i % 3}" for i in range(300)]}
    )
    train, held = split(rows, 0.3)
    assert len(train) + len(held) == 300
    assert not set(train.request_id) & set(held.request_id)
    assert held.groupby("request_id").size().eq(3).all() and train.groupby("request_id").size().eq(3).all()
    assert 15 <= held.request_id.nunique() <= 45  # about 30 of the 100 requests
    again_train, again_held = split(rows.sample(frac=1, random_state=1), 0.3)  # any order, a later run
    assert set(again_held.request_id) == set(held.request_id)
    more = pd.concat([rows, pd.DataFrame({"request_id": ["new"], "fragment_id": ["f1"]})])
    assert set(split(more, 0.3)[1].request_id) - {"new"} == set(held.request_id)  # new requests move nobody
    assert set(split(rows, 0.3, seed=1)[1].request_id) != set(held.request_id)
    for share in (0, 1, -0.1, 1.5):
        with pytest.raises(InvalidRequest, match="held-out share"):
            split(rows, share)


def test_refit_learns_where_a_model_is_right_and_keeps_the_rest(vectors):
    base = base_router()
    new = refit(base, None, rows_for(vectors))
    sums = new.heads["small"].p_correct(np.stack([vectors[t] for t in SUMS]))
    code = new.heads["small"].p_correct(np.stack([vectors[t] for t in CODE]))
    assert sums.min() > 0.5 > code.max()
    assert new.heads["big"] is base.heads["big"]  # no feedback on it: its head as it was
    assert new.heads["small"].cost == base.heads["small"].cost  # feedback tells nothing of cost
    assert new.heads["small"].examples == 16 and new.heads["small"].accuracy == 0.5
    assert (new.quality_cost, new.auto, new.accept_confidence) == (base.quality_cost, base.auto, 0.9)
    assert new.trained_on["files"] == ["x.csv"]
    refitted = new.trained_on["feedback"]
    assert refitted["tenant"] == "acme" and refitted["rows"] == 16 and refitted["per_model"] == {"small": 16}
    assert refitted["weight"] == {"small": 1} and refitted["recorded"] is False and refitted["l2"] == 1000.0
    assert base.heads["small"].weights.any() == False  # noqa: E712 (the base router is not changed)


def test_refit_never_mixes_tenants(vectors):
    both = pd.concat([rows_for(vectors, "acme"), rows_for(vectors, "globex", sums_right=False)])
    with pytest.raises(InvalidRequest, match="2 tenants"):
        refit(base_router(), None, both)


def test_a_model_the_router_does_not_know_is_left_out(vectors):
    new = refit(base_router(), None, rows_for(vectors, model="stranger"))
    assert set(new.heads) == {"small", "big"}
    assert new.trained_on["feedback"]["unknown_models"] == ["stranger"]
    assert new.trained_on["feedback"]["rows"] == 0


def test_feedback_is_weighted_to_its_share_of_the_fit(vectors):
    assert feedback_weight(0, 5) == 1
    assert feedback_weight(100, 100) == 1
    assert feedback_weight(2000, 20) == 100
    assert feedback_weight(2001, 20) == 101
    w = feedback_weight(1234, 17)
    assert w * 17 >= FEEDBACK_SHARE * (w * 17 + 1234) and (w - 1) * 17 < FEEDBACK_SHARE * ((w - 1) * 17 + 1234)
    # recordings: 48 answers of `small`, right on every prompt; the feedback: wrong on the code
    texts = (SUMS + CODE) * 3
    recorded = Examples(
        x=np.stack([vectors[t] for t in texts]),
        models=["small", "other"],
        correct=np.column_stack([np.ones(len(texts)), np.full(len(texts), np.nan)]),
        cost=np.ones((len(texts), 2)),
        length=np.array([len(t) for t in texts], np.float64),
        task=np.array(["math"] * len(texts)),
        source=np.array(["x"] * len(texts)),
    )
    feedback = rows_for(vectors)
    new = refit(base_router(), recorded, feedback)
    assert new.trained_on["feedback"]["weight"] == {"small": 3}  # 16 rows count as 48 answers
    assert new.heads["small"].examples == 48 + 16
    code = np.stack([vectors[t] for t in CODE])
    unweighted = refit(base_router(), recorded, feedback, share=1e-9)
    assert unweighted.trained_on["feedback"]["weight"] == {"small": 1}
    # on code: 24 recorded right answers against 24 weighted wrong ones, or against only 8
    weighted_p, unweighted_p = (
        new.heads["small"].p_correct(code).mean(),
        unweighted.heads["small"].p_correct(code).mean(),
    )
    assert unweighted_p > weighted_p + 0.1


def test_held_out_score(vectors):
    rows = rows_for(vectors)
    stranger = rows_for(vectors, model="stranger").head(3)
    flat = held_out_score(base_router(), pd.concat([rows, stranger]))
    assert flat["rows"] == 16  # the stranger's rows are not the router's to score
    assert flat["log_loss"] == pytest.approx(math.log(2)) and flat["brier"] == pytest.approx(0.25)
    assert flat["accuracy"] == 0.5  # P = 0.5 counts as "right"; half the scores are
    learned = held_out_score(refit(base_router(), None, rows), rows)
    assert learned["log_loss"] < flat["log_loss"] and learned["brier"] < 0.25 and learned["accuracy"] == 1.0
    assert held_out_score(base_router(), rows.head(0)) == {"rows": 0, "log_loss": None, "brier": None, "accuracy": None}


def test_decide_publish():
    current = {"rows": 10, "log_loss": 0.69, "brier": 0.25, "accuracy": 0.5}
    better = current | {"log_loss": 0.5}
    assert decide_publish(current, better, 5) == (
        True,
        "held-out log-loss 0.5000 < 0.6900 (by more than 0.002) on 10 rows",
    )
    assert decide_publish(current, current, 5)[0] is False  # as good is not better
    assert decide_publish(current, current | {"log_loss": 0.6895}, 5)[0] is False  # within the margin
    assert decide_publish(current, current | {"log_loss": 0.9}, 5)[0] is False
    published, why = decide_publish(current, better, 11)
    assert published is False and why.startswith("10 held-out rows, fewer than 11")
    assert decide_publish(current, better | {"rows": 9}, 5)[0] is False
    nothing = {"rows": 0, "log_loss": None, "brier": None, "accuracy": None}
    assert decide_publish(nothing, nothing, 0) == (
        False,
        "0 held-out rows, fewer than 1: too few to tell the routers apart",
    )


def test_publish_replaces_the_file_whole(tmp_path, vectors):
    path = tmp_path / "routers" / "acme.json"
    publish(base_router(), path)
    new = refit(base_router(), None, rows_for(vectors))
    publish(new, path)
    loaded = Router.load(path)
    assert loaded.trained_on["feedback"]["tenant"] == "acme"
    assert np.allclose(loaded.heads["small"].weights, new.heads["small"].weights, atol=1e-5)
    assert [p.name for p in path.parent.iterdir()] == ["acme.json"]  # no temporary file left


def test_comparison_markdown(vectors):
    rows = rows_for(vectors)
    train, held = rows.iloc[::2], rows.iloc[1::2]
    current = base_router()
    new = refit(current, None, train)
    scores = {"current": held_out_score(current, held), "new": held_out_score(new, held), "train": len(train)}
    decision = decide_publish(scores["current"], scores["new"], 5)
    text = comparison_markdown("acme", current, new, scores, decision)
    assert "# learn-routing: acme" in text and "8 trained on, 8 held out" in text
    assert f"| log-loss | {scores['current']['log_loss']:.4f} | {scores['new']['log_loss']:.4f} | refitted |" in text
    assert "| Brier score | 0.2500 |" in text and "| accuracy | 0.5000 | 1.0000 | refitted |" in text
    assert "| small | 8 | 1 | 100 | 8 |" in text
    assert "**Published**: held-out log-loss" in text
    refused = comparison_markdown("acme", current, new, scores, (False, "too few"))
    assert "**Not published**: too few." in refused
