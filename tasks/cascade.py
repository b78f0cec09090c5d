"""Learned cascades (FrugalGPT's idea): which cheap models to ask, in which order, and how sure
their answers must be before the expensive model is skipped, chosen on training records.

A plan asks its probes one at a time and stops as soon as it can decide:
- `agreement` (closed answers: choices, numbers): accept once `need` probes gave the same
  answer; escalate once that can no longer happen;
- `validity` (code): accept the first probe whose answer is valid code (it parses and defines a
  function); escalate when none is.
Free text (chat, summaries, translations, short facts) has no such signal here, so a cascade
asks the best model straight away rather than pay for a probe it could not judge.
`learn_plan` tries every plan of up to three probes and keeps the most accurate one whose mean
cost on the training records stays within the budget. Pure functions over recorded answers.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations, permutations

MAX_PROBES = 3
MAX_CANDIDATES = 6  # probes are drawn from the best this many models under the budget
SIGNALS = {"multiple_choice": "agreement", "math": "agreement", "code": "validity"}


def signal_for(task: str) -> str | None:
    """The confidence signal a task type's answers give, if any."""
    return SIGNALS.get(task)


@dataclass(frozen=True)
class CascadePlan:
    probes: list[str]
    need: int  # agreeing answers needed to accept (agreement); 1 for validity
    signal: str  # "agreement" or "validity"
    escalate: str  # the model asked when the probes do not settle it

    def step(self, answers: list[str], valid: list[bool]) -> tuple[str, int | None]:
        """After the probes so far (normalised answers, validity): ("accept", index of the probe
        whose answer stands), ("escalate", None) or ("ask", None) for the next probe."""
        if self.signal == "validity":
            if valid[-1]:
                return "accept", len(answers) - 1
            return ("escalate", None) if len(answers) == len(self.probes) else ("ask", None)
        votes = Counter(a for a in answers if a)
        top, count = votes.most_common(1)[0] if votes else ("", 0)
        if count >= self.need:
            return "accept", answers.index(top)
        if count + len(self.probes) - len(answers) < self.need:
            return "escalate", None
        return "ask", None

    def models(self) -> set[str]:
        return {*self.probes, self.escalate}

    def describe(self) -> str:
        if self.signal == "validity":
            rule = "first valid answer"
        elif len(self.probes) == 1:
            rule = "its answer, if it gives one"
        else:
            rule = f"{self.need} of {len(self.probes)} agree"
        return f"probes {', '.join(self.probes)} ({rule}), else {self.escalate}"


def is_valid(task: str, normalised: str, raw: str) -> bool:
    """Does the answer have the form the task asks for? A choice or number must be found; code
    must parse and define a function; free text only has to be there."""
    if task != "code":
        return bool(normalised)
    block = re.search(r"```(?:python)?\s*(.*?)```", raw or "", re.DOTALL)
    try:
        tree = ast.parse(block.group(1) if block else raw or "")
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) for node in ast.walk(tree))


@dataclass(frozen=True)
class Outcomes:
    """One task's training records, per model: normalised answer, validity, correctness, cost."""

    answers: dict[str, list[str]]
    valid: dict[str, list[bool]]
    correct: dict[str, list[bool]]
    cost: dict[str, list[float]]


def simulate(plan: CascadePlan, data: Outcomes) -> tuple[float, float]:
    """Accuracy and mean cost of a plan over the records."""
    n = len(data.cost[plan.escalate])
    hits = 0
    spent = 0.0
    for i in range(n):
        answers: list[str] = []
        valid: list[bool] = []
        verdict, chosen = "ask", None
        for probe in plan.probes:
            answers.append(data.answers[probe][i])
            valid.append(data.valid[probe][i])
            spent += data.cost[probe][i]
            verdict, chosen = plan.step(answers, valid)
            if verdict != "ask":
                break
        if verdict == "accept":
            hits += data.correct[plan.probes[chosen]][i]
        else:
            spent += data.cost[plan.escalate][i]
            hits += data.correct[plan.escalate][i]
    return hits / n, spent / n


def candidate_plans(task: str, probes: list[str], escalate: str) -> list[CascadePlan]:
    signal = signal_for(task)
    plans = []
    for k in range(1, MAX_PROBES + 1):
        if signal == "agreement":  # the order matters only for early stops, so sets will do
            for group in combinations(probes, k):
                plans += [CascadePlan(list(group), need, signal, escalate) for need in range(1, k + 1)]
        elif signal == "validity":
            plans += [CascadePlan(list(group), 1, signal, escalate) for group in permutations(probes, k)]
    return plans


def default_plan(task: str, cheap: list[str], best: str) -> CascadePlan | None:
    """Without training records: the two best cheap models must agree on a closed answer; the
    best cheap model's code must be valid; otherwise the best model is asked at once (None)."""
    signal = signal_for(task)
    if signal == "agreement" and len(cheap) >= 2:
        return CascadePlan(cheap[:2], 2, signal, best)
    if signal == "validity" and cheap:
        return CascadePlan(cheap[:1], 1, signal, best)
    return None


def learn_plan(
    task: str, data: Outcomes, quality: dict[str, float], escalate: str, budget_usd: float
) -> CascadePlan | None:
    """The most accurate plan that escalates to `escalate` and whose mean cost is within
    budget_usd (the cheaper one on ties); None when no model is cheap enough to probe or the
    task's answers give no signal."""
    mean_cost = {m: sum(c) / len(c) for m, c in data.cost.items()}
    cheap = sorted((m for m in quality if m != escalate and mean_cost[m] <= budget_usd), key=lambda m: -quality[m])
    best: tuple[float, float, CascadePlan] | None = None
    for plan in candidate_plans(task, cheap[:MAX_CANDIDATES], escalate):
        accuracy, cost = simulate(plan, data)
        if cost <= budget_usd and (best is None or (accuracy, -cost) > (best[0], -best[1])):
            best = (accuracy, cost, plan)
    return None if best is None else best[2]
