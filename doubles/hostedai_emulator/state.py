"""The emulator's books: subscriptions and the state machine they go through.

A subscription is taken at once (its vGPUs count against the pool from the subscribe on), but the
API does not show it at once: it is missing from lists for `visibility_s`, then `subscribing`
until `activation_s`, then `active`. An unsubscribe is asynchronous: the item is `un_subscribing`
for `unsubscribe_s`, then `sweep` ends it. Ended subscriptions (unsubscribed or preempted) stay in
`history` with the pool-hours they ran, for the team metrics. Statuses are computed from the
monotonic clock at the moment of asking, never stored, so a list and the books cannot disagree.

`State` also holds the random draws of the fault model (one seeded `rng`, so a seeded run repeats
call for call) and counts what reached the emulator (`calls`) and which faults fired (`fired`),
which tests read to know that a fault really happened. Every change is made without an await in
between, so concurrent requests on the one event loop cannot interleave inside one.
"""

from __future__ import annotations

import collections
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from doubles.hostedai_emulator.accounts import EmulatorConfig, PoolConfig
from doubles.hostedai_emulator.faults import Faults


@dataclass
class Subscription:
    """One team's subscription to one pool; its one pod is `pod-<id>`."""

    id: int
    team_id: str
    pool_id: int
    vgpus: int
    created: float = field(default_factory=time.monotonic)
    unsubscribed: float | None = None
    services: list[dict[str, str]] = field(default_factory=list)
    started_wall: float = field(default_factory=time.time)
    # the secret part of the pod's service URLs: only the team learns them (connection-info), so
    # another team that sees the pod's name in a list still cannot call it
    service_key: str = field(default_factory=lambda: secrets.token_urlsafe(16))

    @property
    def pod_name(self) -> str:
        return f"pod-{self.id}"


class State:
    """All of the emulator's state; every change happens without an await in between."""

    def __init__(self, config: EmulatorConfig):
        self.config = config
        self.faults = config.faults
        self.rng = random.Random(config.faults.seed)
        self.keys = {t.api_key: t for t in config.teams}
        self.pools = {p.id: p for p in config.pools}
        self.subs: dict[int, Subscription] = {}
        self.history: list[dict[str, Any]] = []  # ended subscriptions, for team metrics
        self.next_id = 5000
        self.preempted = 0
        self.calls = 0  # API calls that reached the emulator
        self.calls_by_route: collections.Counter[str] = collections.Counter()  # "POST /pods/expose-service": n
        self.body_errors_sent = 0  # of the faults' body_error_reads
        self.fired: collections.Counter[str] = collections.Counter()  # faults injected, by kind

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)
        self.body_errors_sent = 0  # body_error_reads counts the reads from now on

    def fires(self, kind: str, rate: float) -> bool:
        """Draw whether a fault of `kind` happens this time, counting it in `fired` when it does; a
        rate of 0 draws nothing, so a fault that is off leaves the seeded sequence as it was."""
        if rate and self.rng.random() < rate:
            self.fired[kind] += 1
            return True
        return False

    def status(self, sub: Subscription, now: float) -> str | None:
        """None while the subscription is not yet (or no longer) visible."""
        if sub.unsubscribed is not None:
            return "un_subscribing" if now - sub.unsubscribed < self.faults.unsubscribe_s else None
        age = now - sub.created
        if age < self.faults.visibility_s:
            return None
        return "subscribing" if age < self.faults.activation_s else "active"

    def sweep(self, now: float | None = None) -> None:
        """Finish unsubscribes whose time has come (by `now`, when given: a list computed at that
        moment must not hide an item that the books still hold)."""
        now = time.monotonic() if now is None else now
        for sub in list(self.subs.values()):
            if sub.unsubscribed is not None and self.status(sub, now) is None:
                self._end(sub, "unsubscribed")

    def _end(self, sub: Subscription, how: str) -> None:
        self.subs.pop(sub.id, None)
        hours = (time.time() - sub.started_wall) / 3600
        self.history.append(
            {
                "subscription_id": sub.id,
                "team_id": sub.team_id,
                "pool_id": sub.pool_id,
                "vgpus": sub.vgpus,
                "pool_hours": round(sub.vgpus * hours, 6),
                "ended": how,
            }
        )

    def preempt(self, sub: Subscription) -> None:
        self.preempted += 1
        self.fired["preempt"] += 1
        self._end(sub, "preempted")

    def used_vgpus(self, pool_id: int) -> int:
        return sum(s.vgpus for s in self.subs.values() if s.pool_id == pool_id)

    def available(self, pool: PoolConfig) -> int:
        return pool.gpus * pool.sharing_ratio - self.used_vgpus(pool.id)

    def item(self, sub: Subscription, now: float) -> dict[str, Any]:
        status = self.status(sub, now)
        return {
            "id": sub.id,
            "pool_id": sub.pool_id,
            "team_id": sub.team_id,
            "status": status,
            "pods": [{"pod_name": sub.pod_name, "pod_status": "Running" if status == "active" else "Pending"}],
            "per_pod_info": {"vgpu_count": sub.vgpus, "vcpu_count": 4 * sub.vgpus, "ram_mb": 16384 * sub.vgpus},
            "metrics": {
                "tflops_usage": round(self.rng.uniform(0, 5), 3),
                "vram_usage": int(self.rng.uniform(0.1, 0.9) * 24 * 1024 * 1024),
                "pool_hours": round(sub.vgpus * (time.time() - sub.started_wall) / 3600, 6),
            },
        }
