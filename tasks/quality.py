"""Measured answer quality of the catalog's own models, so that routing learns it, not guesses it.

The benchmark flow asks each model a packaged set of labelled questions (`quality_set.json`:
ARC-Challenge and Winogrande questions from the RouterBench records, each with its gold
answer) and scores the answers with the evaluation's normalisation. The figures go to the
benchmark's `latest.json`, where the catalog loader takes them as the model's quality for that
task type in place of the catalog's typed-in prior.

Rebuild the set: `python -m tasks.quality ../shared/data/routerbench [PER_FILE]`.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from connectors.replay import Record, load
from tasks.policy import normalise

QUALITY_SET = Path(__file__).resolve().parents[1] / "homeskillet" / "data" / "quality_set.json"
SOURCES = ("arc_challenge_train.csv", "winograde_train.csv")


def gold(record: Record) -> str:
    """The answer the models marked correct gave (the most common one); "" when none was right."""
    answers = Counter(normalise(record.task, record.responses[m]) for m, ok in record.correct.items() if ok)
    answers.pop("", None)
    return answers.most_common(1)[0][0] if answers else ""


def question(record: Record) -> str:
    """The record's own question (its last paragraph), without the few-shot examples."""
    return record.prompt.strip().split("\n\n")[-1].strip()


def build(routerbench: Path, per_file: int = 25) -> list[dict]:
    """The first `per_file` records of each source file that have a gold answer."""
    items = []
    for name in SOURCES:
        records = [r for r in load(routerbench / name) if gold(r)]
        items += [{"id": r.sample_id, "task_type": r.task, "question": question(r), "gold": gold(r)}
                  for r in records[:per_file]]  # fmt: skip
    return items


def load_set(path: Path = QUALITY_SET) -> list[dict]:
    return json.loads(Path(path).read_text())


def is_right(task_type: str, answer: str, gold_answer: str) -> bool:
    return normalise(task_type, answer) == gold_answer


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
