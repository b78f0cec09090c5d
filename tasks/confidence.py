"""How sure a model is of its own answer, from what the call returned: the signals a cascade
accepts a cheap answer on or escalates, and how well they tell right answers from wrong ones.

- `option_probability`: for closed answers (a choice A-D or 1-4, a number), the probability of
  the chosen option at the token where the answer starts, renormalised over the options among
  that token's likeliest alternatives ("B" against "A", "C", "D"; "3" against other digits);
- `mean_probability`: exp of the mean log-probability of the answer's tokens (any answer);
- `token_confidence`: the one figure a fragment carries: the option probability for closed
  answers, the mean probability otherwise;
- `agreement`: self-consistency, the share of sampled answers that agree with the most common one;
- `auc`, `auc_interval`: how well a signal ranks right answers above wrong ones (ROC AUC);
- `choose_threshold(s)`, `cascade`, `cross_validate`: a two-stage cascade (accept the cheap
  model's answer when its signal reaches a threshold, else ask the strong model), its threshold
  (one, or one per task type) chosen on training questions and scored on held-out ones.

Pure functions over token log-probabilities and recorded outcomes.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from homeskillet.errors import InvalidRequest
from homeskillet.schemas import TokenLogprob
from tasks.strategies import normalise

CLOSED = ("multiple_choice", "math")
CHOICE = re.compile(r"(?<![A-Za-z0-9])([ABCD1234])(?![A-Za-z0-9])")  # as `normalise` finds a choice
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")  # as `normalise` finds a number, thousands separators kept
DIGITS = re.compile(r"-|-?\d+(?:[.,]\d*)?")
LETTERS = {"1": "A", "2": "B", "3": "C", "4": "D"}
PUNCTUATION = "()[]{}.,:;*\"'`"


def option(task: str, token: str) -> str | None:
    """The option a token stands for, if it is one: a choice letter (1-4 count as A-D) for
    multiple choice, the digits (or the sign) a number starts with for math."""
    text = token.strip()
    if task == "multiple_choice":
        text = text.strip(PUNCTUATION)
        return LETTERS.get(text, text) if text in "ABCD1234" and len(text) == 1 else None
    if task == "math":
        return text if text and DIGITS.fullmatch(text) else None
    return None


def answer_start(task: str, logprobs: Sequence[TokenLogprob]) -> int | None:
    """The index of the token where a closed answer starts: the first choice of a multiple-choice
    answer, the last number of a math answer (the ones `normalise` takes); None when there is none."""
    text = "".join(t.token for t in logprobs)
    if task == "multiple_choice":
        match = CHOICE.search(text)
    elif task == "math":
        numbers = list(NUMBER.finditer(text))
        match = numbers[-1] if numbers else None
    else:
        return None
    if match is None:
        return None
    offset = 0
    for index, token in enumerate(logprobs):
        offset += len(token.token)
        if offset > match.start():
            return index
    return None


def option_probability(task: str, logprobs: Sequence[TokenLogprob] | None) -> float | None:
    """The probability of the chosen option at the answer's first token, renormalised over the
    options among that token's alternatives (alternatives that are no option, like "The", do not
    count). None for an open task, no log-probabilities, or no option in the answer."""
    if task not in CLOSED or not logprobs:
        return None
    index = answer_start(task, logprobs)
    if index is None:
        return None
    token = logprobs[index]
    chosen = option(task, token.token)
    if chosen is None:
        return None
    mass: Counter[str] = Counter()
    for alternative, logprob in token.top.items():
        key = option(task, alternative)
        if key is not None:
            mass[key] += math.exp(logprob)
    if token.token not in token.top:  # a sampled token outside the listed alternatives
        mass[chosen] += math.exp(token.logprob)
    total = sum(mass.values())
    return mass[chosen] / total if total > 0 else None


def mean_probability(logprobs: Sequence[TokenLogprob] | None) -> float | None:
    """exp(mean log-probability) of the answer's tokens (the geometric mean of their
    probabilities); tokens without text (an end or stop token, which streams and whole answers
    report differently) do not count. None when there are none."""
    tokens = [t.logprob for t in logprobs or () if t.token]
    return math.exp(sum(tokens) / len(tokens)) if tokens else None


def token_confidence(task: str, logprobs: Sequence[TokenLogprob] | None) -> float | None:
    """The model's probability of its answer: the option probability for closed answers, the
    mean token probability otherwise; 0 when there is nothing to be sure of (a closed answer with
    no choice or number, an empty answer). None when the provider gave no log-probabilities."""
    if logprobs is None:
        return None
    if task in CLOSED:
        return option_probability(task, logprobs) or 0.0
    return mean_probability(logprobs) or 0.0


def answer_key(task: str, text: str) -> str:
    """What two answers must share to agree: the normalised answer; open answers also ignore
    case and the punctuation around them ("Paris." agrees with "paris")."""
    key = normalise(task, text)
    return key if task in CLOSED else key.casefold().strip(" .!?,;:'\"")


def majority(task: str, answers: Sequence[str]) -> tuple[str, float]:
    """The most common answer (the first one given of those most common, as it was written) and
    the share of all answers that agree with it. Answers with nothing to compare (no choice, no
    number, no text) agree with none; when all are such, the first answer and 0."""
    if not answers:
        raise InvalidRequest("agreement needs at least one answer")
    keys = [answer_key(task, a) for a in answers]
    votes = Counter(k for k in keys if k)
    if not votes:
        return answers[0], 0.0
    top = max(votes, key=lambda k: (votes[k], -keys.index(k)))
    return answers[keys.index(top)], votes[top] / len(answers)


def agreement(task: str, answers: Sequence[str]) -> float:
    """Self-consistency: the share of the answers that agree with the most common one."""
    return majority(task, answers)[1]


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """ROC AUC of scores for labels (True: the answer is right), by Mann-Whitney: the chance that
    a right answer scores above a wrong one, ties counting half. Needs both classes."""
    if len(scores) != len(labels):
        raise InvalidRequest(f"auc: {len(scores)} scores for {len(labels)} labels")
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if not positives or not negatives:
        raise InvalidRequest(
            f"auc needs right and wrong answers; all {len(labels)} are {'right' if positives else 'wrong'}"
        )
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # tied scores share their mean rank
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = sum(rank for rank, label in zip(ranks, labels) if label)
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def auc_interval(
    scores: Sequence[float], labels: Sequence[bool], rounds: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95 % bootstrap interval of `auc` (questions resampled with replacement; resamples with
    one class only are skipped), the same for the same seed."""
    auc(scores, labels)  # the same checks
    rng = random.Random(seed)
    n = len(scores)
    values = []
    for _ in range(rounds):
        picks = [rng.randrange(n) for _ in range(n)]
        sample = [labels[i] for i in picks]
        if any(sample) and not all(sample):
            values.append(auc([scores[i] for i in picks], sample))
    values.sort()
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


@dataclass(frozen=True)
class Outcome:
    """One question as a two-stage cascade sees it: the cheap model's answer, its signal and cost,
    and what asking the strong model would add."""

    signal: float | None  # the cheap model's confidence; None: none (the cascade escalates)
    cheap_right: bool
    cheap_cost: float
    strong_right: bool
    strong_cost: float


def cascade(outcomes: Sequence[Outcome], threshold: float | Sequence[float]) -> dict[str, float]:
    """Accept the cheap answer when its signal is at least the threshold (one for all questions,
    or one per question), else pay for the strong model too: the share of right answers, the
    mean cost per question and the share escalated."""
    if not outcomes:
        raise InvalidRequest("a cascade needs at least one question")
    thresholds = [threshold] * len(outcomes) if isinstance(threshold, int | float) else list(threshold)
    right = cost = escalated = 0.0
    for o, t in zip(outcomes, thresholds, strict=True):
        if o.signal is not None and o.signal >= t:
            right += o.cheap_right
            cost += o.cheap_cost
        else:
            right += o.strong_right
            cost += o.cheap_cost + o.strong_cost
            escalated += 1
    n = len(outcomes)
    return {"accuracy": right / n, "cost_usd": cost / n, "escalated": escalated / n}


def choose_threshold(outcomes: Sequence[Outcome]) -> float:
    """The threshold with the most right answers on these questions, the cheaper on a tie: each
    signal seen is a candidate (accept from it up), and inf (always escalate). The one chosen is
    placed halfway down to the next lower signal seen, so that a new answer scoring between the
    two is judged by the nearer. No questions: inf."""
    if not outcomes:
        return math.inf
    signals = sorted({o.signal for o in outcomes if o.signal is not None})
    candidates = [*signals, math.inf]
    figures = {t: cascade(outcomes, t) for t in candidates}
    best = max(candidates, key=lambda t: (round(figures[t]["accuracy"], 12), -figures[t]["cost_usd"], -t))
    below = [s for s in signals if s < best]
    return (below[-1] + best) / 2 if below and best != math.inf else best


def choose_thresholds(outcomes: Sequence[Outcome], groups: Sequence[str]) -> dict[str, float]:
    """A threshold for each group (task type), chosen on that group's questions alone."""
    return {
        g: choose_threshold([o for o, h in zip(outcomes, groups, strict=True) if h == g]) for g in sorted(set(groups))
    }


def cross_validate(
    outcomes: Sequence[Outcome], folds: int = 5, seed: int = 0, groups: Sequence[str] | None = None
) -> dict:
    """The cascade's threshold chosen on the training folds and scored on the held-out fold, for
    each of `folds` folds (questions shuffled with `seed`): accuracy, mean cost and share
    escalated over all questions, each scored once while held out, and the thresholds chosen
    (with `groups`, one per group, e.g. per task type: {group: threshold} for each fold; a group
    with no training question escalates)."""
    if folds < 2 or folds > len(outcomes):
        raise InvalidRequest(f"cross-validation needs 2 to {len(outcomes)} folds, not {folds}")
    order = list(range(len(outcomes)))
    random.Random(seed).shuffle(order)
    held_out = [order[k::folds] for k in range(folds)]
    thresholds, scored = [], []
    for part in held_out:
        chosen = set(part)
        train = [i for i in range(len(outcomes)) if i not in chosen]
        if groups is None:
            threshold = choose_threshold([outcomes[i] for i in train])
            per_question: list[float] = [threshold] * len(part)
            thresholds.append(threshold)
        else:
            by_group = choose_thresholds([outcomes[i] for i in train], [groups[i] for i in train])
            per_question = [by_group.get(groups[i], math.inf) for i in part]
            thresholds.append(by_group)
        scored.append((len(part), cascade([outcomes[i] for i in part], per_question)))
    n = len(outcomes)
    totals = {key: sum(size * figures[key] for size, figures in scored) / n for key in scored[0][1]}
    return {**totals, "thresholds": thresholds}
