"""`homeskillet`: run requests, inspect allocations, manage the local Prefect server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from homeskillet.errors import CovenantViolation, HomeskilletError, InvalidRequest
from homeskillet.settings import get_settings

app = typer.Typer(help="Homeskillet: decompose, route, allocate, infer, release, fuse.", no_args_is_help=True)
server_app = typer.Typer(help="The local services: Prefect server, PostgreSQL, model servers.", no_args_is_help=True)
app.add_typer(server_app, name="server")
console = Console(width=None if sys.stdout.isatty() else 200)  # pipes and logs get the whole table
errors = Console(stderr=True)

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
T = TypeVar("T")


def use_local_prefect() -> str:
    """Start or reuse the local Prefect server and point this process's Prefect client at it.

    Must run before anything imports prefect: Prefect reads these settings at import.
    """
    from connectors.prefect_server import ensure_prefect_server

    settings = get_settings()
    if "prefect" in sys.modules and os.environ.get("PREFECT_API_URL") is None:
        raise RuntimeError("use_local_prefect() must run before prefect is imported")
    url = os.environ.get("PREFECT_API_URL") or ensure_prefect_server(settings.home, settings.prefect_port)
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect"))
    # Run logs still reach the Prefect server (the UI shows them); the terminal shows our own output.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "connectors")  # backend logs in the run's log
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    return url


def _fail(exc: Exception) -> None:
    """One line on stderr; exit 1 when a well-formed request could not be served (no route, no
    capacity, a service down), 2 when the input itself was wrong or its tenant's covenant refused it."""
    errors.print(f"[bold red]error:[/] {exc}", highlight=False)
    served = isinstance(exc, HomeskilletError) and not isinstance(exc, InvalidRequest | CovenantViolation)
    raise typer.Exit(1 if served else 2)


class Interrupted(Exception):
    """SIGTERM or SIGINT cancelled the run."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def run_until_signalled(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on an event loop in a thread of its own and return its result; SIGTERM or SIGINT
    cancels it at its current await instead, so that the flow's rollback hooks release what it
    holds and the run is not left Running, then raises Interrupted.

    The loop runs outside the main thread because Prefect's flow engine replaces the main thread's
    SIGTERM handler with one that raises wherever the thread happens to be; here both signals reach
    this handler alone. A second signal while the cancellation unwinds is ignored, so that it
    cannot cut the releases short.
    """
    loop = asyncio.new_event_loop()
    main = loop.create_task(coro)
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        if not received and not main.done():
            received.append(signum)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to cancel
                loop.call_soon_threadsafe(main.cancel)

    def drive() -> None:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            runner.run(asyncio.wait([main]))

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker = threading.Thread(target=drive, name="homeskillet-run")
        worker.start()
        worker.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if main.cancelled() and received:
        raise Interrupted(received[0])
    return main.result()


def run_flows(coro: Coroutine[Any, Any, T], what: str = "the work") -> T:
    """What every command that runs flows in this process runs them with: `run_until_signalled`,
    and on SIGTERM or SIGINT one line ("… `what` was cancelled") and exit 128 + the signal's number."""
    try:
        return run_until_signalled(coro)
    except Interrupted as exc:
        errors.print(f"[bold red]error:[/] {exc}: {what} was cancelled", highlight=False)
        raise typer.Exit(128 + exc.signum) from None


@app.command()
def run(
    prompt: Annotated[str, typer.Argument(help="The request, e.g. a multi-part question.")],
    tenant: Annotated[str, typer.Option(help="Tenant the request belongs to.")] = "demo",
    as_json: Annotated[bool, typer.Option("--json", help="Print the fusion result as JSON.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per fragment.")] = 128,
    max_cost: Annotated[float | None, typer.Option(help="Upper bound on estimated cost, US$.")] = None,
    model: Annotated[list[str] | None, typer.Option(help="Allowed model (repeatable).")] = None,
    tier: Annotated[str | None, typer.Option(help="dedicated or preemptible.")] = None,
    pool: Annotated[str | None, typer.Option(help="Run every fragment on this pool.")] = None,
    backend: Annotated[str, typer.Option(help="local or hostedai.")] = "local",
    fallback_backend: Annotated[str | None, typer.Option(help="Used while the backend's circuit is open.")] = None,
    on_preemption: Annotated[str, typer.Option(help="same_tier or dedicated.")] = "same_tier",
    strategy: Annotated[str, typer.Option(help="single, cascade, ensemble, moa or auto.")] = "single",
    split: Annotated[bool, typer.Option(help="--no-split keeps the prompt as one fragment.")] = True,
    task_type: Annotated[str | None, typer.Option(help="Declare the task type instead of classifying.")] = None,
    routing_stats: Annotated[
        str | None, typer.Option(help="Learned routing figures (homeskillet learn-routing) to route by.")
    ] = None,
) -> None:
    """Run one request through the fuse_request flow and print the fused answer."""
    constraints = {
        "max_tokens": max_tokens,
        "max_cost_usd": max_cost,
        "allowed_models": model,
        "tier": tier,
        "pool": pool,
        "backend": backend,
        "fallback_backend": fallback_backend,
        "on_preemption": on_preemption,
        "split": split,
        "task_type": task_type,
    }
    try:
        api_url = use_local_prefect()
        from flows.fusion import fuse_request
        from tasks import runtime

        async def main():
            try:
                return await fuse_request(
                    prompt=prompt,
                    tenant=tenant,
                    strategy=strategy,
                    constraints=constraints,
                    routing_stats=routing_stats,
                    return_state=True,
                )
            finally:
                await runtime.shutdown()  # this process ends: give back subscriptions and model servers

        state = run_flows(main(), "the request")
        result = state.result()
    except HomeskilletError as exc:
        _fail(exc)
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    from flows.fusion import fragment_row

    console.print(result.answer, highlight=False, markup=False)
    table = Table(title=f"request {result.request_id} · tenant {result.tenant} · fusion {result.fusion}")
    rows = [fragment_row(r) for r in result.fragments]
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(f"{v:.8f}" if key == "cost_usd" else str(v) for key, v in row.items()))
    console.print(table)
    ui = api_url.removesuffix("/api")
    console.print(
        f"total ${result.cost_usd:.8f} in {result.wall_s:.2f}s · flow run {ui}/runs/flow-run/{state.state_details.flow_run_id}"
    )


@app.command()
def allocations(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's allocations.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the allocations held now (expired leases are ended first)."""
    from tasks import runtime

    try:
        held = asyncio.run(runtime.services().held(tenant))
    except HomeskilletError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([a.model_dump(mode="json") for a in held], indent=2))
        return
    table = Table(title=f"{len(held)} allocation(s) held")
    for column in (
        "allocation_id",
        "tenant",
        "backend",
        "pool",
        "model",
        "tflops",
        "vram_gb",
        "endpoint",
        "lease_expires_at",
    ):
        table.add_column(column, overflow="fold")
    for a in held:
        table.add_row(
            a.allocation_id,
            a.tenant,
            a.backend,
            a.pool,
            a.model,
            f"{a.tflops:g}",
            f"{a.vram_gb:g}",
            a.endpoint,
            a.lease_expires_at.isoformat(timespec="seconds"),
        )
    console.print(table)


covenant_app = typer.Typer(help="Tenants' covenants: their terms and what they use now.", no_args_is_help=True)
app.add_typer(covenant_app, name="covenant")


@covenant_app.command("show")
def covenant_show(
    tenant: Annotated[str, typer.Argument(help="The catalog tenant.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """The tenant's covenant (version, terms) and its usage now: held slices, TFLOPS and VRAM held,
    spend today and this month, requests running."""
    from tasks import runtime

    try:
        services = runtime.services()
        covenant = services.covenant(tenant)

        async def usage():
            return await (await services.ledger()).usage(tenant)

        shown = {
            "tenant": tenant,
            "version": covenant.version,
            "terms": covenant.terms(),
            "usage": asyncio.run(usage()),
        }
    except HomeskilletError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    table = Table(title=f"covenant of tenant {tenant} · version {covenant.version}")
    table.add_column("term")
    table.add_column("limit")
    for term, limit in shown["terms"].items():
        table.add_row(term, ", ".join(limit) if isinstance(limit, list) else f"{limit:g}")
    if not shown["terms"]:
        table.add_row("(none)", "unlimited")
    console.print(table)
    console.print(", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown["usage"].items()))


@server_app.command("start")
def server_start() -> None:
    """Start (or reuse) PostgreSQL and the Prefect server; print the API URL."""
    from connectors.prefect_server import ensure_prefect_server

    settings = get_settings()
    try:
        url = ensure_prefect_server(settings.home, settings.prefect_port)
    except HomeskilletError as exc:
        _fail(exc)
    console.print(f"Prefect API {url} · UI {url.removesuffix('/api')} · state {settings.home}")
    console.print(f"export PREFECT_API_URL={url}", highlight=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the model servers, the Prefect server and PostgreSQL."""
    from connectors.model_server import ModelServers
    from connectors.prefect_server import stop_prefect_server

    settings = get_settings()
    models = ModelServers(settings.home, settings.model_idle_s).stop_all()
    console.print(f"model servers stopped: {', '.join(models)}" if models else "no model server was running")
    stopped = stop_prefect_server(settings.home)
    console.print("stopped" if stopped else "no Prefect server was running (PostgreSQL stopped if it ran)")


@server_app.command("status")
def server_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """The Prefect server, PostgreSQL and each model server; exit 1 when the Prefect server is down."""
    from connectors import postgres
    from connectors.model_server import ModelServers
    from connectors.prefect_server import running_server

    settings = get_settings()
    info = running_server(settings.home)
    try:
        pg_socket: str | None = str(postgres.socket_dir(settings.pgdata))
    except HomeskilletError:
        pg_socket = None
    servers = ModelServers(settings.home, settings.model_idle_s)
    models = [
        {
            "model": r.model,
            "pid": r.server_pid,
            "supervisor_pid": r.pid,
            "port": r.port,
            "endpoint": r.endpoint,
            "slots": r.slots,
            "up_s": round(time.time() - r.since, 1),
            "idle_s": round(servers.idle_seconds(r), 1),
            "stops_when_idle_s": r.idle_s,
        }
        for r in servers.running()
    ]
    status = {
        "prefect": {"pid": info.pid, "api_url": info.api_url} if info else None,
        "postgres": {"socket": pg_socket} if pg_socket else None,
        "model_servers": models,
    }
    if as_json:
        print(json.dumps(status))
    else:
        console.print(f"prefect: {f'running, pid {info.pid}, {info.api_url}' if info else 'stopped'}")
        console.print(f"postgres: {'running, socket ' + pg_socket if pg_socket else 'stopped'}")
        if not models:
            console.print("model servers: none running")
        for m in models:
            console.print(
                f"model server {m['model']}: pid {m['pid']}, {m['endpoint']}, {m['slots']} slots, "
                f"up {m['up_s']:.0f}s, idle {m['idle_s']:.0f}s (stops at {m['stops_when_idle_s']:g}s)"
            )
    if info is None:
        raise typer.Exit(1)


@server_app.command("check")
def server_check() -> None:
    """The set-up's smoke check: one multi-token chat completion on a fresh llama-server."""
    from connectors.model_server import check_build, gguf_path, llama_server_binary
    from homeskillet.catalog import load_catalog

    settings = get_settings()
    try:
        binary = llama_server_binary(settings.llama_server)
        spec = next(m for m in load_catalog(settings.catalog).models if m.serving.kind == "llama_cpp")
        answer = check_build(binary, gguf_path(spec.serving, settings.home / "models"))
    except HomeskilletError as exc:
        errors.print(f"[bold red]llama-server smoke check failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"llama-server smoke check passed ({binary}, {spec.name}): {answer.strip()!r}")


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8700,
    faults: Annotated[str, typer.Option(help="e.g. error_rate=0.2,preempt_rate=0.1,latency_s=0.05")] = "",
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 in a container).")] = "127.0.0.1",
) -> None:
    """Run the hosted·ai emulator; its OpenAPI document is at /openapi.json."""
    import uvicorn

    from doubles.hostedai_emulator import Faults, create_app, default_config

    try:
        config = default_config().model_copy(update={"faults": Faults.parse(faults)})
    except ValueError as exc:
        _fail(exc)
    url = f"http://{host}:{port}"
    table = Table(title=f"hosted·ai emulator at {url} (API {url}/openapi.json) · emulator-only keys")
    for column in ("tenant", "team_id", "api_key"):
        table.add_column(column)
    for team in config.teams:
        table.add_row(team.name, team.id, team.api_key)
    console.print(table)
    demo = config.teams[0]
    console.print(
        f"export HOMESKILLET_HOSTEDAI_URL={url} HOMESKILLET_HOSTEDAI_TEAM_ID={demo.id} "
        f"HOMESKILLET_HOSTEDAI_API_KEY={demo.api_key}",
        highlight=False,
    )
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")


@app.command()
def credentials(
    tenant: Annotated[str, typer.Option(help="Tenant whose hosted·ai team this is.")],
    url: Annotated[str, typer.Option(help="hosted·ai API base URL.")],
    team_id: Annotated[str, typer.Option(help="hosted·ai team id.")],
    auth_header: Annotated[str, typer.Option(help="x-api-key or bearer.")] = "x-api-key",
) -> None:
    """Store a tenant's hosted·ai key as the Prefect Secret block hostedai-<tenant> (key read from a prompt)."""
    api_key = typer.prompt("hosted·ai API key", hide_input=True)
    try:
        use_local_prefect()
        from homeskillet.schemas import HostedAICredentials
        from tasks.credentials import block_name, save_hostedai_credentials

        creds = HostedAICredentials(url=url, api_key=api_key, team_id=team_id, auth_header=auth_header)
        asyncio.run(save_hostedai_credentials(tenant, creds))
    except HomeskilletError as exc:
        _fail(exc)
    console.print(f"saved Secret block {block_name(tenant)!r}")


@app.command()
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
        _fail(exc)
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


@app.command("cost-report")
def cost_report(since_days: Annotated[int, typer.Option(help="Telemetry of the last N days.")] = 7) -> None:
    """Run the cost report flow here and print the report."""
    try:
        use_local_prefect()
        from flows.cost_report import cost_report as cost_flow

        path = run_flows(cost_flow(since_days=since_days))
    except HomeskilletError as exc:
        _fail(exc)
    console.print(open(path).read(), markup=False, highlight=False)
    console.print(f"written to {path}")


@app.command("train-classifier")
def train_classifier(
    routerbench: Annotated[str, typer.Option(help="Folder of RouterBench CSVs.")] = "../shared/data/routerbench",
    out: Annotated[str | None, typer.Option(help="Weights file to write.")] = None,
    folds: Annotated[int, typer.Option(help="Folds of the cross-validation printed first.")] = 5,
) -> None:
    """Train the request classifier on the seed examples and RouterBench prompts; print k-fold accuracy."""
    from pathlib import Path

    from tasks.classifier import WEIGHTS, cross_validate, train, training_examples

    texts, labels = training_examples(Path(routerbench))
    scores = cross_validate(texts, labels, folds)
    table = Table(title=f"{folds}-fold cross-validated accuracy on {len(texts)} examples")
    table.add_column("label")
    table.add_column("accuracy")
    for label, score in scores.items():
        table.add_row(label, f"{score:.3f}")
    console.print(table)
    path = Path(out) if out else WEIGHTS
    train(texts, labels).save(path)
    console.print(f"weights written to {path} ({path.stat().st_size // 1024} KiB)")


@app.command("eval-routing")
def eval_routing(
    files: Annotated[list[str], typer.Argument(help="RouterBench-format CSV files.")],
    strategy: Annotated[str, typer.Option(help="single, cascade, ensemble, moa or auto.")] = "cascade",
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line of the figures.")] = False,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds.")] = 5,
    model: Annotated[list[str] | None, typer.Option(help="Allowed model (repeatable).")] = None,
    through_flow: Annotated[
        bool, typer.Option("--through-flow", help="Run every record as a fuse_request flow run (local Prefect server).")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Decide only the first N records of each file.")] = None,
    budget_share: Annotated[
        float, typer.Option(min=0.0, help="A learned cascade may cost this share of the best model's mean cost.")
    ] = 0.25,
) -> None:
    """Replay every record through a routing strategy (k-fold), against every single model and the oracle."""
    from pathlib import Path

    from connectors import recordings
    from tasks.decompose import classify as task_of
    from tasks.evaluation import combine, evaluate, oracle, single_models
    from tasks.strategies import check_strategy

    try:
        check_strategy(strategy)
        loaded = {
            Path(f).stem: recordings.load(Path(f), task_of) for f in files
        }  # all inputs checked before any output
        if through_flow:
            use_local_prefect()
            from flows.eval_routing import evaluate_through_flow
        figures = {}
        for name, records in loaded.items():
            if through_flow:
                workdir = get_settings().home / "eval-routing" / name
                score, _ = run_flows(
                    evaluate_through_flow(records, strategy, workdir, folds, model, limit, budget_share)
                )
            else:
                score, _ = evaluate(records, strategy, folds, model, limit, budget_share)
            decided = records[:limit]
            singles = single_models(decided)
            best = max(singles, key=lambda m: (singles[m].accuracy, -singles[m].cost))
            figures[name] = (len(decided), score, singles, best, oracle(decided))
    except HomeskilletError as exc:
        _fail(exc)
    how = "through fuse_request" if through_flow else "in process"
    for name, (n, score, singles, best, orc) in figures.items():
        console.print(
            _routing_table(
                f"{name}: {n} records, strategy {strategy}, {folds}-fold, {how}", strategy, score, orc, singles, best
            )
        )
    parts = list(figures.values())
    overall = combine([(n, s) for n, s, *_ in parts])
    if len(parts) > 1:
        shared = set.intersection(*(set(singles) for _, _, singles, _, _ in parts))
        singles = {m: combine([(n, singles[m]) for n, _, singles, _, _ in parts]) for m in shared}
        best = max(singles, key=lambda m: (singles[m].accuracy, -singles[m].cost))
        console.print(
            _routing_table(
                f"overall: {sum(n for n, *_ in parts)} records",
                strategy,
                overall,
                combine([(n, o) for n, *_, o in parts]),
                singles,
                best,
            )
        )
    console.print(f"overall: accuracy {overall.accuracy:.3f}, cost ${overall.cost:.4f}")
    if as_json:
        print(
            json.dumps(
                {
                    "files": {
                        name: {
                            "accuracy": s.accuracy,
                            "cost": s.cost,
                            "best_single": {"model": b, "accuracy": singles[b].accuracy, "cost": singles[b].cost},
                            "oracle": {"accuracy": o.accuracy, "cost": o.cost},
                        }
                        for name, (_, s, singles, b, o) in figures.items()
                    },
                    "overall": {"accuracy": overall.accuracy, "cost": overall.cost},
                }
            )
        )


def _routing_table(title: str, strategy: str, score, orc, singles: dict, best: str) -> Table:
    """A strategy's accuracy and cost beside the oracle's and every single model's."""
    table = Table(title=title)
    for column in ("router", "accuracy", "cost_usd"):
        table.add_column(column)
    table.add_row(f"[bold]{strategy}[/]", f"{score.accuracy:.3f}", f"{score.cost:.4f}")
    table.add_row("oracle", f"{orc.accuracy:.3f}", f"{orc.cost:.4f}")
    for m, single in sorted(singles.items(), key=lambda kv: -kv[1].accuracy):
        table.add_row(m + (" (best single)" if m == best else ""), f"{single.accuracy:.3f}", f"{single.cost:.4f}")
    return table


@app.command("learn-routing")
def learn_routing(
    files: Annotated[list[str], typer.Argument(help="RouterBench-format CSV files.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Where to write the routing-stats JSON.")],
    budget_share: Annotated[
        float, typer.Option(min=0.0, help="A learned cascade may cost this share of the best model's mean cost.")
    ] = 0.25,
) -> None:
    """Learn quality and cost per task type and model, and each task type's cascade, from records."""
    from pathlib import Path

    from connectors import recordings
    from tasks.decompose import classify as task_of
    from tasks.evaluation import fit

    try:
        records = [r for f in files for r in recordings.load(Path(f), task_of)]
        stats = fit(records, budget_share)
    except HomeskilletError as exc:
        _fail(exc)
    stats.save(Path(out))
    for task, quality in stats.quality.items():
        table = Table(title=f"{task}: {sum(r.task == task for r in records)} records")
        for column in ("model", "quality", "mean_cost_usd"):
            table.add_column(column)
        for m, q in sorted(quality.items(), key=lambda kv: -kv[1]):
            table.add_row(m, f"{q:.3f}", f"{stats.cost[task][m]:.6f}")
        console.print(table)
        if task in stats.plans:
            console.print(f"cascade for {task}: {stats.plans[task].describe()}")
    console.print(f"routing stats written to {out}")


@app.command("bench-overhead")
def bench_overhead(
    repeats: Annotated[int, typer.Option(min=1, help="Runs of each side.")] = 3,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per fragment.")] = 48,
    concurrency: Annotated[int, typer.Option(min=1, help="Single-fragment requests at once, in the second part.")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line of the headline figures.")] = False,
) -> None:
    """Orchestration overhead: the same fragments through fuse_request and as direct llama.cpp calls,
    one request at a time and CONCURRENCY at once."""
    try:
        use_local_prefect()
        from apps.overhead import report, run_benchmark, summary_line

        figures = run_flows(run_benchmark(repeats=repeats, max_tokens=max_tokens, concurrency=concurrency))
    except HomeskilletError as exc:
        _fail(exc)
    console.print(report(figures), highlight=False, markup=False)
    if as_json:
        print(summary_line(figures))


@app.command()
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
    as_json: Annotated[bool, typer.Option("--json", help="End with one JSON line of the figures.")] = False,
) -> None:
    """Load through the real flow from several tenants, checking capacity, isolation, leaks and
    hosted·ai subscriptions while it runs; exit 1 if any of them broke."""
    try:
        use_local_prefect()
        from apps.loadtest import report, run_load, summary, violated

        figures = run_flows(
            run_load(requests, concurrency, tenants, backend, faults, max_tokens, recordings=recordings)
        )
    except HomeskilletError as exc:
        _fail(exc)
    console.print(report(figures), highlight=False, markup=False)
    if as_json:
        print(summary(figures))
    if violated(figures):
        raise typer.Exit(1)


@app.command("bench-workers")
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
        _fail(ValueError(f"--workers must be numbers separated by commas, not {workers!r}"))
    try:
        api_url = use_local_prefect()
        from apps.scaling import run_scaling

        rows = run_flows(
            run_scaling(
                api_url, counts, requests, limit, max_tokens, get_settings().home / "logs" / "bench-workers", recordings
            )
        )
    except HomeskilletError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    answers = f"recordings {recordings.name}" if recordings else f"local models, max_tokens {max_tokens}"
    table = Table(title=f"{requests} requests per row through the fuse-request deployment, {answers}")
    for column in ("workers", "limit", "completed", "rps", "latency_p50_s", "latency_p95_s", "wall_s"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(str(row[c]) for c in ("workers", "limit", "completed", "rps", "latency_p50_s", "latency_p95_s", "wall_s"))
        )
    console.print(table)


@app.command("isolation-report")
def isolation_report(
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Try every way tenant globex could reach tenant acme's work, locally and on hosted·ai (the
    emulator, lent to both for the run); exit 1 unless all are refused (the operator's surfaces
    are listed as such)."""
    try:
        use_local_prefect()
        from apps.isolation import OPERATOR, broken, run_attacks

        rows = run_flows(run_attacks())
    except HomeskilletError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([vars(r) for r in rows], indent=2))
    else:
        table = Table(title=f"isolation: {sum(r.result == 'refused' for r in rows)} of {len(rows)} attacks refused")
        for column in ("attack", "path", "result", "detail"):
            table.add_column(column, overflow="fold")
        for r in rows:
            style = "green" if r.result in ("refused", "n/a", OPERATOR) else "bold red"
            table.add_row(r.attack, r.path, f"[{style}]{r.result}[/]", r.detail)
        console.print(table)
    if broken(rows):
        raise typer.Exit(1)


@app.command()
def classify(
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify; none: one per line of stdin.")] = None,
    engine: Annotated[
        str, typer.Option(help="wasm (edge/classifier.wasm via wasmtime, as the flow) or python (the reference).")
    ] = "wasm",
    as_json: Annotated[
        bool, typer.Option("--json", help='One {"label", "probabilities"} object per line, numbers exact.')
    ] = False,
) -> None:
    """Classify requests by task type: one line per input (label and its probability, or JSON)."""
    if engine not in ("wasm", "python"):
        _fail(ValueError(f"--engine must be wasm or python, not {engine!r}"))
    from tasks.edge_classifier import to_json

    if engine == "wasm":
        from tasks.edge_classifier import wasm_classifier

        model = wasm_classifier()
    else:
        from tasks.classifier import Classifier

        model = Classifier.load()
    # arguments and stdin lines go to the classifier as the bytes they are (invalid UTF-8 included)
    inputs = (os.fsencode(t) for t in texts) if texts else (line.rstrip(b"\n") for line in sys.stdin.buffer)
    out = sys.stdout
    for data in inputs:
        probs = model.probabilities(data)
        label = max(probs, key=probs.get)
        out.write((to_json(label, probs) if as_json else f"{label}\t{probs[label]!r}") + "\n")
        out.flush()


mcp_app = typer.Typer(help="The MCP server: Streamable HTTP at /mcp, WebSocket at /ws.", no_args_is_help=True)
app.add_typer(mcp_app, name="mcp")
tokens_app = typer.Typer(help="API tokens of the MCP server, one tenant each (stored hashed).", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@mcp_app.command("serve")
def mcp_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    catalog: Annotated[
        str | None, typer.Option(help="Catalog file (default: HOMESKILLET_CATALOG or packaged).")
    ] = None,
    max_concurrent: Annotated[
        int | None,
        typer.Option(min=1, help="Concurrent fuse calls per tenant (default: HOMESKILLET_MCP_MAX_CONCURRENT, else 2)."),
    ] = None,
) -> None:
    """Serve MCP (tools fuse, plan, classify, allocations) to clients holding a token."""
    api_url = use_local_prefect()
    import uvicorn

    from apps.mcp_server import create_app

    errors.print(f"MCP on http://{host}:{port}/mcp and ws://{host}:{port}/ws · Prefect {api_url}", highlight=False)
    uvicorn.run(
        create_app(catalog, host=host, max_concurrent=max_concurrent),
        host=host,
        port=port,
        log_level="warning",
        ws_max_size=4 << 20,  # the app answers frames over 1 MiB with a JSON-RPC error; this is the hard stop
    )


def _token_store():
    from connectors.tokens import TokenStore

    return TokenStore.open(get_settings().pgdata)


@tokens_app.command("create")
def tokens_create(
    tenant: Annotated[str, typer.Option(help="The catalog tenant the token acts as.")],
    as_json: Annotated[bool, typer.Option("--json", help='Print {"tenant", "token"}.')] = False,
) -> None:
    """Create a token for a tenant; it is printed once and only its hash is stored."""
    from homeskillet import catalog as cat
    from tasks import runtime

    try:
        cat.check_tenant(runtime.catalog(), tenant)

        async def main():
            return await (await _token_store()).create(tenant)

        token_id, token = asyncio.run(main())
    except HomeskilletError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({"tenant": tenant, "token": token, "token_id": token_id}))
        return
    print(token)
    errors.print(f"token {token_id} for tenant {tenant}; shown once, store it now", highlight=False)


@tokens_app.command("list")
def tokens_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's tokens.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List tokens (id, tenant, created, revoked); never the tokens themselves."""
    from connectors.tokens import created_iso

    async def main():
        return await (await _token_store()).list(tenant)

    try:
        rows = [
            {
                "token_id": r["token_id"],
                "tenant": r["tenant"],
                "created_at": created_iso(r["created_at"]),
                "revoked_at": created_iso(r["revoked_at"]),
            }
            for r in asyncio.run(main())
        ]
    except HomeskilletError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{len(rows)} token(s)")
    for column in ("token_id", "tenant", "created_at", "revoked_at"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["token_id"], r["tenant"], r["created_at"], r["revoked_at"] or "")
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token: Annotated[str, typer.Argument(help="The token id (tok-…) or the token itself.")]) -> None:
    """Revoke a token: the server refuses it from the next connection or request on."""

    async def main():
        return await (await _token_store()).revoke(token)

    try:
        revoked = asyncio.run(main())
    except HomeskilletError as exc:
        _fail(exc)
    if not revoked:
        _fail(ValueError("no live token matches"))
    errors.print("revoked", highlight=False)


if __name__ == "__main__":
    app()
