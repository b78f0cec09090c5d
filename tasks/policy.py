"""Routing policy over recorded model answers: single, cascade, ensemble, moa.

Quality per task and model, and cost, are learned from records (`fit`); a strategy sees only the
answers of the models it chose to call and pays each one's recorded cost. Pure functions: the
evaluation command and, later, the live flow use the same code.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from connectors.replay import Record, ReplayProvider
from homeskillet.errors import InvalidRequest, NoRoute

STRATEGIES = ("single", "cascade", "ensemble", "moa")
CHEAP = 0.2  # a "cheap" model costs at most this share of the best model's mean cost


def normalise(task: str, text: str) -> str:
    """The task's answer normalisation: a choice letter for multiple choice, the code for code."""
    text = (text or "").strip()
    if task.startswith(("arc", "winogra")):
        letters = "AB12" if task.startswith("winogra") else "ABCD"
        match = re.search(rf"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])", text)
        if not match:
            return ""
        return {"1": "A", "2": "B"}.get(match.group(1), match.group(1))
    block = re.search(r"```(?:python)?\s*(.*?)```", text, re.DOTALL)
    return " ".join((block.group(1) if block else text).split())


def is_correct(record: Record, answer: str) -> bool:
    """Correct when equal, after normalisation, to the answer of a model the record marks correct."""
    return bool(answer) and any(
        ok and normalise(record.task, record.responses[m]) == answer for m, ok in record.correct.items()
    )


@dataclass(frozen=True)
class Stats:
    quality: dict[str, dict[str, float]]  # task → model → accuracy
    cost: dict[str, dict[str, float]]  # task → model → mean cost per query

    def best(self, task: str, models: list[str]) -> str:
        return max(models, key=lambda m: (self.quality[task][m], -self.cost[task][m]))

    def cheap(self, task: str, models: list[str]) -> list[str]:
        """Models costing at most CHEAP of the best model, best quality first."""
        limit = self.cost[task][self.best(task, models)] * CHEAP
        cheap = [m for m in models if self.cost[task][m] <= limit]
        return sorted(cheap, key=lambda m: (-self.quality[task][m], self.cost[task][m]))


def fit(records: list[Record]) -> Stats:
    quality: dict[str, dict[str, float]] = {}
    cost: dict[str, dict[str, float]] = {}
    for task in {r.task for r in records}:
        mine = [r for r in records if r.task == task]
        models = mine[0].responses.keys()
        quality[task] = {m: sum(r.correct[m] for r in mine) / len(mine) for m in models}
        cost[task] = {m: sum(r.cost[m] for r in mine) / len(mine) for m in models}
    return Stats(quality, cost)


@dataclass
class Decision:
    answer: str
    models: list[str] = field(default_factory=list)
    cost: float = 0.0
    confidence: float = 1.0
    why: str = ""


class _Caller:
    """Calls recorded models for one record, paying as it goes."""

    def __init__(self, provider: ReplayProvider, record: Record):
        self.provider, self.record, self.decision = provider, record, Decision("")

    def ask(self, model: str) -> str:
        text, cost = self.provider.answer(model, self.record.prompt)
        self.decision.models.append(model)
        self.decision.cost += cost
        return normalise(self.record.task, text)


def decide(strategy: str, record: Record, stats: Stats, provider: ReplayProvider, allowed: list[str]) -> Decision:
    task = record.task
    caller = _Caller(provider, record)
    best = stats.best(task, allowed)
    cheap = stats.cheap(task, allowed)
    closed = not task.startswith("mbpp")
    if strategy == "single":
        # the cheapest model within 90 % of the best model's quality
        good = [m for m in allowed if stats.quality[task][m] >= 0.9 * stats.quality[task][best]]
        model = min(good, key=lambda m: stats.cost[task][m])
        caller.decision.answer = caller.ask(model)
        caller.decision.why = f"{model}: quality {stats.quality[task][model]:.3f} at the lowest cost"
    elif strategy == "cascade":
        probes = cheap[:2] if closed else cheap[:1]
        answers = [caller.ask(m) for m in probes]
        agree = closed and len(answers) == 2 and answers[0] and answers[0] == answers[1]
        caller.decision.confidence = 1.0 if agree else 0.0
        if agree:
            caller.decision.answer = answers[0]
            caller.decision.why = f"{' and '.join(probes)} agree"
        else:
            caller.decision.answer = caller.ask(best)
            caller.decision.why = (f"escalated to {best}: " + ("probes disagree or gave no valid answer" if closed
                                   else "open answer, no agreement signal"))  # fmt: skip
    elif strategy in ("ensemble", "moa"):
        members = cheap[:3] or [best]
        answers = {m: caller.ask(m) for m in members}
        if strategy == "moa":  # proposers, then the aggregator has the last word
            caller.decision.answer = caller.ask(best)
            caller.decision.why = f"aggregator {best} after proposers {', '.join(members)}"
        elif closed:
            votes = Counter(a for a in answers.values() if a)
            top = votes.most_common(1)[0] if votes else ("", 0)
            caller.decision.answer = top[0] or answers[members[0]]
            caller.decision.confidence = top[1] / len(members)
            caller.decision.why = f"vote {top[1]}/{len(members)} of {', '.join(members)}"
        else:
            caller.decision.answer = answers[members[0]]  # open answers: the strongest member's
            caller.decision.why = f"open answer of the strongest member {members[0]}"
    else:
        raise InvalidRequest(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return caller.decision


@dataclass(frozen=True)
class Score:
    accuracy: float
    cost: float


def evaluate(
    records: list[Record], strategy: str, folds: int = 5, allowed: list[str] | None = None
) -> tuple[Score, list[Decision]]:
    """k-fold: fit on k-1 folds, decide on the held-out fold; accuracy and total cost over all."""
    if strategy not in STRATEGIES:
        raise InvalidRequest(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    models = sorted(records[0].responses)
    allowed = allowed or models
    unknown = [m for m in allowed if m not in models]
    if unknown:
        raise NoRoute(f"model(s) {unknown} have no recordings; recorded: {', '.join(models)}")
    provider = ReplayProvider(records)
    decisions: list[Decision | None] = [None] * len(records)
    for k in range(folds):
        train = [r for i, r in enumerate(records) if i % folds != k]
        stats = fit(train)
        for i in range(k, len(records), folds):
            decisions[i] = decide(strategy, records[i], stats, provider, allowed)
    correct = sum(is_correct(r, d.answer) for r, d in zip(records, decisions))
    return Score(correct / len(records), sum(d.cost for d in decisions)), decisions


def single_models(records: list[Record]) -> dict[str, Score]:
    return {
        m: Score(sum(is_correct(r, normalise(r.task, r.responses[m])) for r in records) / len(records),
                 sum(r.cost[m] for r in records))  # fmt: skip
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
