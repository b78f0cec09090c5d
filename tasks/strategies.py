"""The routing strategies: for one fragment, which models to ask and whose answer stands.

single, cascade, ensemble, moa, learned (the model a learned router favours for this prompt,
`tasks.learned`), and auto (a strategy picked per fragment: with a trained router, the router
where it beat single on held-out records, else single; without one, from the per-task figures).
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
from tasks.learned import Choice, choose

STRATEGIES = ("single", "cascade", "ensemble", "moa", "auto", "learned")
CHEAP = 0.2  # a "cheap" model costs at most this share of the best model's mean cost
SAMPLE_TEMPERATURE = 0.8  # a cascade's extra samples of its first probe (self-consistency)


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
    learned: Choice | None = None  # the learned router's choice, when it made one
    p_correct: dict[str, float] | None = None  # the learned router's P(correct) of its top candidates


@dataclass(frozen=True)
class Reply:
    """A model's answer to one call: its text, and its own probability of that answer from its
    token log-probabilities when the provider gave them (`tasks.confidence`)."""

    text: str
    confidence: float | None = None


# ask(model, prompt, sampled) → that model's reply; prompt None means the fragment's own prompt;
# sampled asks for a sample at SAMPLE_TEMPERATURE rather than the request's own decoding. The
# caller pays: replayed answers their recorded cost, live ones their GPU share.
Ask = Callable[[str, "str | None", bool], Awaitable[Reply]]


@dataclass(frozen=True)
class Learned:
    """What a learned router says of one fragment: P(correct) of each model it knows, every
    candidate's estimated cost, the trade-off λ to route at (`explicit`: the request's or the
    covenant's, which auto honours too), and the λ auto uses for this task type (None: the
    router did not hold its own against single there, held out)."""

    p: dict[str, float]
    cost: dict[str, float]
    quality_cost: float
    explicit: bool = False
    auto: tuple[float, float] | None = None  # (λ, margin of single's model)

    def choose(
        self, candidates: list[str], quality_cost: float, prefer: str | None = None, margin: float = 0.0
    ) -> Choice:
        known = [m for m in candidates if m in self.p]
        if not known:
            raise NoRoute(f"the learned router knows none of the allowed models ({', '.join(candidates)})")
        return choose({m: self.p[m] for m in known}, {m: self.cost[m] for m in known}, quality_cost, prefer, margin)


def learned_route(task: str, stats: Stats, allowed: list[str], learned: Learned | None) -> tuple[Choice | None, str]:
    """What "auto" does with a learned router: its choice, or None and why single runs instead.
    Unless the request or covenant sets the trade-off, auto routes as chosen for the task type on
    held-out records: among the models no dearer than single's, at that λ, and away from single's
    model only when another is that margin likelier to be right; so it does not pay more than
    single, and leaves single's answer only where the router has shown it gains."""
    if learned.explicit:
        return learned.choose(allowed, learned.quality_cost), "the request's quality/cost trade-off"
    if learned.auto is None:
        odds = ", ".join(f"{m} P={q:.2f}" for m, q in sorted(learned.p.items(), key=lambda kv: -kv[1])[:3])
        return None, f"the learned router ({odds}) did not beat single on {task} held out"
    single = single_model(task, stats, allowed)
    capped = [m for m in allowed if stats.cost[task][m] <= stats.cost[task][single] and m in learned.p]
    if single not in learned.p or len(capped) < 2:
        return None, f"the learned router knows too few of the models no dearer than {single} ({', '.join(capped)})"
    lam, margin = learned.auto
    why = f"it beat single on {task} held out; no dearer than {single}, leaving it at a margin of {margin:g}"
    return learned.choose(capped, lam, single, margin), why


async def decide(
    strategy: str,
    task: str,
    prompt: str,
    stats: Stats,
    allowed: list[str],
    ask: Ask,
    learned: Learned | None = None,
    accept_confidence: float | None = None,
    samples: int = 1,
) -> Decision:
    """One fragment under a strategy; the same code replays RouterBench and runs live fragments.
    `learned` is the learned router's view of the fragment (required by "learned"; "auto" uses it
    when it knows two or more allowed models). A cascade accepts its first probe's answer when
    the model's own confidence in it reaches `accept_confidence`, or, with `samples` > 1, when
    most of that many samples agree with it."""
    check_strategy(strategy)
    auto_why = ""
    choice: Choice | None = None
    if strategy == "learned" and learned is None:
        raise NoRoute("the learned strategy needs a trained router (`homeskillet learn-routing --router`)")
    if strategy == "auto":
        if learned is not None and sum(m in learned.p for m in allowed) >= 2:
            choice, auto_why = learned_route(task, stats, allowed, learned)
            strategy = "learned" if choice else "single"
        else:
            strategy, auto_why = choose_strategy(task, stats, allowed)
    elif strategy == "learned":
        choice = learned.choose(allowed, learned.quality_cost)
    best = stats.best(task, allowed)
    cheap = stats.cheap(task, allowed)
    closed = signal_for(task) == "agreement"  # answers that can be compared, so votes mean something
    decision = Decision("", learned=choice)
    if learned is not None:
        decision.p_correct = dict(sorted(learned.p.items(), key=lambda kv: -kv[1])[:3])

    async def call(model: str, text: str | None = None, sampled: bool = False) -> tuple[str, str]:
        reply = await ask(model, text, sampled)
        decision.models.append(model)
        if not sampled:
            replies.append(reply)
        return reply.text, normalise(task, reply.text)

    replies: list[Reply] = []
    if strategy == "learned":
        decision.answer, _ = await call(choice.model)
        decision.why = choice.why
    elif strategy == "single":
        model = single_model(task, stats, allowed)
        decision.answer, _ = await call(model)
        decision.why = f"{model}: quality {stats.quality[task][model]:.3f} at the lowest cost"
    elif strategy == "cascade":
        learned = stats.plans.get(task)
        plan = learned if learned and learned.models() <= set(allowed) else None
        plan = plan or default_plan(task, cheap, best)
        if plan is None and cheap and (samples > 1 or accept_confidence is not None):
            plan = CascadePlan(cheap[:1], 1, "agreement", best)  # one probe: its live signal decides
        if plan is None:
            decision.answer, _ = await call(best)
            decision.why = f"asked {best} at once: no two cheap models to compare, or no signal for {task} answers"
        else:
            await cascade(plan, task, call, decision, plan is learned, replies, accept_confidence, samples)
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
    plan: CascadePlan,
    task: str,
    call: Callable[..., Awaitable[tuple[str, str]]],
    decision: Decision,
    learned: bool,
    replies: list[Reply],
    accept_confidence: float | None = None,
    samples: int = 1,
) -> None:
    """Ask the plan's probes until it can decide; accept a probe's answer or escalate. A live
    signal on the first probe's answer decides at once: its own confidence (when the model gave
    one and a threshold is set), or its agreement with samples of the same model."""
    source = "learned" if learned else "default"
    first = plan.probes[0]
    if samples > 1 or accept_confidence is not None:
        raw, answer = await call(first)
        own = replies[-1].confidence
        if samples > 1:
            others = [(await call(first, None, True))[1] for _ in range(samples - 1)]
            agreeing = 1 + sum(a == answer for a in others)
            decision.confidence = agreeing / samples
            accepted = bool(answer) and agreeing * 2 > samples
            evidence = f"{agreeing} of {samples} samples of {first} agree on {answer!r}"
        elif own is not None:
            decision.confidence = own
            accepted = own >= accept_confidence
            evidence = f"{first} is {own:.2f} sure of its answer (accepts at {accept_confidence:.2f})"
        elif not learned and len(plan.probes) == 1 and plan.signal == "agreement":
            accepted, evidence = False, f"{first} gave no confidence to judge its answer by"
        else:
            accepted = None  # no live signal: the plan's own rule decides, from this first answer
        if accepted is not None:
            if accepted:
                decision.answer = raw
                decision.why = f"{source} cascade: {evidence}"
            else:
                decision.answer, _ = await call(plan.escalate)
                decision.why = f"{source} cascade escalated to {plan.escalate}: {evidence}"
            return
        prior = [(raw, answer)]
    else:
        prior = []
    raws: list[str] = []
    answers: list[str] = []
    valid: list[bool] = []
    verdict, chosen = "ask", None
    for index, probe in enumerate(plan.probes):
        raw, answer = prior[0] if index == 0 and prior else await call(probe)
        raws.append(raw)
        answers.append(answer)
        valid.append(is_valid(task, answer, raw))
        verdict, chosen = plan.step(answers, valid)
        if verdict != "ask":
            break
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
