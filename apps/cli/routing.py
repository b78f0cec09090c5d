"""Commands that measure and learn routing from recorded answers (RouterBench-format files):
`eval-routing` replays a strategy and sets it beside every single model and the oracle,
`learn-routing` writes the figures a run can route by, `train-classifier` trains the request
classifier. The figures come from `tasks.evaluation` and `tasks.classifier`; this module prints them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from apps.cli.running import console, fail, run_flows, use_local_prefect
from homeskillet.errors import HomeskilletError, InvalidRequest
from homeskillet.settings import RECORDINGS, get_settings

if TYPE_CHECKING:  # the commands import the layers below only when they run: --help stays quick
    from tasks.evaluation import Comparison


def train_classifier(
    routerbench: Annotated[
        Path, typer.Option(exists=True, file_okay=False, help="Folder of RouterBench CSVs.")
    ] = RECORDINGS,
    out: Annotated[str | None, typer.Option(help="Weights file to write.")] = None,
    folds: Annotated[int, typer.Option(help="Folds of the cross-validation printed first.")] = 5,
) -> None:
    """Train the request classifier on the seed examples and RouterBench prompts; print k-fold accuracy."""
    from tasks.classifier import WEIGHTS, cross_validate, train, training_examples

    texts, labels = training_examples(routerbench)
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


def eval_routing(
    files: Annotated[list[str], typer.Argument(help="RouterBench-format CSV files (the test files, with --train).")],
    strategy: Annotated[str, typer.Option(help="single, cascade, ensemble, moa, auto or learned.")] = "cascade",
    train: Annotated[
        list[str] | None,
        typer.Option(
            help="Training file (repeatable): fit on these only and score FILES held out; without it, k-fold."
        ),
    ] = None,
    quality_cost: Annotated[
        float | None, typer.Option(min=0.0, help="The learned router's trade-off λ; default: the one chosen on train.")
    ] = None,
    png: Annotated[str | None, typer.Option(help="Where the held-out chart goes (default: beside the home's).")] = None,
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
    """Replay every record through a routing strategy, against every single model and the oracle:
    k-fold within FILES, or (--train) fitted on the training files and scored on FILES held out."""
    from connectors import recordings
    from tasks.decompose import classify as task_of
    from tasks.evaluation import compare, evaluate, overall
    from tasks.strategies import check_strategy

    cache = get_settings().home / "cache"
    if train:
        return _eval_held_out(files, train, strategy, as_json, model, budget_share, quality_cost, png, cache)
    try:
        check_strategy(strategy)
        loaded = {
            Path(f).stem: recordings.load(Path(f), task_of) for f in files
        }  # all inputs checked before any output
        if through_flow:
            use_local_prefect()
            from flows.eval_routing import evaluate_through_flow
        figures: dict[str, Comparison] = {}
        for name, records in loaded.items():
            if through_flow:
                workdir = get_settings().home / "eval-routing" / name
                score, _ = run_flows(
                    evaluate_through_flow(records, strategy, workdir, folds, model, limit, budget_share)
                )
            else:
                score, _ = evaluate(records, strategy, folds, model, limit, budget_share, cache, quality_cost)
            figures[name] = compare(records, score, limit)
    except HomeskilletError as exc:
        fail(exc)
    how = "through fuse_request" if through_flow else "in process"
    for name, figure in figures.items():
        console.print(
            _routing_table(
                f"{name}: {figure.records} records, strategy {strategy}, {folds}-fold, {how}", strategy, figure
            )
        )
    total = overall(list(figures.values()))
    if len(figures) > 1:
        console.print(_routing_table(f"overall: {total.records} records", strategy, total))
    console.print(f"overall: accuracy {total.score.accuracy:.3f}, cost ${total.score.cost:.4f}")
    if as_json:
        print(json.dumps(_figures_json(figures, total)))


def _eval_held_out(
    files: list[str],
    train: list[str],
    strategy: str,
    as_json: bool,
    model: list[str] | None,
    budget_share: float,
    quality_cost: float | None,
    png: str | None,
    cache: Path,
) -> None:
    """eval-routing --train: fit on the training files only, score each test file and all pooled."""
    from connectors import recordings
    from tasks.decompose import classify as task_of
    from tasks.evaluation import chart, evaluate_held_out, held_out_report
    from tasks.strategies import check_strategy

    try:
        check_strategy(strategy)
        train_records = [r for f in train for r in recordings.load(Path(f), task_of)]
        tests = {Path(f).stem: recordings.load(Path(f), task_of) for f in files}
        test_records = [r for rs in tests.values() for r in rs]
        held = evaluate_held_out(train_records, test_records, strategy, model, budget_share, cache, quality_cost)
        report = held_out_report(train_records, tests, held)
    except HomeskilletError as exc:
        fail(exc)
    report.update(strategy=strategy, train=[Path(f).stem for f in train], test=list(tests))
    for name, scope in {**report["files"], "pooled": report["pooled"]}.items():
        console.print(
            _held_out_table(f"{name}: {scope['records']} held-out prompts, strategy {strategy}", strategy, scope)
        )
    path = Path(png) if png else get_settings().home / "eval-routing" / f"held-out-{strategy}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    chart(report, strategy, path)
    pooled = report["pooled"]
    console.print(
        f"pooled: accuracy {pooled['accuracy']:.3f}, cost ${pooled['cost']:.4f}, AIQ {pooled['aiq']:.3f} "
        f"(single models' hull {pooled['singles_hull_aiq']:.3f}); chart {path}"
    )
    if as_json:
        for scope in (*report["files"].values(), pooled):
            scope.pop("singles", None)
        print(json.dumps(report))


def _held_out_table(title: str, strategy: str, scope: dict) -> Table:
    """A test scope's figures: the strategy, the best single model, the oracle, AIQs, operating points."""
    table = Table(title=title)
    for column in ("router", "accuracy", "cost_usd", "note"):
        table.add_column(column)
    best = scope["best_single"]
    table.add_row(f"[bold]{strategy}[/]", f"{scope['accuracy']:.3f}", f"{scope['cost']:.4f}", f"AIQ {scope['aiq']:.3f}")
    table.add_row(f"best single: {best['model']}", f"{best['accuracy']:.3f}", f"{best['cost']:.4f}", "")
    table.add_row("oracle", f"{scope['oracle']['accuracy']:.3f}", f"{scope['oracle']['cost']:.4f}", "")
    table.add_row("single models' hull", "", "", f"AIQ {scope['singles_hull_aiq']:.3f}")
    if scope["curve"]:
        table.add_row("learned router over λ", "", "", f"AIQ {scope['curve_aiq']:.3f}")
    for name, point in scope["operating_points"].items():
        if point is None:
            table.add_row(name.replace("_", " "), "never", "", "chosen on train")
        else:
            table.add_row(
                name.replace("_", " "),
                f"{point['accuracy']:.3f}",
                f"{point['cost']:.4f}",
                f"λ={point['quality_cost']:.3g}, chosen on train",
            )
    return table


def _routing_table(title: str, strategy: str, figure: Comparison) -> Table:
    """A strategy's accuracy and cost beside the oracle's and every single model's."""
    table = Table(title=title)
    for column in ("router", "accuracy", "cost_usd"):
        table.add_column(column)
    table.add_row(f"[bold]{strategy}[/]", f"{figure.score.accuracy:.3f}", f"{figure.score.cost:.4f}")
    table.add_row("oracle", f"{figure.oracle.accuracy:.3f}", f"{figure.oracle.cost:.4f}")
    for m, single in sorted(figure.singles.items(), key=lambda kv: -kv[1].accuracy):
        table.add_row(
            m + (" (best single)" if m == figure.best else ""), f"{single.accuracy:.3f}", f"{single.cost:.4f}"
        )
    return table


def _figures_json(figures: dict[str, Comparison], total: Comparison) -> dict:
    """The line `eval-routing --json` ends with: per file the strategy, its best single model and
    the oracle; overall the strategy."""
    return {
        "files": {
            name: {
                "accuracy": f.score.accuracy,
                "cost": f.score.cost,
                "best_single": {
                    "model": f.best,
                    "accuracy": f.singles[f.best].accuracy,
                    "cost": f.singles[f.best].cost,
                },
                "oracle": {"accuracy": f.oracle.accuracy, "cost": f.oracle.cost},
            }
            for name, f in figures.items()
        },
        "overall": {"accuracy": total.score.accuracy, "cost": total.score.cost},
    }


def learn_routing(
    files: Annotated[list[str], typer.Argument(help="RouterBench-format CSV files.")],
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Also write the per-task routing-stats JSON here.")
    ] = None,
    router: Annotated[
        str | None,
        typer.Option(help="Where to write the learned router (default: the published default router in the home)."),
    ] = None,
    budget_share: Annotated[
        float, typer.Option(min=0.0, help="A learned cascade may cost this share of the best model's mean cost.")
    ] = 0.25,
    accept_confidence: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="A cascade accepts its first model's answer at this confidence."),
    ] = None,
) -> None:
    """Train the learned router (a correctness head and a cost model per model over prompt
    embeddings; its default λ and auto's λ per task type chosen out of fold) from records; with
    -o, also the per-task quality, cost and cascades."""
    from dataclasses import replace

    from connectors import recordings
    from tasks.decompose import classify as task_of
    from tasks.evaluation import fit, train_router
    from tasks.learned import published

    settings = get_settings()
    try:
        records = [r for f in files for r in recordings.load(Path(f), task_of)]
        if out and len({frozenset(r.responses) for r in records}) > 1:
            raise InvalidRequest("per-task figures (-o) need files that record the same models")
        learned = train_router(records, settings.home / "cache", budget_share)
        stats = fit(records, budget_share) if out else None
    except HomeskilletError as exc:
        fail(exc)
    learned = replace(learned, accept_confidence=accept_confidence)
    path = Path(router) if router else published(settings.routers)
    learned.save(path)
    if stats is not None:
        stats.save(Path(out))
        for task in stats.plans:
            console.print(f"cascade for {task}: {stats.plans[task].describe()}")
    table = Table(title=f"router heads: {len(records)} records")
    for column in ("model", "examples", "right", "cost ≈ a + b·chars"):
        table.add_column(column)
    for m, head in sorted(learned.heads.items(), key=lambda kv: -kv[1].accuracy):
        table.add_row(m, str(head.examples), f"{head.accuracy:.3f}", f"{head.cost[0]:.3g} + {head.cost[1]:.3g}·chars")
    console.print(table)
    for task, auto in sorted(learned.auto.items()):
        console.print(
            f"auto for {task}: "
            + (
                f"the learned router at λ={auto[0]:.3g}, margin {auto[1]:g} over single's model"
                if auto is not None
                else "single (the router did not beat it out of fold)"
            )
        )
    console.print(
        f"router written to {path} ({path.stat().st_size // 1024} KiB, {len(learned.heads)} models, "
        f"default λ={learned.quality_cost:.3g})" + (f"; routing stats written to {out}" if out else "")
    )
