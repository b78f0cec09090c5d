"""Commands about requests: `run` one through the fuse_request flow, list the `allocations` held
now, `classify` texts by task type as the flow's edge classifier does."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from apps.cli.running import console, fail, run_flows, use_local_prefect
from homeskillet.errors import HomeskilletError


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
    strategy: Annotated[str, typer.Option(help="single, cascade, ensemble, moa, auto or learned.")] = "single",
    quality_cost: Annotated[
        float | None,
        typer.Option(help="The learned router's trade-off λ: 0 the likeliest right model, larger cheaper ones."),
    ] = None,
    samples: Annotated[
        int, typer.Option(help="A cascade's first model answers this many times; accepted when most agree.")
    ] = 1,
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
        "quality_cost": quality_cost,
        "samples": samples,
    }
    try:
        api_url = use_local_prefect()  # first: Prefect reads its settings when it is imported
        from flows.fusion import fuse_request
        from tasks import runtime
        from tasks.preparation import make_request

        make_request(prompt, tenant, strategy, constraints)  # bad input is refused before a flow run exists

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
        fail(exc)
    if as_json:
        print(result.model_dump_json(indent=2))
        return
    from tasks.fusion import fragment_row

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


ALLOCATION_COLUMNS = (
    "allocation_id",
    "tenant",
    "backend",
    "pool",
    "model",
    "tflops",
    "vram_gb",
    "endpoint",
    "lease_expires_at",
)


def allocations(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's allocations.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List the allocations held now (expired leases are ended first)."""
    from tasks import runtime

    try:
        held = asyncio.run(runtime.services().held(tenant))
    except HomeskilletError as exc:
        fail(exc)
    if as_json:
        print(json.dumps([a.model_dump(mode="json") for a in held], indent=2))
        return
    table = Table(title=f"{len(held)} allocation(s) held")
    for column in ALLOCATION_COLUMNS:
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
        fail(ValueError(f"--engine must be wasm or python, not {engine!r}"))
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
