"""Routing evaluation through the flow itself: RouterBench records as real `fuse_request` runs.

The replay provider serves the recorded answers over real HTTP on loopback; a replay catalog
names the 11 recorded models as OpenAI-compatible models behind it, on a zero-price pool, so
that what a request costs is what the provider reports: the recorded cost of each call. Each
fold's routing figures are learned from the other folds and handed to the flow as a
routing-stats file. A record is one request: its few-shot prompt is kept as one fragment and
its task type is declared, as an API caller that knows its task would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from connectors.processes import serve_in_thread
from connectors.recordings import Record, Recordings, load
from doubles.replay import create_app
from flows.fusion import fuse_request
from homeskillet.errors import InvalidRequest
from homeskillet.schemas import FusionResult
from tasks.decompose import classify
from tasks.evaluation import BUDGET, Score, check_models, fit, fold_fits, fold_of, score
from tasks.strategies import check_strategy

POOL = "replay"
TENANT = "demo"


def replay_catalog(models: list[str], base_url: str, tenants: Sequence[str] = (TENANT,)) -> dict:
    """A catalog whose models are the recorded ones, served by the replay provider at base_url."""
    return {
        "models": [
            {
                "name": m,
                "family": f"{m} (RouterBench recordings)",
                "parameters_m": 1,
                "context_length": 200_000,
                "prompt_style": "chat",
                "tflops": 0,
                "vram_gb": 0,
                "tokens_per_second": 1000,
                "task_types": {},
                "serving": {"kind": "openai", "base_url": base_url, "model": m},
            }
            for m in models
        ],
        "pools": [{"id": POOL, "tier": "dedicated", "tflops": 1000, "vram_gb": 1000, "price_per_hour": 0}],
        "tenants": [{"id": t, "description": "replayed recordings"} for t in tenants],
    }


@contextmanager
def serve_replay(records: list[Record]) -> Iterator[str]:
    """The replay provider on a free loopback port, in a thread of this process; yields its /v1 URL."""
    with serve_in_thread(create_app(Recordings(records)), "replay provider") as url:
        yield f"{url}/v1"


@dataclass(frozen=True)
class Replay:
    """What a run over the recordings needs: a catalog of the recorded models behind the replay
    provider, routing figures learned from the recordings, and the records themselves."""

    catalog_path: str
    routing_stats: str
    records: list[Record]

    def request(self, i: int, max_tokens: int) -> dict:
        """fuse_request's arguments for the i-th request (the records taken in turn)."""
        record = self.records[i % len(self.records)]
        return {
            "prompt": record.prompt,
            "constraints": {"split": False, "task_type": record.task, "max_tokens": max_tokens},
            "catalog_path": self.catalog_path,
            "routing_stats": self.routing_stats,
        }


@contextmanager
def replay_load(path: Path, tenants: Sequence[str], workdir: Path) -> Iterator[Replay]:
    """The recordings of a RouterBench file served on loopback for load and scaling runs: model
    calls cost no compute, so the figures are the orchestration's own (Prefect, the ledger, the
    flow). Records whose eval the file does not name are labelled by the request classifier."""
    records = load(path, classify)
    if not records:
        raise InvalidRequest(f"{path} holds no records")
    workdir.mkdir(parents=True, exist_ok=True)
    with serve_replay(records) as base_url:
        catalog = workdir / "replay-catalog.yaml"
        catalog.write_text(yaml.safe_dump(replay_catalog(sorted(records[0].responses), base_url, tenants)))
        stats = workdir / "routing-stats.json"
        fit(records).save(stats)
        yield Replay(str(catalog), str(stats), records)


async def evaluate_through_flow(
    records: list[Record],
    strategy: str,
    workdir: Path,
    folds: int = 5,
    allowed: list[str] | None = None,
    limit: int | None = None,
    budget_share: float = BUDGET,
    concurrency: int = 4,
) -> tuple[Score, list[FusionResult]]:
    """Like `tasks.evaluation.evaluate`, but every decided record is a `fuse_request` run; accuracy
    from the fused answers, cost from what the flow says each request cost."""
    check_strategy(strategy)
    allowed = check_models(records, allowed)
    workdir.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(concurrency)
    with serve_replay(records) as base_url:
        catalog = workdir / "replay-catalog.yaml"
        catalog.write_text(yaml.safe_dump(replay_catalog(sorted(records[0].responses), base_url)))
        stats_files = [workdir / f"routing-stats-fold{k}.json" for k in range(folds)]
        for stats, path in zip(fold_fits(records, folds, budget_share, allowed), stats_files):
            stats.save(path)

        async def one(i: int) -> FusionResult:
            record = records[i]
            async with gate:
                return await fuse_request(
                    record.prompt,
                    tenant=TENANT,
                    strategy=strategy,
                    constraints={
                        "split": False,
                        "task_type": record.task,
                        "allowed_models": allowed,
                        "max_tokens": 1024,
                    },
                    catalog_path=str(catalog),
                    routing_stats=str(stats_files[fold_of(i, folds)]),
                )

        done = await asyncio.gather(*(one(i) for i in range(len(records[:limit]))))
    return score(records[:limit], [r.answer for r in done], sum(r.cost_usd for r in done)), list(done)
