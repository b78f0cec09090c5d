"""What one request's fragments share: built once by the flow, handed down to every step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from homeskillet.schemas import Catalog, Constraints, Covenant, InferenceRequest, RouteRecord, TelemetryRecord
from tasks.learned import Router
from tasks.strategies import Stats

if TYPE_CHECKING:  # the pure routing core imports this module and stays Prefect-free
    from tasks.runtime import Services

MAX_CALLS = {
    "single": 1,
    "cascade": 3,
    "ensemble": 3,
    "moa": 4,
    "auto": 3,
    "learned": 1,
}  # model calls a strategy may make


@dataclass
class RunContext:
    request: InferenceRequest
    services: Services
    allowed: Catalog  # the catalog as the tenant's covenant allows it (`Services.catalog` is the whole one)
    log: logging.Logger | logging.LoggerAdapter
    budget_usd: float | None = None  # each fragment's share of max_cost_usd
    learned: Stats | None = None  # routing figures from a file (`homeskillet learn-routing`)
    records: list[TelemetryRecord] = field(default_factory=list)  # telemetry, written when the run ends
    covenant: Covenant = field(default_factory=Covenant)  # the tenant's, as it was when the request started
    covenant_terms: list[str] = field(default_factory=list)  # its terms that narrowed `catalog`
    stream: bool = False  # the request asks for its answer's text as it is made (`tasks.routing.Stream`)
    router: Router | None = None  # the learned router the tenant's requests route with (`tasks.learned`)
    routes: list[RouteRecord] = field(default_factory=list)  # its decisions, written when the run ends

    @property
    def constraints(self) -> Constraints:
        return self.request.constraints

    @property
    def per_call_usd(self) -> float | None:
        """What one model call of a fragment may spend: its budget over the strategy's most calls."""
        calls = MAX_CALLS[self.request.strategy]
        if self.request.strategy in ("cascade", "auto"):
            calls = max(calls, self.constraints.samples + 1)  # the samples of its first probe, then escalation
        return None if self.budget_usd is None else self.budget_usd / calls

    @property
    def wait_s(self) -> float:
        """How long an allocation waits for room in its pool."""
        wait = self.constraints.capacity_wait_s
        return self.services.settings.capacity_wait_s if wait is None else wait
