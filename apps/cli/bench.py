"""Measurements run from this process: the `benchmark` and `cost-report` flows, the orchestration's
overhead (`bench-overhead`), load from several tenants (`loadtest`) and throughput by worker count
(`bench-workers`), what the MCP layer adds (`bench-mcp`), and how well the local models' own
confidence tells their right answers from wrong ones (`bench-confidence`). The measuring is in
flows/ and apps.overhead, apps.loadtest, apps.scaling, apps.bench_mcp, apps.confidence; this
module runs it and prints what it found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from apps.cli.running import console, fail, run_flows, use_local_prefect
from homeskillet.errors import HomeskilletError, InvalidRequest
from homeskillet.settings import get_settings


def benchmark(
    repetitions: Annotated[int, typer.Option(help="Samples per model and concurrency level.")] = 3,
    concurrency: Annotated[list[int], typer.Option(help="Concurrency level (repeatable).")] = [1, 2],  # noqa: B006
    max_tokens: Annotated[int, typer.Option(help="Output tokens per sample.")] = 32,
    quality_questions: Annotated[
        int, typer.Option(min=0, help="Labelled questions per task type and model (0: none).")
    ] = 25,
) -> None:
    """Run the benchmark flow here (the scheduled deployment runs the same flow)."""
    try:
        use_local_prefect()
        from flows.benchmark import benchmark as benchmark_flow
        from tasks import runtime

        async def main():
            try:
                return await benchmark_flow(
                    repetitions=repetitions,
                    concurrency=concurrency,
                    max_tokens=max_tokens,
                    quality_questions=quality_questions,
                )
            finally:
                await runtime.shutdown()

        out = run_flows(main())
    except HomeskilletError as exc:
        fail(exc)
    table = Table(title="benchmark across model sizes")
    for column in out["summary"][0]:
        table.add_column(column)
    for row in out["summary"]:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    for model, figures in out["quality"].items():
        shares = ", ".join(f"{task} {share:.2f}" for task, share in figures.items())
        console.print(f"quality of {model} (share right, now the router's figure): {shares}")
    console.print(f"samples {out['parquet']} · chart {out['chart']}")


def cost_report(since_days: Annotated[int, typer.Option(help="Telemetry of the last N days.")] = 7) -> None:
    """Run the cost report flow here and print the report."""
    try:
        use_local_prefect()
        from flows.cost_report import cost_report as cost_flow

        path = run_flows(cost_flow(since_days=since_days))
    except HomeskilletError as exc:
        fail(exc)
    console.print(open(path).read(), markup=False, highlight=False)
    console.print(f"written to {path}")


def bench_overhead(
    repeats: Annotated[int, typer.Option(min=1, help="Runs of each side.")] = 3,
    max_tokens: Annotated[
        int | None, typer.Option(min=1, help="Output tokens per fragment (default 48; with --via api 256).")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Single-fragment requests at once, in the second part.")] = 8,
    via: Annotated[
        str,
        typer.Option(
            help="flow, or api: also the same requests through POST /v1/chat/completions of an API server "
            "started here on loopback, answered whole and streamed (the `api` figures)."
        ),
    ] = "flow",
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line of the headline figures.")] = False,
) -> None:
    """Orchestration overhead: the same fragments through fuse_request and as direct llama.cpp calls,
    one request at a time and CONCURRENCY at once; with --via api, through the API as well."""
    if via not in ("flow", "api"):
        fail(InvalidRequest(f"--via {via!r}: flow or api"))
    tokens = max_tokens or (256 if via == "api" else 48)
    try:
        use_local_prefect()
        from apps.overhead import report, run_benchmark, summary_line

        figures = run_flows(run_benchmark(repeats=repeats, max_tokens=tokens, concurrency=concurrency, via=via))
    except HomeskilletError as exc:
        fail(exc)
    console.print(report(figures), highlight=False, markup=False)
    if as_json:
        print(summary_line(figures))


def bench_mcp(
    tenant: Annotated[str, typer.Option(help="The catalog tenant the calls act as.")] = "demo",
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per fragment.")] = 16,
    classify_rounds: Annotated[int, typer.Option(min=1, help="classify calls per transport.")] = 30,
    fuse_rounds: Annotated[int, typer.Option(min=1, help="fuse calls per transport, and direct.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line of the figures.")] = False,
) -> None:
    """What the MCP layer adds: classify and fuse round trips over Streamable HTTP and WebSocket,
    against the same request as a direct fuse_request call."""
    try:
        use_local_prefect()
        from apps.bench_mcp import report, run_benchmark

        figures = run_flows(
            run_benchmark(
                tenant=tenant,
                constraints={"max_tokens": max_tokens},
                classify_rounds=classify_rounds,
                fuse_rounds=fuse_rounds,
            )
        )
    except HomeskilletError as exc:
        fail(exc)
    console.print(report(figures), highlight=False, markup=False)
    if as_json:
        print(json.dumps(figures))


def loadtest(
    requests: Annotated[int, typer.Option(min=1, help="Requests in all.")] = 50,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    tenants: Annotated[int, typer.Option(min=1, help="Tenants taking turns (the catalog's first T).")] = 3,
    backend: Annotated[
        str,
        typer.Option(
            help="local (this machine's models), hostedai (the emulator, started here) or replay "
            "(recorded answers from --recordings: the orchestration's own ceiling)."
        ),
    ] = "local",
    faults: Annotated[str, typer.Option(help="hosted·ai emulator faults, e.g. error_rate=0.2,preempt_rate=0.1.")] = "",
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per fragment.")] = 16,
    recordings: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="A RouterBench file (CSV or Parquet) for --backend replay."),
    ] = None,
    via: Annotated[
        str,
        typer.Option(
            help="flow (fuse_request in this process) or api (POST /v1/chat/completions of an API server "
            "started here on loopback, streamed, a token per tenant; local backend only)."
        ),
    ] = "flow",
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line of the figures.")] = False,
) -> None:
    """Load through the real flow from several tenants, checking capacity, isolation, leaks and
    hosted·ai subscriptions while it runs; exit 1 if any of them broke."""
    try:
        use_local_prefect()
        from apps.loadtest import report, run_load, summary, violated

        figures = run_flows(
            run_load(requests, concurrency, tenants, backend, faults, max_tokens, recordings=recordings, via=via)
        )
    except HomeskilletError as exc:
        fail(exc)
    console.print(report(figures), highlight=False, markup=False)
    if as_json:
        print(summary(figures))
    if violated(figures):
        raise typer.Exit(1)


SCALING_COLUMNS = ("workers", "limit", "completed", "rps", "latency_p50_s", "latency_p95_s", "wall_s")


def bench_workers(
    workers: Annotated[str, typer.Option(help="Worker counts to measure, comma-separated.")] = "1,2,4",
    requests: Annotated[int, typer.Option(min=1, help="Flow runs submitted at once, per worker count.")] = 12,
    limit: Annotated[int, typer.Option(min=1, help="Flow runs each worker runs at once.")] = 2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per request.")] = 16,
    recordings: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Answer from these RouterBench recordings instead of the local models (no model compute).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Requests/s through deployments with 1, 2, 4… process workers (each run its own process)."""
    try:
        counts = [int(w) for w in workers.split(",") if w.strip()]
    except ValueError:
        fail(ValueError(f"--workers must be numbers separated by commas, not {workers!r}"))
    try:
        api_url = use_local_prefect()
        from apps.scaling import run_scaling

        rows = run_flows(
            run_scaling(
                api_url, counts, requests, limit, max_tokens, get_settings().home / "logs" / "bench-workers", recordings
            )
        )
    except HomeskilletError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    answers = f"recordings {recordings.name}" if recordings else f"local models, max_tokens {max_tokens}"
    table = Table(title=f"{requests} requests per row through the fuse-request deployment, {answers}")
    for column in SCALING_COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in SCALING_COLUMNS))
    console.print(table)


def bench_confidence(
    labelled: Annotated[
        Path | None,
        typer.Option(
            "--set", exists=True, dir_okay=False, help="A labelled set (default: the packaged quality_set.json)."
        ),
    ] = None,
    models: Annotated[
        list[str] | None, typer.Option("--model", help="A local model to measure (repeatable; default: all).")
    ] = None,
    samples: Annotated[int, typer.Option(min=2, help="Sampled answers per question, for self-consistency.")] = 5,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="Temperature of the samples.")] = 0.8,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds for the cascade's threshold.")] = 5,
    per_task: Annotated[
        int | None, typer.Option(min=1, help="Only the set's first N questions of each task type.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False, help="Write the figures (and each question's row) to this JSON file, under the set's name."
        ),
    ] = None,
    recordings: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="Write the per-question outcomes here as a RouterBench-format CSV."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures (without rows) as JSON.")] = False,
) -> None:
    """Each local model on labelled questions: the AUC of its own confidence signals for "this
    answer is right", and a two-stage cascade on them (threshold by cross-validation) against
    each model alone and always escalating. Talks to the model servers only (no Prefect)."""
    import asyncio

    try:
        from apps.confidence import recordings_frame, report, run, write

        figures = asyncio.run(
            run(
                labelled,
                models or None,
                samples=samples,
                temperature=temperature,
                folds=folds,
                per_task=per_task,
                on_progress=lambda line: console.print(line, highlight=False, markup=False),
            )
        )
    except HomeskilletError as exc:
        fail(exc)
    if out:
        write(figures, out, (labelled or Path("quality_set.json")).stem)
    if recordings:
        recordings_frame(figures["rows"]).to_csv(recordings, index=False)
    if as_json:
        print(json.dumps({k: v for k, v in figures.items() if k != "rows"}, indent=1))
    else:
        console.print(report(figures), highlight=False, markup=False)
    written = [str(p) for p in (out, recordings) if p]
    if written:
        console.print(f"written to {', '.join(written)}", highlight=False, markup=False)
