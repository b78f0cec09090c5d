"""Measured answer quality of the catalog's own models, so that routing learns it, not guesses it.

The benchmark flow asks each model a packaged set of labelled questions (`quality_set.json`)
and scores its answers:
- multiple_choice: ARC-Challenge and Winogrande questions from the RouterBench records, the
  gold letter being the answer of the models the record marks correct;
- math: arithmetic generated with a fixed seed, the gold number computed;
- factual_qa: short questions with accepted answers (`quality_facts.yaml`), right when the
  answer contains one of them as a word.
Choices and numbers are compared after the evaluation's normalisation. The figures go to the
benchmark's `latest.json`, where the catalog loader takes them as the model's quality for that
task type in place of the catalog's typed-in prior.

Rebuild the set: `python -m tasks.quality homeskillet/data/routerbench [PER_FILE]`.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import yaml

from connectors.recordings import Record, load
from tasks.decompose import classify
from tasks.strategies import normalise

QUALITY_SET = Path(__file__).resolve().parents[1] / "homeskillet" / "data" / "quality_set.json"
FACTS = QUALITY_SET.with_name("quality_facts.yaml")
SOURCES = ("arc_challenge_train.csv", "winograde_train.csv")


def gold(record: Record) -> str:
    """The answer the models marked correct gave (the most common one); "" when none was right."""
    answers = Counter(normalise(record.task, record.responses[m]) for m, ok in record.correct.items() if ok)
    answers.pop("", None)
    return answers.most_common(1)[0][0] if answers else ""


def question(record: Record) -> str:
    """The record's own question (its last paragraph), without the few-shot examples."""
    return record.prompt.strip().split("\n\n")[-1].strip()


def arithmetic(count: int, seed: int = 2026) -> list[dict]:
    """Sums, differences and products with their results, the same ones for the same seed."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        a, b = rng.randint(12, 99), rng.randint(2, 11)
        text, result = [
            (f"What is {a} plus {b}?", a + b),
            (f"What is {a} minus {b}?", a - b),
            (f"What is {a} times {b}?", a * b),
        ][i % 3]
        items.append({"id": f"arith-{i}", "task_type": "math", "question": text, "accept": [str(result)]})
    return items


def build(routerbench: Path, per_file: int = 25) -> list[dict]:
    """The first `per_file` records of each source file that have a gold answer (alternating
    between the files, so that any prefix mixes them), as many arithmetic questions, and the
    factual questions."""
    items = []
    files = [[r for r in load(routerbench / name, classify) if gold(r)][:per_file] for name in SOURCES]
    for row in zip(*files):
        items += [{"id": r.sample_id, "task_type": r.task, "question": question(r), "accept": [gold(r)]} for r in row]
    items += arithmetic(per_file)
    facts = yaml.safe_load(FACTS.read_text())
    items += [
        {"id": f"fact-{i}", "task_type": "factual_qa", "question": f["question"], "accept": f["accept"]}
        for i, f in enumerate(facts)
    ]
    return items


def load_set(path: Path = QUALITY_SET) -> list[dict]:
    return json.loads(Path(path).read_text())


def per_task_type(items: list[dict], count: int) -> list[dict]:
    """The first `count` items of each task type, in the set's order."""
    seen: Counter[str] = Counter()
    chosen = []
    for item in items:
        if seen[item["task_type"]] < count:
            seen[item["task_type"]] += 1
            chosen.append(item)
    return chosen


def is_right(item: dict, answer: str) -> bool:
    """A choice or number must equal an accepted one after normalisation; any other answer must
    contain an accepted one as a word (case-insensitive)."""
    if item["task_type"] in ("multiple_choice", "math"):
        return normalise(item["task_type"], answer) in item["accept"]
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in item["accept"])


def accuracy(rows: list[dict]) -> dict[str, dict[str, float]]:
    """model → task type → share of right answers, from rows of {model, task_type, right}."""
    totals: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        totals.setdefault((row["model"], row["task_type"]), []).append(int(row["right"]))
    figures: dict[str, dict[str, float]] = {}
    for (model, task_type), hits in sorted(totals.items()):
        figures.setdefault(model, {})[task_type] = round(sum(hits) / len(hits), 4)
    return figures


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    items = build(folder, int(sys.argv[2]) if len(sys.argv) > 2 else 25)
    QUALITY_SET.write_text(json.dumps(items, indent=1) + "\n")
    print(f"{len(items)} labelled questions written to {QUALITY_SET}")
