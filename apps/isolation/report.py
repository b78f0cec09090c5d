"""The report's rows, and what the attack groups share: the tenants, the work they attack, the
accumulator that turns an attempt and its control into a row, and a copy of the catalog to bend."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from apps.isolation.hostedai import Hosted
    from connectors.tokens import TokenStore
    from homeskillet.schemas import Allocation
    from tasks.runtime import Services

A, B = "acme", "globex"  # A owns the work, B attacks it
# What is not refused but is not a tenant's way in either: docs/operating.md documents it as the operator's.
OPERATOR = "operator surface"


@dataclass
class Attack:
    attack: str
    path: str
    result: str  # "refused", "ALLOWED" (the guarantee broke), "control failed" (the test is void), "n/a", OPERATOR
    detail: str = ""


class Report:
    def __init__(self) -> None:
        self.rows: list[Attack] = []

    def check(self, attack: str, path: str, refused: bool, control: bool = True, detail: str = "") -> None:
        result = "control failed" if not control else ("refused" if refused else "ALLOWED")
        self.rows.append(Attack(attack, path, result, detail))


@dataclass
class Target:
    """A's work that B attacks, and what each tenant attacks with."""

    services: Services
    catalog_path: str | None
    store: TokenStore
    tokens: dict[str, str]  # tenant → its MCP token
    allocation: Allocation  # A's slice on the local backend
    request_id: str  # A's request: the slice's, and a finished result in the store
    hosted: Hosted | None = None  # A's and B's work on hosted·ai, while a group that needs it runs


def broken(rows: list[Attack]) -> bool:
    return any(r.result not in ("refused", "n/a", OPERATOR) for r in rows)


async def attempt(call: Awaitable, *errors: type[BaseException]) -> tuple[bool, str, object]:
    """(refused, what was said, what came back) for one attempt."""
    try:
        value = await call
    except errors as exc:
        return True, str(exc), None
    return False, "done", value


@contextlib.contextmanager
def catalog_with(services, covenant_of_b: dict | None = None, extra_tenants: tuple[str, ...] = ()):
    """A copy of the catalog (a temporary file) with B's covenant replaced and tenants added."""
    data = yaml.safe_load(services.catalog_path.read_text())
    for tenant in data["tenants"]:
        if tenant["id"] == B and covenant_of_b is not None:
            tenant["covenant"] = covenant_of_b
    data["tenants"] += [{"id": t} for t in extra_tenants]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "catalog.yaml"
        path.write_text(yaml.safe_dump(data))
        yield path
