"""`homeskillet feedback`: a tenant's score of one of its finished requests' answers (the whole
request's, or one fragment's), for the learning router to refit from (`connectors.feedback`)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from apps.cli.running import console, fail
from homeskillet.errors import HomeskilletError
from homeskillet.settings import get_settings


def feedback(
    request_id: Annotated[str, typer.Argument(help="The request's id, as its answer names it.")],
    score: Annotated[float, typer.Option(help="How right the answer was, from 0 (wrong) to 1 (right).")],
    fragment: Annotated[
        str | None, typer.Option(help="Rate this fragment's answer (f1, f2, …); none: the whole request's.")
    ] = None,
    tenant: Annotated[str, typer.Option(help="Tenant the request belongs to.")] = "demo",
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Rate a finished request's answer, or one fragment's; another tenant's request is refused
    as an unknown one."""
    from connectors.feedback import record_feedback

    settings = get_settings()
    try:
        record = record_feedback(settings.feedback, settings.telemetry, tenant, request_id, score, fragment)
    except HomeskilletError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(record.model_dump(mode="json"), indent=2))
        return
    what = f"fragment {record.fragment_id}" if record.fragment_id else "the whole request"
    console.print(
        f"recorded score {record.score:g} for {what} of request {record.request_id} · tenant {record.tenant} · "
        f"{record.ts.isoformat(timespec='seconds')}",
        highlight=False,
        markup=False,
    )
