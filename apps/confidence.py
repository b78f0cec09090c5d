"""Live confidence, measured (`homeskillet bench-confidence`): how well each local model's own
signals tell its right answers from its wrong ones, and what a two-stage cascade on them buys.

Each model answers every labelled question of a set (`tasks.quality`'s, scored by its rules)
once greedily (temperature 0, the answer a single call gets) and `samples` more times sampled at
`temperature`, one call after another on its real llama.cpp server, the models taking turns
question by question. Per question and model it
records the answer, whether it is right, the signals (`tasks.confidence`): token confidence,
mean token probability, option probability, agreement of the samples (with their most common
answer, and with the greedy answer, as a cascade that samples its first model judges it), and
what each call cost. A call's cost is the catalog's price of the model's slice of the pool
(`local-dedicated` unless told) for the call's time, as `tasks.routing.fragment_cost` bills it;
the flow also bills the slice's allocation and release, which this leaves out.

From these: per model and signal the ROC AUC for "this answer is right" with a bootstrap 95 %
interval, and a two-stage cascade (the cheaper model first, the other when the signal is below a
threshold) whose threshold is chosen by cross-validation, against each model alone and against
always asking both. The per-question outcomes also go out in RouterBench's format
(`recordings_frame`), for training the learned router's heads of the local models.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from connectors import openai_client
from homeskillet import catalog as cat
from homeskillet.errors import InvalidRequest
from homeskillet.schemas import LlamaCppServing, ModelSpec, PoolSpec
from tasks import runtime
from tasks.confidence import (
    Outcome,
    answer_key,
    auc,
    auc_interval,
    cascade,
    choose_threshold,
    choose_thresholds,
    cross_validate,
    majority,
    mean_probability,
    option_probability,
    token_confidence,
)
from tasks.quality import is_right, load_set, per_task_type
from tasks.resources import render
from tasks.routing import fragment_cost

ANSWER_TOKENS = 12  # as the benchmark flow asks its labelled questions: a letter, a number, a few words
POOL = "local-dedicated"
# RouterBench eval names of the set's items, by id prefix; each maps to the item's task type in
# connectors.recordings.EVAL_TASK_TYPES
EVAL_NAMES = {"arith": "arithmetic", "fact": "factual-qa"}
SIGNALS = {  # signal → the label it predicts: is the greedy answer right, or the samples' majority
    "token_confidence": "correct",
    "mean_probability": "correct",
    "option_probability": "correct",
    "agreement_with_answer": "correct",
    "agreement": "majority_correct",
}


def eval_name(item_id: str) -> str:
    """The RouterBench eval an item comes from: its id's prefix (arc-challenge, winogrande), or
    the name of the set's own arithmetic and factual questions."""
    prefix = item_id.split(".")[0] if "." in item_id else item_id.rsplit("-", 1)[0]
    return EVAL_NAMES.get(prefix, prefix)


async def _call(endpoint: str, model: ModelSpec, pool: PoolSpec, question: str, temperature: float) -> dict:
    out = await openai_client.complete(
        endpoint, model.name, max_tokens=ANSWER_TOKENS, temperature=temperature, **render(model, question)
    )
    tokens = out.tokens_in + out.tokens_out
    return {"text": out.text, "logprobs": out.logprobs, "cost": fragment_cost(model, pool, out.total_s, tokens)}


async def measure_question(
    endpoint: str, model: ModelSpec, pool: PoolSpec, item: dict, samples: int, temperature: float
) -> dict:
    """One model on one labelled question: the greedy answer and its signals, then `samples`
    sampled answers and their agreement."""
    task = item["task_type"]
    greedy = await _call(endpoint, model, pool, item["question"], 0.0)
    sampled = [await _call(endpoint, model, pool, item["question"], temperature) for _ in range(samples)]
    answers = [s["text"] for s in sampled]
    common, share = majority(task, answers) if answers else ("", 0.0)
    key = answer_key(task, greedy["text"])
    with_answer = [greedy["text"], *answers[: samples - 1]]  # the greedy answer and samples - 1 more
    agreeing = sum(answer_key(task, a) == key for a in with_answer) if key else 0
    return {
        "id": item["id"],
        "task_type": task,
        "model": model.name,
        "answer": greedy["text"],
        "correct": is_right(item, greedy["text"]),
        "token_confidence": token_confidence(task, greedy["logprobs"]),
        "mean_probability": mean_probability(greedy["logprobs"]),
        "option_probability": option_probability(task, greedy["logprobs"]),
        "cost_usd": greedy["cost"],
        "samples": answers,
        "majority": common,
        "majority_correct": is_right(item, common) if answers else False,
        "agreement": share,
        "agreement_with_answer": agreeing / len(with_answer),
        "samples_cost_usd": sum(s["cost"] for s in sampled),
        "answer_and_samples_cost_usd": greedy["cost"] + sum(s["cost"] for s in sampled[: samples - 1]),
    }


def local_models(catalog, names: list[str] | None) -> list[ModelSpec]:
    """The models to measure: those named, else every model the catalog serves locally."""
    if names:
        return [cat.model(catalog, n) for n in names]
    return [m for m in catalog.models if isinstance(m.serving, LlamaCppServing)]


async def measure(
    items: list[dict],
    models: list[str] | None = None,
    samples: int = 5,
    temperature: float = 0.8,
    pool: str = POOL,
    catalog_path: str | Path | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Every model on every item, question by question (each question asked of one model after
    the other, so that both meet the machine's other work alike); servers started if none runs."""
    if samples < 2:
        raise InvalidRequest(f"self-consistency needs at least 2 samples, not {samples}")
    services = runtime.services(catalog_path)
    where = cat.pool(services.catalog, pool)
    specs = local_models(services.catalog, models)
    endpoints = [await asyncio.to_thread(services.local.model_endpoint, model) for model in specs]
    rows = []
    started = time.perf_counter()
    for done, item in enumerate(items, start=1):
        for model, endpoint in zip(specs, endpoints):
            rows.append(await measure_question(endpoint, model, where, item, samples, temperature))
        if on_progress and (done % 10 == 0 or done == len(items)):
            on_progress(f"{done}/{len(items)} questions, {time.perf_counter() - started:.0f}s")
    return rows


def _auc_figures(rows: list[dict], signal: str) -> dict:
    scored = [r for r in rows if r[signal] is not None]
    labels = [bool(r[SIGNALS[signal]]) for r in scored]
    scores = [float(r[signal]) for r in scored]
    figures: dict = {"n": len(scored), "right": sum(labels)}
    if scored:
        right = [s for s, label in zip(scores, labels) if label]
        wrong = [s for s, label in zip(scores, labels) if not label]
        figures["mean_right"] = round(sum(right) / len(right), 4) if right else None
        figures["mean_wrong"] = round(sum(wrong) / len(wrong), 4) if wrong else None
    if any(labels) and not all(labels):
        low, high = auc_interval(scores, labels)
        figures |= {"auc": round(auc(scores, labels), 4), "ci95": [round(low, 4), round(high, 4)]}
    else:
        figures["auc"] = None  # one class only: nothing to rank
    return figures


def _cascades(rows: list[dict], cheap: str, strong: str, folds: int, seed: int) -> dict:
    by = {(r["id"], r["model"]): r for r in rows}
    ids = [r["id"] for r in rows if r["model"] == cheap]
    pairs = [(by[(i, cheap)], by[(i, strong)]) for i in ids]
    tasks = [c["task_type"] for c, _ in pairs]
    variants = {  # signal → (the cheap model's answer right?, its cost) when the cascade accepts it
        "token_confidence": ("correct", "cost_usd"),
        "mean_probability": ("correct", "cost_usd"),
        "agreement_with_answer": ("correct", "answer_and_samples_cost_usd"),
        "agreement": ("majority_correct", "samples_cost_usd"),
    }
    one, per_task = {}, {}
    for signal, (right, cost) in variants.items():
        outcomes = [Outcome(c[signal], c[right], c[cost], s["correct"], s["cost_usd"]) for c, s in pairs]
        result = cross_validate(outcomes, folds=folds, seed=seed)
        thresholds = [_threshold(t) for t in result.pop("thresholds")]
        # the threshold a live cascade would use: chosen on all the questions
        one[signal] = {k: round(v, 10) for k, v in result.items()} | {
            "thresholds": thresholds,
            "threshold": _threshold(choose_threshold(outcomes)),
        }
        result = cross_validate(outcomes, folds=folds, seed=seed, groups=tasks)
        thresholds = [{t: _threshold(v) for t, v in fold.items()} for fold in result.pop("thresholds")]
        per_task[signal] = {k: round(v, 10) for k, v in result.items()} | {
            "thresholds": thresholds,
            "threshold": {t: _threshold(v) for t, v in choose_thresholds(outcomes, tasks).items()},
        }
    always = cascade([Outcome(None, False, c["cost_usd"], s["correct"], s["cost_usd"]) for c, s in pairs], math.inf)
    return {
        "signals": one,
        "signals_per_task": per_task,
        "always_escalate": {k: round(v, 10) for k, v in always.items() if k != "escalated"},
    }


def _threshold(value: float) -> float | None:
    """A threshold as JSON holds it: None for inf (always escalate)."""
    return None if math.isinf(value) else round(value, 4)


def summarise(rows: list[dict], folds: int = 5, seed: int = 0) -> dict:
    """Per model: accuracy, mean cost per call, and each signal's AUC (with its interval, the
    mean signal of right and of wrong answers), overall and per task type; then the two-stage
    cascade, the cheaper model (mean cost per call) first."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    figures: dict = {"models": {}}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        tasks = sorted({r["task_type"] for r in mine})
        figures["models"][model] = {
            "accuracy": round(sum(r["correct"] for r in mine) / len(mine), 4),
            "majority_accuracy": round(sum(r["majority_correct"] for r in mine) / len(mine), 4),
            "accuracy_by_task": {
                t: round(
                    sum(r["correct"] for r in mine if r["task_type"] == t) / sum(r["task_type"] == t for r in mine), 4
                )
                for t in tasks
            },
            "mean_cost_usd": sum(r["cost_usd"] for r in mine) / len(mine),
            "auc": {signal: _auc_figures(mine, signal) for signal in SIGNALS},
            "auc_by_task": {
                t: {signal: _auc_figures([r for r in mine if r["task_type"] == t], signal) for signal in SIGNALS}
                for t in tasks
            },
        }
    if len(models) == 2:
        cheap, strong = sorted(models, key=lambda m: figures["models"][m]["mean_cost_usd"])
        figures["cascade"] = {
            "cheap": cheap,
            "strong": strong,
            "folds": folds,
            "single": {
                m: {"accuracy": figures["models"][m]["accuracy"], "cost_usd": figures["models"][m]["mean_cost_usd"]}
                for m in models
            },
            **_cascades(rows, cheap, strong, folds, seed),
        }
    return figures


def recordings_frame(rows: list[dict]) -> pd.DataFrame:
    """The per-question outcomes in RouterBench's format (`connectors.recordings.load` reads it):
    sample_id, prompt and eval_name, and per model M: M (1 right, 0 wrong), M|model_response (the
    greedy answer) and M|total_cost (its call's cost); prompts and responses as Python-list
    strings, as RouterBench stores them."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["id"], r["model"]): r for r in rows}
    table = []
    for item_id in dict.fromkeys(r["id"] for r in rows):
        first = by[(item_id, models[0])]
        record = {"sample_id": item_id, "prompt": str([first["question"]]), "eval_name": eval_name(item_id)}
        for m in models:
            row = by[(item_id, m)]
            record |= {
                m: int(row["correct"]),
                f"{m}|model_response": str([row["answer"]]),
                f"{m}|total_cost": row["cost_usd"],
            }
        table.append(record)
    return pd.DataFrame(table)


async def run(
    set_path: Path | None = None,
    models: list[str] | None = None,
    samples: int = 5,
    temperature: float = 0.8,
    folds: int = 5,
    per_task: int | None = None,
    pool: str = POOL,
    catalog_path: str | Path | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure and summarise: the figures, with every question's row under "rows". `per_task`
    takes the set's first that many questions of each task type."""
    items = load_set(set_path) if set_path else load_set()
    items = per_task_type(items, per_task) if per_task else items
    if not items:
        raise InvalidRequest(f"{set_path}: no labelled questions")
    started = time.perf_counter()
    rows = await measure(items, models, samples, temperature, pool, catalog_path, on_progress)
    questions = {item["id"]: item["question"] for item in items}
    for row in rows:
        row["question"] = questions[row["id"]]
    figures = summarise(rows, folds=min(folds, len(items)))
    return {
        "set": str(set_path or "quality_set.json"),
        "questions": len(items),
        "samples": samples,
        "temperature": temperature,
        "answer_tokens": ANSWER_TOKENS,
        "cost": f"catalog slice price of {pool} x the call's time (tasks.routing.fragment_cost); "
        "allocation and release not included",
        "measured": f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}",
        "wall_s": round(time.perf_counter() - started, 1),
        **figures,
        "rows": rows,
    }


def write(figures: dict, out: Path, key: str) -> None:
    """The figures into a JSON file under `key`, keeping what the file holds under other keys
    (each labelled set's figures side by side)."""
    try:
        existing = json.loads(out.read_text()) if out.exists() else {}
    except ValueError:
        existing = {}
    existing = existing if isinstance(existing, dict) else {}
    rows = [{k: _short(v) for k, v in r.items() if k not in ("question", "samples")} for r in figures["rows"]]
    compact = {**figures, "rows": rows}
    out.write_text(json.dumps(existing | {key: compact}, indent=1) + "\n")


def _short(value: object) -> object:
    """A row's figure to six significant digits (costs are millionths of a dollar)."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def report(figures: dict) -> str:
    """The figures a person reads: accuracy and AUCs per model, then the cascade."""
    lines = [
        f"{figures['questions']} questions of {figures['set']}, greedy answer + {figures['samples']} samples at "
        f"temperature {figures['temperature']}; cost: {figures['cost']}"
    ]
    for model, m in figures["models"].items():
        by_task = ", ".join(f"{t} {a:.2f}" for t, a in m["accuracy_by_task"].items())
        lines.append(f"\n{model}: accuracy {m['accuracy']:.2f} ({by_task}), ${m['mean_cost_usd']:.8f} per call")
        for signal, a in m["auc"].items():
            auc_text = (
                f"AUC {a['auc']:.3f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]" if a["auc"] is not None else "AUC -"
            )
            lines.append(
                f"  {signal:<22} {auc_text}  n={a['n']} right={a['right']}  "
                f"mean right {a.get('mean_right')} wrong {a.get('mean_wrong')}"
            )
    c = figures.get("cascade")
    if c:
        lines.append(f"\ncascade: {c['cheap']} first, {c['strong']} below the threshold ({c['folds']}-fold CV)")
        for model, s in c["single"].items():
            lines.append(f"  single {model:<28} accuracy {s['accuracy']:.3f}  ${s['cost_usd']:.8f}")
        a = c["always_escalate"]
        lines.append(f"  {'always escalate':<35} accuracy {a['accuracy']:.3f}  ${a['cost_usd']:.8f}")
        for signal, s in c["signals"].items():
            kept = ", ".join("inf" if t is None else f"{t:.3f}" for t in s["thresholds"])
            whole = "inf" if s["threshold"] is None else f"{s['threshold']:.3f}"
            lines.append(
                f"  on {signal:<32} accuracy {s['accuracy']:.3f}  ${s['cost_usd']:.8f}  "
                f"escalated {s['escalated']:.2f}  thresholds {kept} (on all questions: {whole})"
            )
        for signal, s in c["signals_per_task"].items():
            whole = ", ".join(f"{t} {'inf' if v is None else f'{v:.3f}'}" for t, v in s["threshold"].items())
            lines.append(
                f"  on {signal + ' per task type':<32} accuracy {s['accuracy']:.3f}  ${s['cost_usd']:.8f}  "
                f"escalated {s['escalated']:.2f}  (on all questions: {whole})"
            )
    return "\n".join(lines)
