"""The routing strategies: for one fragment, which models to ask and whose answer stands.

single, cascade, ensemble, moa, and auto (a strategy picked per fragment from the figures).
`decide` is the same code for live fragments (`tasks.routing.route`) and for replays of
recorded answers (`tasks.evaluation`); it sees only the answers of the models it chose to ask.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from homeskillet.errors import InvalidRequest, NoRoute
from tasks.cascade import CascadePlan, default_plan, is_valid, signal_for

STRATEGIES = ("single", "cascade", "ensemble", "moa", "auto")
CHEAP = 0.2  # a "cheap" model costs at most this share of the best model's mean cost


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
            raise NoRoute(
                f"the routing stats have no figures for task type {task!r}; they cover "
                f"{', '.join(sorted(self.quality))}"
            )
        known = [m for m in models if m in self.quality[task] and m in self.cost[task]]
        if not known:
            raise NoRoute(f"no allowed model has routing figures for {task!r}: allowed {', '.join(models)}")
        plan = self.plans.get(task)
        plans = {task: plan} if plan and plan.models() <= set(known) else {}
        return Stats(
            {task: {m: self.quality[task][m] for m in known}},
            {task: {m: self.cost[task][m] for m in known}},
            self.cheap_share,
            plans,
        )


@dataclass
class Decision:
    answer: str  # the chosen model's own text
    models: list[str] = field(default_factory=list)
    strategy: str = ""  # the strategy that ran (what "auto" picked)
    confidence: float | None = None
    why: str = ""


# ask(model, prompt) → that model's raw answer; prompt None means the fragment's own prompt. The
# caller pays: replayed answers their recorded cost, live ones their GPU share.
Ask = Callable[[str, "str | None"], Awaitable[str]]


async def decide(strategy: str, task: str, prompt: str, stats: Stats, allowed: list[str], ask: Ask) -> Decision:
    """One fragment under a strategy; the same code replays RouterBench and runs live fragments."""
    check_strategy(strategy)
    auto_why = ""
    if strategy == "auto":
        strategy, auto_why = choose_strategy(task, stats, allowed)
    best = stats.best(task, allowed)
    cheap = stats.cheap(task, allowed)
    closed = signal_for(task) == "agreement"  # answers that can be compared, so votes mean something
    decision = Decision("")

    async def call(model: str, text: str | None = None) -> tuple[str, str]:
        raw = await ask(model, text)
        decision.models.append(model)
        return raw, normalise(task, raw)

    if strategy == "single":
        model = single_model(task, stats, allowed)
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
        aggregate = (
            f"{prompt}\n\nCandidate answers from other models:\n{listing}\n\nUsing them, give the single best answer."
        )
        decision.answer, _ = await call(best, aggregate)
        decision.why = f"aggregator {best} over proposers {', '.join(proposers)}"
    decision.strategy = strategy
    if auto_why:
        decision.why = f"auto chose {strategy} ({auto_why}); {decision.why}"
    return decision


def single_model(task: str, stats: Stats, allowed: list[str]) -> str:
    """The single strategy's model: the cheapest within 90 % of the best model's quality."""
    best = stats.best(task, allowed)
    good = [m for m in allowed if stats.quality[task][m] >= 0.9 * stats.quality[task][best]]
    return min(good, key=lambda m: stats.cost[task][m])


def choose_strategy(task: str, stats: Stats, allowed: list[str]) -> tuple[str, str]:
    """What "auto" runs for a fragment of this task type, and why: the cascade its figures learned
    (the plan most accurate within budget on recorded answers), else a default cascade where
    answers are closed (cheap models agreeing is a signal), else the single best-value model
    (free text: no signal tells a cheap answer good)."""
    learned = stats.plans.get(task)
    if learned is not None and learned.models() <= set(allowed):
        return "cascade", f"a cascade learned for {task}: {learned.describe()}"
    if signal_for(task) != "agreement":
        return "single", f"no learned cascade, and {task} answers cannot be compared for agreement"
    if default_plan(task, stats.cheap(task, allowed), stats.best(task, allowed)) is None:
        return "single", f"{task} answers are closed, but fewer than two cheaper models could agree"
    return "cascade", f"{task} answers are closed: cheap models that agree need no stronger one"


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


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise InvalidRequest(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
