"""hosted·ai and tenant isolation: run the hosted·ai `emulator`, store a tenant's hosted·ai
`credentials`, and the `isolation-report` (every way one tenant could reach another's work)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.table import Table

from apps.cli.running import console, fail, run_flows, use_local_prefect
from homeskillet.errors import HomeskilletError


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
        fail(exc)
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
        fail(exc)
    console.print(f"saved Secret block {block_name(tenant)!r}")


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
        fail(exc)
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
