"""Routing policy over recorded model answers: single, cascade, ensemble, moa.

Quality per task and model, and cost, are learned from records (`fit`); a strategy sees only the
answers of the models it chose to call and pays each one's recorded cost. Pure functions: the
evaluation command and, later, the live flow use the same code.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from connectors.replay import Record, ReplayProvider
from homeskillet.errors import InvalidRequest, NoRoute
from tasks.cascade import CascadePlan, Outcomes, default_plan, is_valid, learn_plan, signal_for

STRATEGIES = ("single", "cascade", "ensemble", "moa")
CHEAP = 0.2  # a "cheap" model costs at most this share of the best model's mean cost
BUDGET = 0.25  # a learned cascade may cost at most this share of the best model's mean cost


def normalise(task: str, text: str) -> str:
    """The task type's answer normalisation: the choice letter for multiple choice (options 1-4
    count as A-D), the last number for math, the code block (or the text) with whitespace
    collapsed for anything else."""
    text = (text or "").strip()
    if task == "math":
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        return numbers[-1] if numbers else ""
    if task == "multiple_choice":
        match = re.search(r"(?<![A-Za-z0-9])([ABCD1234])(?![A-Za-z0-9])", text)
        if not match:
            return ""
        return {"1": "A", "2": "B", "3": "C", "4": "D"}.get(match.group(1), match.group(1))
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
    cheap_share: float = CHEAP  # "cheap" means at most this share of the best model's cost
    plans: dict[str, CascadePlan] = field(default_factory=dict)  # task → learned cascade

    def best(self, task: str, models: list[str]) -> str:
        return max(models, key=lambda m: (self.quality[task][m], -self.cost[task][m]))

    def cheap(self, task: str, models: list[str]) -> list[str]:
        """Models costing at most cheap_share of the best model, best quality first."""
        best = self.best(task, models)
        limit = self.cost[task][best] * self.cheap_share
        cheap = [m for m in models if m != best and self.cost[task][m] <= limit]
        return sorted(cheap, key=lambda m: (-self.quality[task][m], self.cost[task][m]))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Stats:
        """Stats written by `save`; a clear error for a file that is not one."""
        try:
            data = json.loads(Path(path).read_text())
            plans = {task: CascadePlan(**plan) for task, plan in (data.get("plans") or {}).items()}
            return cls(data["quality"], data["cost"], float(data.get("cheap_share", CHEAP)), plans)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest(f"{path}: not a routing-stats file ({type(exc).__name__}: {exc})") from None

    def only(self, task: str, models: list[str]) -> Stats:
        """These stats restricted to one task and the given models (those it has figures for)."""
        if task not in self.quality:
            raise NoRoute(f"the routing stats have no figures for task type {task!r}; they cover "
                          f"{', '.join(sorted(self.quality))}")  # fmt: skip
        known = [m for m in models if m in self.quality[task] and m in self.cost[task]]
        if not known:
            raise NoRoute(f"no allowed model has routing figures for {task!r}: allowed {', '.join(models)}")
        plan = self.plans.get(task)
        plans = {task: plan} if plan and plan.models() <= set(known) else {}
        return Stats({task: {m: self.quality[task][m] for m in known}}, {task: {m: self.cost[task][m] for m in known}},
                     self.cheap_share, plans)  # fmt: skip


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


@dataclass
class Decision:
    answer: str  # the chosen model's own text
    models: list[str] = field(default_factory=list)
    confidence: float | None = None
    why: str = ""


# ask(model, prompt) → that model's raw answer; prompt None means the fragment's own prompt. The
# caller pays: replayed answers their recorded cost, live ones their GPU share.
Ask = Callable[[str, "str | None"], Awaitable[str]]


async def decide(
    strategy: str, task: str, prompt: str, stats: Stats, allowed: list[str], ask: Ask
) -> Decision:
    """One fragment under a strategy; the same code replays RouterBench and runs live fragments."""
    check_strategy(strategy)
    best = stats.best(task, allowed)
    cheap = stats.cheap(task, allowed)
    closed = signal_for(task) == "agreement"  # answers that can be compared, so votes mean something
    decision = Decision("")

    async def call(model: str, text: str | None = None) -> tuple[str, str]:
        raw = await ask(model, text)
        decision.models.append(model)
        return raw, normalise(task, raw)

    if strategy == "single":
        # the cheapest model within 90 % of the best model's quality
        good = [m for m in allowed if stats.quality[task][m] >= 0.9 * stats.quality[task][best]]
        model = min(good, key=lambda m: stats.cost[task][m])
        decision.answer, _ = await call(model)
        decision.why = f"{model}: quality {stats.quality[task][model]:.3f} at the lowest cost"
    elif strategy == "cascade":
        learned = stats.plans.get(task)
        plan = learned if learned and learned.models() <= set(allowed) else None
        plan = plan or default_plan(task, cheap, best)
        if plan is None:
            decision.answer, _ = await call(best)
            decision.why = f"asked {best} at once: no two cheap models to compare, or no signal for {task} answers"
        else:
            await cascade(plan, task, call, decision, learned=plan is learned)
    elif strategy == "ensemble":
        members = cheap[:3] or [best]
        answers = {m: await call(m) for m in members}
        if closed:
            votes = Counter(norm for _, norm in answers.values() if norm)
            winner, count = votes.most_common(1)[0] if votes else ("", 0)
            decision.answer = next((raw for raw, norm in answers.values() if norm == winner), answers[members[0]][0])
            decision.confidence = count / len(members)
            decision.why = f"vote {count}/{len(members)} of {', '.join(members)}"
        else:
            decision.answer = answers[members[0]][0]
            decision.why = f"open answer of the strongest member {members[0]}"
    else:  # moa: proposers, then an aggregator that sees their answers
        proposers = cheap[:3] or [best]
        proposals = [await call(m) for m in proposers]
        listing = "\n".join(f"{i}. {raw.strip()}" for i, (raw, _) in enumerate(proposals, start=1))
        aggregate = (f"{prompt}\n\nCandidate answers from other models:\n{listing}\n\n"
                     "Using them, give the single best answer.")  # fmt: skip
        decision.answer, _ = await call(best, aggregate)
        decision.why = f"aggregator {best} over proposers {', '.join(proposers)}"
    return decision


async def cascade(
    plan: CascadePlan, task: str, call: Callable[[str], Awaitable[tuple[str, str]]], decision: Decision, learned: bool
) -> None:
    """Ask the plan's probes until it can decide; accept a probe's answer or escalate."""
    raws: list[str] = []
    answers: list[str] = []
    valid: list[bool] = []
    verdict, chosen = "ask", None
    for probe in plan.probes:
        raw, answer = await call(probe)
        raws.append(raw)
        answers.append(answer)
        valid.append(is_valid(task, answer, raw))
        verdict, chosen = plan.step(answers, valid)
        if verdict != "ask":
            break
    source = "learned" if learned else "default"
    if verdict == "accept":
        decision.answer = raws[chosen]
        if plan.signal == "agreement":
            agreeing = answers.count(answers[chosen])
            decision.confidence = agreeing / len(answers)
            decision.why = f"{source} cascade: {agreeing} of {len(answers)} probes agree on {answers[chosen]!r}"
        else:
            decision.confidence = 1.0
            decision.why = f"{source} cascade: {plan.probes[chosen]} gave valid {task}"
        return
    decision.confidence = 0.0
    decision.answer, _ = await call(plan.escalate)
    reason = "the probes do not agree" if plan.signal == "agreement" else f"no probe gave valid {task}"
    decision.why = f"{source} cascade escalated to {plan.escalate}: {reason} ({plan.describe()})"


@dataclass(frozen=True)
class Score:
    accuracy: float
    cost: float


def fold_of(index: int, folds: int) -> int:
    """Record i is held out in fold i mod k (files are in no meaningful order)."""
    return index % folds


def fold_fits(records: list[Record], folds: int, budget_share: float, allowed: list[str]) -> list[Stats]:
    """For each fold k, the stats fitted on the records of the other folds."""
    return [fit([r for i, r in enumerate(records) if fold_of(i, folds) != k], budget_share, allowed)
            for k in range(folds)]  # fmt: skip


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise InvalidRequest(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


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
    provider = ReplayProvider(records)
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
