"""Training and scoring the learned router on recorded answers (`tasks.learning`, and the held-out
protocol of `tasks.evaluation`): the hull and its AIQ, operating points, a router that learns which
cheap model is right on which kind of prompt, auto that never loses to single, and on RouterBench
itself an honest split on which auto is no worse than single on code."""

from pathlib import Path

import numpy as np
import pytest

from connectors.recordings import Record, load
from homeskillet.settings import RECORDINGS as ROUTERBENCH
from tasks.evaluation import evaluate, evaluate_held_out, held_out_report, score
from tasks.learning import Point, aiq, hull, operating_points

CHEMISTRY = ["water", "ethanol", "acetone", "mercury", "benzene", "glycerol", "methanol", "ammonia", "iodine", "sulfur"]
SPORT = ["football", "tennis", "cricket", "rugby", "hockey", "baseball", "basketball", "golf", "curling", "handball"]


def kinds(n: int = 60) -> list[Record]:
    """Chemistry questions that cheap-a gets right, sport questions that cheap-b gets right; big
    gets everything right at ten times the price."""
    records = []
    for i in range(n):
        chemistry = i % 2 == 0
        word = (CHEMISTRY if chemistry else SPORT)[(i // 2) % 10]
        prompt = (
            f"At what temperature does {word} boil at sea level? ({i})"
            if chemistry
            else f"Which team won the {word} championship final in {1950 + i}?"
        )
        right = {"cheap-a": chemistry, "cheap-b": not chemistry, "big": True}
        records.append(
            Record(
                task="factual_qa",
                source="kinds",
                sample_id=str(i),
                prompt=prompt,
                responses={m: "right" if ok else "wrong" for m, ok in right.items()},
                correct=right,
                cost={"cheap-a": 1.0, "cheap-b": 1.0, "big": 10.0},
            )
        )
    return records


def test_the_hull_starts_at_abstaining_and_aiq_is_its_mean_accuracy():
    assert hull([(1.0, 0.5), (2.0, 0.6), (4.0, 0.9), (5.0, 0.8)]) == [(0.0, 0.0), (1.0, 0.5), (4.0, 0.9)]
    # one point (c, a): a rising line from (0, 0), then flat: a·(1 − c/2C) over [0, C]
    assert aiq([(2.0, 0.8)], 4.0) == pytest.approx(0.8 * (1 - 2 / 8), abs=1e-4)
    assert aiq([(0.0, 0.7)], 1.0) == pytest.approx(0.7, abs=1e-3)


def test_operating_points_are_chosen_on_the_curve():
    curve = [Point(0.0, 0.9, 10.0), Point(0.1, 0.85, 3.0), Point(0.3, 0.8, 1.5), Point(1.0, 0.5, 0.5)]
    singles = {"big": (10.0, 0.88), "small": (1.0, 0.5)}
    cheap, matching = operating_points(curve, singles)
    assert cheap == 0.3  # the best accuracy at most 20 % of big's cost (2.0)
    assert matching == 0.0  # the cheapest point at least as accurate as big
    assert operating_points(curve[1:], singles)[1] is None  # never reaches it


def test_the_learned_router_sends_each_kind_of_prompt_to_the_cheap_model_that_gets_it_right(tmp_path):
    records = kinds()
    learned, decisions = evaluate(records, "learned", folds=5, cache=tmp_path)
    single, _ = evaluate(records, "single", folds=5)
    assert learned.accuracy >= 0.95 and learned.cost <= 1.2 * len(records)  # the right cheap model, mostly
    assert single.cost == 10.0 * len(records) or single.accuracy <= 0.55  # big, or half right
    chosen = {("boil" in records[i].prompt, d.models[0]) for i, d in enumerate(decisions)}
    assert (True, "cheap-a") in chosen and (False, "cheap-b") in chosen
    assert all(d.strategy == "learned" and "P=" in d.why and "λ=" in d.why for d in decisions)
    # held out: trained on half, scored on the other half, with the whole curve and its AIQ
    train = [r for i, r in enumerate(records) if i % 4 < 2]  # both kinds on both sides
    test = [r for i, r in enumerate(records) if i % 4 >= 2]
    held = evaluate_held_out(train, test, "learned", cache=tmp_path)
    report = held_out_report(train, {"kinds": test}, held)
    pooled = report["pooled"]
    assert pooled["curve_aiq"] > pooled["singles_hull_aiq"]
    assert pooled["accuracy"] >= 0.9 and report["files"]["kinds"]["records"] == 30


def test_auto_routes_with_the_router_only_where_it_beats_single(tmp_path):
    records = kinds()
    auto, decisions = evaluate(records, "auto", folds=5, cache=tmp_path)
    single, _ = evaluate(records, "single", folds=5)
    assert auto.accuracy >= single.accuracy and auto.cost <= single.cost
    assert all("auto chose" in d.why for d in decisions)


@pytest.mark.slow
def test_on_routerbench_held_out_auto_is_never_a_point_below_single_and_costs_no_more(tmp_path_factory):
    """Even halves of each file train, odd halves test; code is the case a per-task cascade lost."""
    cache = Path(tmp_path_factory.getbasetemp()) / "embeddings"
    files = {f: load(ROUTERBENCH / f"{f}_train.csv") for f in ("arc_challenge", "mbpp", "winograde")}
    train = [r for rs in files.values() for r in rs[::2]]
    tests = {f: rs[1::2] for f, rs in files.items()}
    test = [r for rs in tests.values() for r in rs]
    results = {s: evaluate_held_out(train, test, s, cache=cache) for s in ("single", "auto")}
    start = 0
    for name, rs in tests.items():
        part = slice(start, start + len(rs))
        start += len(rs)
        figures = {
            s: score(rs, [d.answer for d in h.decisions[part]], float(np.sum(h.costs[part])))
            for s, h in results.items()
        }
        assert figures["auto"].accuracy >= figures["single"].accuracy - 0.01, name
        assert figures["auto"].cost <= figures["single"].cost + 1e-9, name


def test_merged_routers_keep_every_head_and_the_most_cautious_auto():
    from tasks.learned import Head, Router
    from tasks.learning import merge

    head = Head(np.zeros(385), (0.0, 0.0), 1, 0.5)
    remote = Router({"big": head}, 0.1, {"code": (0.2, 0.05), "multiple_choice": (0.1, 0.0)}, {"records": 100})
    local = Router({"small": head}, 0.3, {"multiple_choice": (0.1, 0.2)}, {}, 0.8)
    merged = merge([remote, local])
    assert set(merged.heads) == {"big", "small"} and merged.quality_cost == 0.1
    assert merged.auto == {"code": None, "multiple_choice": (0.1, 0.2)}  # code never seen locally: single
    assert merged.accept_confidence == 0.8
