"""`benchmark`: the scheduled performance benchmark across model sizes.

Each sample is a real fragment through the production path (allocate → streamed infer →
release), so allocation overhead is measured, not assumed. Results go to Parquet, a table
artifact, a PNG chart, and `latest.json`, whose tokens/s the router uses for its estimates.
Each model also answers labelled questions (`tasks/quality.py`); its share of right answers
per task type goes to `latest.json` too, and the router uses it as the model's quality there.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from homeskillet import catalog as cat
from homeskillet.schemas import Fragment, InferenceRequest, LlamaCppServing
from tasks import runtime
from tasks.benchmarking import PROMPTS, chart, sample, summarise_benchmark
from tasks.decompose import estimate_tokens
from tasks.model_call import call_model
from tasks.preparation import make_request, prepare
from tasks.quality import accuracy, is_right, load_set, per_task_type
from tasks.routing import candidates, route_fragment
from tasks.telemetry import record_telemetry

ANSWER_TOKENS = 12  # a labelled question's answer is a letter, a number or a few words


@flow(name="benchmark", persist_result=True, result_serializer="json")
async def benchmark(
    models: list[str] | None = None,
    repetitions: int = 3,
    concurrency: list[int] = [1, 2],  # noqa: B006 (Prefect parameters are copied per run)
    max_tokens: int = 32,
    tier: str = "dedicated",
    tenant: str = "demo",
    catalog_path: str | None = None,
    quality_questions: int = 25,
) -> dict:
    """Time to first token, latency p50/p95, tokens/s, allocation overhead and $/1k tokens for
    every model at each concurrency level.

    Args:
        models: Catalog models to measure (default: every locally served one).
        repetitions: Samples per model and concurrency level.
        concurrency: Fragments in flight at once, one level per entry.
        max_tokens: Output tokens per sample.
        tier: Pool tier to allocate on.
        tenant: Tenant the benchmark's allocations belong to.
        catalog_path: Another catalog file.
        quality_questions: Labelled questions per task type each model answers to measure its
            quality (0: none).
    """
    import pandas as pd

    services = runtime.services(catalog_path)
    catalog = services.catalog
    log = get_run_logger()
    names = models or [m.name for m in catalog.models if isinstance(m.serving, LlamaCppServing)]
    specs = [cat.model(catalog, n) for n in names]
    labelled = per_task_type(load_set(), quality_questions)
    total = len(specs) * (sum(concurrency) * repetitions + len(labelled))
    progress = await acreate_progress_artifact(progress=0.0, description="benchmark samples done")
    done, rows, records, answers = 0, [], [], []
    for spec in specs:
        # the tenant's covenant holds for the benchmark too: a model or tier it forbids is refused
        warm_up = await prepare(_request(PROMPTS[0], tenant, max_tokens, tier, spec.name), services, log)
        ctx = replace(warm_up.ctx, records=records)
        model_list, pools = candidates(ctx.allowed, ctx.constraints)
        (warm,) = warm_up.plan.fragments
        await call_model(warm, warm.text, warm_up.choices[warm.id], warm_up.ctx)  # not measured, not kept
        for level in concurrency:
            for rep in range(repetitions):
                fragments = [
                    Fragment(
                        id=f"b{i}",
                        text=PROMPTS[i % len(PROMPTS)],
                        task_type="chat",
                        est_prompt_tokens=estimate_tokens(PROMPTS[i % len(PROMPTS)]),
                    )
                    for i in range(level)
                ]
                results = await asyncio.gather(
                    *(
                        call_model(f, f.text, route_fragment(f, model_list, pools, max_tokens, None), ctx, stream=True)
                        for f in fragments
                    )
                )
                rows += [sample(r, spec.parameters_m, level, rep) for r in results]
                done += level
                await aupdate_progress_artifact(progress, progress=100.0 * done / total)
        short = await prepare(_request(PROMPTS[0], tenant, ANSWER_TOKENS, tier, spec.name), services, log)
        short_ctx = replace(short.ctx, records=records)
        for item in labelled:
            fragment = Fragment(
                id=f"q-{item['id']}"[:64],
                text=item["question"],
                task_type=item["task_type"],
                est_prompt_tokens=estimate_tokens(item["question"]),
            )
            choice = route_fragment(fragment, model_list, pools, ANSWER_TOKENS, None)
            result = await call_model(fragment, fragment.text, choice, short_ctx)
            answers.append(
                {
                    "model": spec.name,
                    "task_type": item["task_type"],
                    "question": item["id"],
                    "answer": result.text,
                    "right": is_right(item, result.text),
                }
            )
            done += 1
            await aupdate_progress_artifact(progress, progress=100.0 * done / total)
    await record_telemetry(services, records)  # benchmark fragments are real GPU time: the cost report sees them
    samples = pd.DataFrame(rows)
    summary = await summarise_benchmark(samples)
    folder = services.settings.home / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S}"
    parquet = folder / f"benchmark-{stamp}.parquet"
    samples.to_parquet(parquet, index=False)
    png = await asyncio.to_thread(chart, summary, folder / f"benchmark-{stamp}.png")
    speeds = {r.model: round(float(r.tokens_per_s), 2) for r in summary[summary.concurrency == 1].itertuples()}
    quality = accuracy(answers)
    if answers:
        pd.DataFrame(answers).to_parquet(folder / f"quality-{stamp}.parquet", index=False)
    (folder / "latest.json").write_text(
        json.dumps(
            {"tokens_per_second": speeds, "quality": quality, "quality_questions": len(labelled), "measured": stamp},
            indent=2,
        )
    )
    await acreate_table_artifact(
        key="benchmark", table=summary.to_dict("records"), description=f"{len(samples)} samples"
    )
    if quality:
        await acreate_table_artifact(
            key="benchmark-quality",
            table=[{"model": m, **figures} for m, figures in quality.items()],
            description=f"share of right answers to {len(labelled)} labelled questions, per task type",
        )
    await acreate_markdown_artifact(
        key="benchmark-files", markdown=f"Samples: `{parquet}`\n\nChart: `{png}`\n\nRouter speeds: {speeds}"
    )
    return {"parquet": str(parquet), "chart": str(png), "summary": summary.to_dict("records"), "quality": quality}


def _request(prompt: str, tenant: str, max_tokens: int, tier: str, model: str) -> InferenceRequest:
    """One benchmark request: the prompt whole, as chat, on one model and tier."""
    constraints = {
        "max_tokens": max_tokens,
        "tier": tier,
        "allowed_models": [model],
        "split": False,
        "task_type": "chat",
    }
    return make_request(prompt, tenant, constraints=constraints)
