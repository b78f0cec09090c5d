"""`learn-routing`: the scheduled refit of the learned router from tenants' feedback.

Per tenant with at least `min_feedback` rows of feedback on learned routing decisions: the rows
are split by request into train and held-out sides (`tasks.refit.split`), the router the tenant
routes with now is refitted on the shipped recordings and the train side, both are scored on the
held-out side, and the refitted one is published as the tenant's own router only when it is
better there. Each tenant is refitted on its own feedback only; the default router is left as
it is. A markdown artifact `learn-routing-<tenant>` compares the two routers.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact

from connectors.feedback import ID, MAX_ID_CHARS, read_feedback, training_rows
from connectors.recordings import load
from homeskillet.errors import InvalidRequest
from homeskillet.settings import RECORDINGS
from tasks import runtime
from tasks.learned import Router, published, router_path
from tasks.learning import Examples, examples
from tasks.refit import (
    HELD_OUT_SHARE,
    comparison_markdown,
    decide_publish,
    held_out_score,
    publish,
    refit,
    split,
)

LOCAL_RECORDINGS = RECORDINGS.parent / "local_recordings.csv"  # the local models' answers to labelled questions


def artifact_key(tenant: str) -> str:
    """The tenant's artifact key: lowercase letters, digits and dashes, as Prefect requires."""
    return "learn-routing-" + (re.sub(r"[^a-z0-9]+", "-", tenant.lower()).strip("-") or "tenant")


def _recording_files(folder: Path) -> list[Path]:
    """The RouterBench-format CSVs in the folder; InvalidRequest naming the folder when it has none."""
    files = sorted(Path(folder).glob("*.csv"))
    if not files:
        raise InvalidRequest(f"recordings folder {folder}: no RouterBench CSV files there")
    return files


def _recorded(files: list[Path], cache: Path) -> Examples | None:
    """The recordings, embedded once and kept in `cache`."""
    records = [r for path in files for r in load(path)]
    return examples(records, cache=cache) if records else None


@flow(name="learn-routing", persist_result=True, result_serializer="json")
async def learn_routing(
    recordings: str | None = None,
    feedback_only: bool = False,
    min_feedback: int = 20,
    tenants: list[str] | None = None,
    held_out_share: float = HELD_OUT_SHARE,
    min_held_out: int = 5,
    catalog_path: str | None = None,
) -> dict:
    """Refit each tenant's router from its feedback; publish it only when better on held-out
    feedback. Returns, per tenant, what was done and why.

    Args:
        recordings: Folder of RouterBench-format recordings the heads are refitted on besides
            the feedback (default: the packaged ones, and the local models' answers).
        feedback_only: Refit the heads on the feedback alone, without recordings.
        min_feedback: The least rows of feedback a tenant needs for a refit of its own.
        tenants: The tenants to refit (default: every tenant with feedback).
        held_out_share: The share of a tenant's requests held out to score the routers on.
        min_held_out: The least held-out rows a refitted router is published on.
        catalog_path: Another catalog file.
    """
    log = get_run_logger()
    settings = runtime.services(catalog_path).settings
    files = [] if feedback_only else _recording_files(Path(recordings or RECORDINGS))  # before anything is read
    if recordings is None and not feedback_only and LOCAL_RECORDINGS.exists():
        files.append(LOCAL_RECORDINGS)  # the shipped router's heads of the local models learned from these
    if tenants is None:
        feedback = await asyncio.to_thread(read_feedback, settings.feedback)
        tenants = sorted(set(feedback["tenant"]))
    recorded: list[Examples | None] = []  # embedded on first need, once per run
    summary: dict[str, dict] = {}
    for tenant in tenants:
        if not isinstance(tenant, str) or len(tenant) > MAX_ID_CHARS or not ID.fullmatch(tenant):
            why = "not a tenant name a file can carry"
            summary[str(tenant)[:MAX_ID_CHARS]] = {"feedback": 0, "refitted": False, "published": False, "why": why}
            continue
        rows = await asyncio.to_thread(training_rows, settings.routes, settings.feedback, tenant)
        done = {"feedback": len(rows), "refitted": False, "published": False}
        path = router_path(settings.routers, tenant)
        if len(rows) < min_feedback:
            done["why"] = f"{len(rows)} rows of feedback, fewer than {min_feedback}: not refitted"
        elif path is None:
            done["why"] = "no router to refit: none published and none packaged"
        else:
            current = Router.load(path)
            train, held = split(rows, held_out_share)
            if not recorded:
                recorded.append(await asyncio.to_thread(_recorded, files, settings.home / "cache"))
            new = await asyncio.to_thread(refit, current, recorded[0], train)
            scores = {
                "current": held_out_score(current, held),
                "new": held_out_score(new, held),
                "train": len(train),
            }
            decision = decide_publish(scores["current"], scores["new"], min_held_out)
            if decision[0]:
                done["path"] = str(publish(new, published(settings.routers, tenant)))
            done |= {
                "refitted": True,
                "published": decision[0],
                "why": decision[1],
                "base": str(path),
                "train": len(train),
                "held_out": len(held),
                "current": scores["current"],
                "new": scores["new"],
            }
            await acreate_markdown_artifact(
                key=artifact_key(tenant),
                markdown=comparison_markdown(tenant, current, new, scores, decision),
                description=f"learn-routing for tenant {tenant}",
            )
        if not done["refitted"]:
            await acreate_markdown_artifact(
                key=artifact_key(tenant),
                markdown=f"# learn-routing: {tenant}\n\n**Not refitted**: {done['why']}.\n",
                description=f"learn-routing for tenant {tenant}",
            )
        log.info("learn-routing %s: %s", tenant, done["why"])
        summary[tenant] = done
    return {"tenants": summary, "min_feedback": min_feedback}
