"""`covenant show`: a tenant's covenant (its version and terms) beside what the tenant uses now."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.table import Table

from apps.cli.running import console, fail
from homeskillet.errors import HomeskilletError


def show(
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
        fail(exc)
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
