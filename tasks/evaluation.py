"""Offline evaluation of the routing strategies over recorded answers (RouterBench-style files):
learn the figures (`fit`), replay a strategy fold by fold (`evaluate`), and set its score beside
each single model's and the oracle's (`compare`; several files as one: `overall`). The strategies
themselves live in `tasks.strategies`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from connectors.recordings import Record, Recordings
from homeskillet.errors import InvalidRequest, NoRoute
from tasks.cascade import Outcomes, is_valid, learn_plan
from tasks.learned import Router
from tasks.learning import (
    Examples,
    Trained,
    aiq,
    apply,
    choices,
    examples,
    hull,
    merge,
    only,
    operating_points,
    outcome,
    single_points,
    sweep,
    train,
)
from tasks.strategies import Decision, Learned, Reply, Stats, check_strategy, decide, normalise

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


def replay(
    records: list[Record],
    indices: list[int],
    strategy: str,
    stats_of: Callable[[int], Stats],
    allowed: list[str],
    learned_of: Callable[[int], Learned | None] = lambda i: None,
) -> tuple[list[Decision], list[float]]:
    """Decide each indexed record under a strategy with the figures (and learned view) its index
    is given; every model asked answers with its recorded answer and costs its recorded cost."""
    provider = Recordings(records)
    decisions: list[Decision] = []
    costs: list[float] = []

    async def run() -> None:
        for i in indices:
            record = records[i]
            spent = 0.0

            async def ask(model: str, _prompt: str | None = None, _sampled: bool = False, record=record) -> Reply:
                nonlocal spent
                text, cost = provider.answer(model, record.prompt)
                spent += cost
                return Reply(text)

            decisions.append(
                await decide(strategy, record.task, record.prompt, stats_of(i), allowed, ask, learned_of(i))
            )
            costs.append(spent)

    asyncio.run(run())
    return decisions, costs


def view(
    router: Router, models: list[str], p: np.ndarray, est: np.ndarray, task: str, quality_cost: float | None
) -> Learned:
    """The learned router's view of one record from its predictions (p and est: one row)."""
    known = [j for j in range(len(models)) if not np.isnan(p[j])]
    return Learned(
        p={models[j]: float(p[j]) for j in known},
        cost={models[j]: float(est[j]) for j in known},
        quality_cost=router.quality_cost if quality_cost is None else quality_cost,
        explicit=quality_cost is not None,
        auto=router.auto.get(task),
    )


def evaluate(
    records: list[Record],
    strategy: str,
    folds: int = 5,
    allowed: list[str] | None = None,
    limit: int | None = None,
    budget_share: float = BUDGET,
    cache: Path | None = None,
    quality_cost: float | None = None,
    router: bool = True,
) -> tuple[Score, list[Decision]]:
    """k-fold: fit on k-1 folds, decide on the held-out fold; accuracy and total cost over the
    first `limit` records (all by default), each decided by the stats (and, for learned and auto,
    the router) of the folds without it. Without `router`, auto runs as it does where no trained
    router is present: from the per-task figures.

    Replay cannot show an aggregator the proposals (its recorded answer saw only the prompt), so
    `moa` here pays the proposers and returns the aggregator's recorded answer.
    """
    check_strategy(strategy)
    allowed = check_models(records, allowed)
    n = len(records[:limit])
    ex = examples(records, cache) if strategy == "learned" or (strategy == "auto" and router) else None
    stats_k = fold_fits(records, folds, budget_share, allowed)
    views: dict[int, Learned] = {}
    if ex is not None:
        for k in range(folds):
            rows = np.flatnonzero(np.arange(len(records)) % folds != k)
            router = train(records, stats_k[k], ex, rows, folds=folds).router
            held = np.arange(k, n, folds)
            p, est = only(ex, *apply(router.heads, ex, held), allowed)
            views.update(
                {
                    int(i): view(router, ex.models, p[r], est[r], records[i].task, quality_cost)
                    for r, i in enumerate(held)
                }
            )
    order = [i for k in range(folds) for i in range(k, n, folds)]
    decided, costs = replay(records, order, strategy, lambda i: stats_k[fold_of(i, folds)], allowed, views.get)
    decisions: list[Decision] = [Decision("")] * n
    for i, d in zip(order, decided):
        decisions[i] = d
    return score(records[:n], [d.answer for d in decisions], sum(costs)), decisions


LEARNING = ("learned", "auto")  # the strategies that use the learned router


@dataclass(frozen=True)
class HeldOut:
    """A strategy fitted on training records and replayed on test records: per test record its
    decision and cost; and, for the learned router, its predictions on the test records and what
    was chosen on the training records (`tasks.learning.Trained`)."""

    decisions: list[Decision]
    costs: list[float]
    examples: Examples | None = None
    p: np.ndarray | None = None
    est: np.ndarray | None = None
    trained: Trained | None = None


def evaluate_held_out(
    train_records: list[Record],
    test_records: list[Record],
    strategy: str,
    allowed: list[str] | None = None,
    budget_share: float = BUDGET,
    cache: Path | None = None,
    quality_cost: float | None = None,
) -> HeldOut:
    """Fit everything on the training records only (figures, cascades, the router, its λs), then
    decide every test record with it: nothing is chosen on the answers it is scored on."""
    check_strategy(strategy)
    allowed = check_models(train_records, allowed)
    stats = fit(train_records, budget_share, allowed)
    if strategy not in LEARNING:
        decided, costs = replay(test_records, list(range(len(test_records))), strategy, lambda i: stats, allowed)
        return HeldOut(decided, costs)
    both = train_records + test_records
    ex = examples(both, cache)
    trained = train(both, stats, ex, np.arange(len(train_records)))
    test_rows = np.arange(len(train_records), len(both))
    p, est = only(ex, *apply(trained.router.heads, ex, test_rows), allowed)
    views = [
        view(trained.router, ex.models, p[r], est[r], record.task, quality_cost)
        for r, record in enumerate(test_records)
    ]
    test_ex = ex.take(test_rows)
    decided, costs = replay(
        test_records, list(range(len(test_records))), strategy, lambda i: stats, allowed, views.__getitem__
    )
    return HeldOut(decided, costs, test_ex, p, est, trained)


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


def scope_report(
    records: list[Record],
    rows: list[int],
    held: HeldOut,
    operating: dict[str, float | None],
) -> dict:
    """What `eval-routing --train` reports for some test records (one file, or all pooled): the
    strategy's accuracy and cost, the best single model, the oracle, and for strategies that use
    the learned router its whole cost–accuracy curve over λ with its AIQ and the single models'
    hull AIQ, and the test figures of the operating points chosen on train."""
    mine = [records[i] for i in rows]
    strategy_score = score(mine, [held.decisions[i].answer for i in rows], sum(held.costs[i] for i in rows))
    singles = single_models(mine)
    best = best_single(singles)
    dearest = max(s.cost for s in singles.values())
    report = {
        "records": len(rows),
        "accuracy": strategy_score.accuracy,
        "cost": strategy_score.cost,
        "best_single": {"model": best, "accuracy": singles[best].accuracy, "cost": singles[best].cost},
        "oracle": asdict(oracle(mine)),
        "singles": {m: (s.cost, s.accuracy) for m, s in singles.items()},
        "singles_hull_aiq": aiq([(s.cost, s.accuracy) for s in singles.values()], dearest),
        "aiq": aiq([(strategy_score.cost, strategy_score.accuracy)], dearest),
        "curve": [],
        "operating_points": {},
    }
    if held.examples is not None:
        ex, index = held.examples, np.asarray(rows)
        curve = sweep(ex, index, held.p[index], held.est[index])
        report["curve"] = [asdict(pt) for pt in curve]
        report["curve_aiq"] = aiq([(pt.cost, pt.accuracy) for pt in curve], dearest)
        for name, lam in operating.items():
            if lam is None:
                report["operating_points"][name] = None
                continue
            accuracy, cost = outcome(ex, index, choices(held.p[index], held.est[index], lam))
            report["operating_points"][name] = {"quality_cost": lam, "accuracy": accuracy, "cost": cost}
    return report


def held_out_report(train_records: list[Record], test_files: dict[str, list[Record]], held: HeldOut) -> dict:
    """Per test file and pooled over them all (`scope_report`); the operating points are chosen on
    the training records' out-of-fold curve: the best accuracy at CHEAP_SHARE of the best single
    model's cost, and the cheapest point reaching the best single model's accuracy (None: never)."""
    records = [r for rs in test_files.values() for r in rs]
    operating: dict[str, float | None] = {}
    if held.trained is not None:
        trained = held.trained
        singles = single_points(trained.examples, np.arange(len(trained.p)))
        cheap, matching = operating_points(trained.curve, singles)
        operating = {"best_at_20pct_of_best_single": cheap, "cheapest_matching_best_single": matching}
    files, start = {}, 0
    for name, rs in test_files.items():
        files[name] = scope_report(records, list(range(start, start + len(rs))), held, operating)
        start += len(rs)
    return {
        "protocol": "held-out",
        "train_records": len(train_records),
        "quality_cost": held.trained.router.quality_cost if held.trained else None,
        "auto_quality_cost": held.trained.router.auto if held.trained else None,
        "files": files,
        "pooled": scope_report(records, list(range(len(records))), held, operating),
    }


def chart(report: dict, strategy: str, path: Path) -> Path:
    """One panel per test scope (pooled first, then each file): the strategy's point, its curve over
    λ when it has one, the single models and their hull, and the oracle; cost as a share of the
    dearest single model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = {"pooled": report["pooled"], **report["files"]}
    fig, axes = plt.subplots(1, len(scopes), figsize=(4.6 * len(scopes), 4.2), squeeze=False)
    for ax, (name, scope) in zip(axes[0], scopes.items()):
        dearest = max(scope["oracle"]["cost"], scope["best_single"]["cost"], 1e-12)
        singles = scope.get("singles") or {}
        dearest = max([dearest, *(c for c, _ in singles.values())])
        if singles:
            hull_points = hull(list(singles.values()))
            ax.plot(
                [x / dearest for x, _ in hull_points],
                [y for _, y in hull_points],
                color="grey",
                ls="--",
                label=f"single models' hull (AIQ {scope['singles_hull_aiq']:.3f})",
            )
            ax.scatter([c / dearest for c, _ in singles.values()], [a for _, a in singles.values()], color="grey", s=12)
        if scope["curve"]:
            ax.plot(
                [pt["cost"] / dearest for pt in scope["curve"]],
                [pt["accuracy"] for pt in scope["curve"]],
                color="#3b7dd8",
                label=f"learned router over λ (AIQ {scope['curve_aiq']:.3f})",
            )
        ax.scatter(
            [scope["cost"] / dearest],
            [scope["accuracy"]],
            color="#e0893a",
            s=50,
            zorder=3,
            label=f"{strategy} ({scope['accuracy']:.3f})",
        )
        ax.scatter(
            [scope["oracle"]["cost"] / dearest],
            [scope["oracle"]["accuracy"]],
            color="green",
            marker="*",
            s=80,
            label="oracle",
        )
        ax.set_title(f"{name} ({scope['records']} prompts)")
        ax.set_xlabel("cost (share of the dearest single model)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Cost–accuracy on held-out prompts: {strategy}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_router(records: list[Record], cache: Path | None = None, budget_share: float = BUDGET) -> Router:
    """The router for records of several files: one training per set of recorded models (files
    that record the same models train together), merged (`merge`)."""
    groups: dict[frozenset[str], list[Record]] = {}
    for r in records:
        groups.setdefault(frozenset(r.responses), []).append(r)
    routers = []
    for group in groups.values():
        files = sorted({r.source for r in group})
        trained = train(group, fit(group, budget_share), examples(group, cache), files=files)
        routers.append(trained.router)
    return routers[0] if len(routers) == 1 else merge(routers)
