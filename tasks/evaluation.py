"""Offline evaluation of the routing strategies over recorded answers (RouterBench-style files):
learn the figures (`fit`), replay a strategy fold by fold (`evaluate`), and set its score beside
each single model's and the oracle's (`compare`; several files as one: `overall`). The strategies
themselves live in `tasks.strategies`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from connectors.recordings import Record, Recordings
from homeskillet.errors import InvalidRequest, NoRoute
from tasks.cascade import Outcomes, is_valid, learn_plan
from tasks.strategies import Decision, Stats, check_strategy, decide, normalise

BUDGET = 0.25  # a learned cascade may cost at most this share of the best model's mean cost


def is_correct(record: Record, answer: str) -> bool:
    """Correct when equal, after normalisation, to the answer of a model the record marks correct."""
    return bool(answer) and any(
        ok and normalise(record.task, record.responses[m]) == answer for m, ok in record.correct.items()
    )


def fit(records: list[Record], budget_share: float = BUDGET, allowed: list[str] | None = None) -> Stats:
    """Quality and mean cost per task type and model, and per task type the cascade plan that is
    most accurate on these records within budget_share of the best model's mean cost."""
    if budget_share <= 0:
        raise InvalidRequest(f"budget share must be above 0 (a share of the best model's cost), not {budget_share}")
    stats = Stats({}, {})
    quality, cost, plans = stats.quality, stats.cost, stats.plans
    for task in {r.task for r in records}:
        mine = [r for r in records if r.task == task]
        models = [m for m in mine[0].responses if allowed is None or m in allowed]
        quality[task] = {m: sum(r.correct[m] for r in mine) / len(mine) for m in models}
        cost[task] = {m: sum(r.cost[m] for r in mine) / len(mine) for m in models}
        answers = {m: [normalise(task, r.responses[m]) for r in mine] for m in models}
        outcomes = Outcomes(
            answers=answers,
            valid={m: [is_valid(task, a, r.responses[m]) for a, r in zip(answers[m], mine)] for m in models},
            correct={m: [is_correct(r, a) for a, r in zip(answers[m], mine)] for m in models},
            cost={m: [r.cost[m] for r in mine] for m in models},
        )
        best = stats.best(task, models)
        plan = learn_plan(task, outcomes, quality[task], best, budget_share * cost[task][best])
        if plan is not None:
            plans[task] = plan
    return stats


@dataclass(frozen=True)
class Score:
    accuracy: float
    cost: float


def fold_of(index: int, folds: int) -> int:
    """Record i is held out in fold i mod k (files are in no meaningful order)."""
    return index % folds


def fold_fits(records: list[Record], folds: int, budget_share: float, allowed: list[str]) -> list[Stats]:
    """For each fold k, the stats fitted on the records of the other folds."""
    return [
        fit([r for i, r in enumerate(records) if fold_of(i, folds) != k], budget_share, allowed) for k in range(folds)
    ]


def check_models(records: list[Record], allowed: list[str] | None) -> list[str]:
    models = sorted(records[0].responses)
    unknown = [m for m in allowed or [] if m not in models]
    if unknown:
        raise NoRoute(f"model(s) {unknown} have no recordings; recorded: {', '.join(models)}")
    return list(allowed or models)


def score(records: list[Record], answers: list[str], cost: float) -> Score:
    correct = sum(is_correct(r, normalise(r.task, a)) for r, a in zip(records, answers))
    return Score(correct / len(records), cost)


def evaluate(
    records: list[Record],
    strategy: str,
    folds: int = 5,
    allowed: list[str] | None = None,
    limit: int | None = None,
    budget_share: float = BUDGET,
) -> tuple[Score, list[Decision]]:
    """k-fold: fit on k-1 folds, decide on the held-out fold; accuracy and total cost over the
    first `limit` records (all by default), each decided by the stats of the folds without it.

    Replay cannot show an aggregator the proposals (its recorded answer saw only the prompt), so
    `moa` here pays the proposers and returns the aggregator's recorded answer.
    """
    check_strategy(strategy)
    allowed = check_models(records, allowed)
    provider = Recordings(records)
    n = len(records[:limit])
    decisions: list[Decision] = [Decision("")] * n
    total_cost = 0.0

    async def run() -> None:
        nonlocal total_cost
        for k, stats in enumerate(fold_fits(records, folds, budget_share, allowed)):
            for i in range(k, n, folds):
                record = records[i]

                async def ask(model: str, _prompt: str | None = None, record: Record = record) -> str:
                    nonlocal total_cost
                    text, cost = provider.answer(model, record.prompt)
                    total_cost += cost
                    return text

                decisions[i] = await decide(strategy, record.task, record.prompt, stats, allowed, ask)

    asyncio.run(run())
    return score(records[:n], [d.answer for d in decisions], total_cost), decisions


def combine(parts: list[tuple[int, Score]]) -> Score:
    """Scores of several files as one: accuracy weighted by their records, costs added."""
    total = sum(n for n, _ in parts)
    return Score(sum(n * s.accuracy for n, s in parts) / total, sum(s.cost for _, s in parts))


def single_models(records: list[Record]) -> dict[str, Score]:
    return {
        m: score(records, [r.responses[m] for r in records], sum(r.cost[m] for r in records))
        for m in sorted(records[0].responses)
    }


def oracle(records: list[Record]) -> Score:
    """The cheapest correct model per record (the cheapest model when none is correct)."""
    cost = 0.0
    hits = 0
    for r in records:
        right = [m for m, ok in r.correct.items() if ok]
        hits += bool(right)
        cost += min(r.cost[m] for m in (right or r.cost))
    return Score(hits / len(records), cost)


def best_single(singles: dict[str, Score]) -> str | None:
    """The most accurate single model, the cheaper of two as accurate; None when there is none."""
    return max(singles, key=lambda m: (singles[m].accuracy, -singles[m].cost), default=None)


@dataclass(frozen=True)
class Comparison:
    """A strategy's score on some records beside every single model's and the oracle's there."""

    records: int
    score: Score
    singles: dict[str, Score]
    best: str | None  # the best single model (`best_single`)
    oracle: Score


def compare(records: list[Record], score: Score, limit: int | None = None) -> Comparison:
    """`score`, what a strategy scored on the first `limit` records (all by default), beside every
    single model and the oracle on those same records."""
    decided = records[:limit]
    singles = single_models(decided)
    return Comparison(len(decided), score, singles, best_single(singles), oracle(decided))


def overall(parts: list[Comparison]) -> Comparison:
    """Comparisons on several files as one (`combine`); single models only where every file
    recorded them."""
    shared = sorted(set.intersection(*(set(p.singles) for p in parts)))
    singles = {m: combine([(p.records, p.singles[m]) for p in parts]) for m in shared}
    return Comparison(
        sum(p.records for p in parts),
        combine([(p.records, p.score) for p in parts]),
        singles,
        best_single(singles),
        combine([(p.records, p.oracle) for p in parts]),
    )
