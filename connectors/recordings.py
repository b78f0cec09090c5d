"""Recordings: RouterBench's recorded answers of 11 real LLMs, read and looked up.

A known prompt asked of a recorded model gets that model's recorded response and recorded cost,
so routing is evaluated offline over real model behaviour. `Recordings` is the lookup;
`doubles.replay` serves it as an OpenAI-compatible endpoint.

A record's task type comes from its `eval_name` (ARC and Winogrande are multiple choice, MBPP is
code); an eval this module does not know is labelled by the request classifier, as a live
fragment would be.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from homeskillet.errors import InvalidRequest

META = {"Unnamed: 0", "sample_id", "prompt", "eval_name", "oracle_model_to_route_to"}
EVAL_TASK_TYPES = {
    "arc-challenge": "multiple_choice",
    "winogrande": "multiple_choice",
    "mmlu": "multiple_choice",
    "hellaswag": "multiple_choice",
    "mbpp": "code",
    "grade-school-math": "math",
    "gsm8k": "math",
    "mt-bench": "chat",
    "arithmetic": "math",
    "factual-qa": "factual_qa",
}


@dataclass(frozen=True)
class Record:
    task: str  # the task type, e.g. multiple_choice (the live flow's label for such a fragment)
    source: str  # the file's stem, e.g. arc_challenge_train
    sample_id: str
    prompt: str
    responses: dict[str, str]
    correct: dict[str, bool]
    cost: dict[str, float]


def _text(cell: object) -> str:
    """Responses and prompts are stored as Python-list strings; take the first element."""
    if not isinstance(cell, str):
        return ""
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return cell
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value)


def load(path: Path, classify: Callable[[str], str] | None = None) -> list[Record]:
    """A RouterBench-format CSV: for each model M, columns M, M|model_response, M|total_cost.
    A record's task type comes from its eval name, else from `classify` (the request classifier)
    on its question; without one, an unknown eval name is an error."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InvalidRequest(f"{path}: not a readable CSV ({exc})") from None
    models = [c for c in frame.columns if c not in META and "|" not in c]
    missing = ["prompt", "sample_id"] if not {"prompt", "sample_id"} <= set(frame.columns) else []
    missing += [f"{m}|{k}" for m in models for k in ("model_response", "total_cost") if f"{m}|{k}" not in frame.columns]
    if missing or not models:
        raise InvalidRequest(
            f"{path}: not in RouterBench format (needs prompt, sample_id and per model M the columns M, "
            f"M|model_response, M|total_cost); missing {missing[:5] or 'any model columns'}"
        )
    source = Path(path).stem
    return [
        Record(
            task=task_type(row.get("eval_name"), _text(row["prompt"]), classify, path),
            source=source,
            sample_id=str(row["sample_id"]),
            prompt=_text(row["prompt"]),
            responses={m: _text(row[f"{m}|model_response"]) for m in models},
            correct={m: bool(row[m] == 1) for m in models},
            cost={m: float(row[f"{m}|total_cost"]) for m in models},
        )
        for _, row in frame.iterrows()
    ]


def task_type(eval_name: object, prompt: str, classify: Callable[[str], str] | None, path: Path) -> str:
    known = EVAL_TASK_TYPES.get(str(eval_name).strip().lower())
    if known:
        return known
    if classify is None:
        raise InvalidRequest(
            f"{path}: eval_name {eval_name!r} has no known task type "
            f"(known: {', '.join(sorted(EVAL_TASK_TYPES))}) and no classifier was given"
        )
    return classify(prompt.strip().split("\n\n")[-1])


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.strip().encode()).hexdigest()


HEAD = 200  # characters of a prompt that index it for prefix lookups


class Recordings:
    """Answers a recorded prompt with a recorded model's response and cost.

    A prompt that extends a recorded one (an aggregator's prompt: the question, then the
    candidate answers) gets the answer recorded for that question: the recordings hold no
    answer that saw the candidates.
    """

    def __init__(self, records: list[Record]):
        self._by_prompt = {prompt_key(r.prompt): r for r in records}
        self._by_head: dict[str, list[Record]] = {}
        for r in records:
            self._by_head.setdefault(r.prompt.strip()[:HEAD], []).append(r)
        self._short = sorted({len(r.prompt.strip()) for r in records if len(r.prompt.strip()) < HEAD})
        self.models = sorted({m for r in records for m in r.responses})

    def record(self, prompt: str) -> Record:
        found = self._by_prompt.get(prompt_key(prompt))
        if found is not None:
            return found
        text = prompt.strip()
        heads = [text[:HEAD], *(text[:n] for n in self._short)]
        extended = [r for h in heads for r in self._by_head.get(h, []) if text.startswith(r.prompt.strip())]
        if not extended:
            raise LookupError("prompt not in the recordings")
        return max(extended, key=lambda r: len(r.prompt))

    def answer(self, model: str, prompt: str) -> tuple[str, float]:
        record = self.record(prompt)
        if model not in record.responses:
            raise LookupError(f"model {model!r} has no recording; recorded: {', '.join(self.models)}")
        return record.responses[model], record.cost[model]
