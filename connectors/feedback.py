"""Feedback: tenants' judgements of their answers, the routes the learning router chose, and the
rows the router refits from, as Parquet datasets partitioned by date.

- The routes dataset holds one `RouteRecord` per learned routing decision: the fragment's model,
  its task type, the prompt's embedding (list<float32>; the prompt itself is never stored) and the
  probabilities of a right answer the router saw (a JSON object).
- The feedback dataset holds one `FeedbackRecord` per judgement: a score from 0 to 1 of one
  fragment's answer, or of the whole request's (no fragment).

Writers never append to a shared file: each write is one new file with a unique name in its date
partition, written under a temporary name and renamed into place, as the telemetry dataset is
(`connectors.telemetry`), so any number of processes can write at once and readers see complete
files only.

A tenant rates only its own requests: `record_feedback` looks the request up in the telemetry
dataset, under the tenant's name, and another tenant's request is refused exactly as one that does
not exist (`UnknownRequest`, same message), so that the refusal tells nobody whose ids are real.
Rows are joined within one tenant only (`training_rows`).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from connectors.telemetry import write_partitioned
from homeskillet.errors import InvalidRequest
from homeskillet.schemas import FeedbackRecord, RouteRecord

# Request and fragment ids as the orchestrator makes them ("3f2a…", "api-…", "mcp-…", "load-3-…";
# "f1", "f2", …) and as callers may choose them: letters, digits and . _ : -, bounded.
MAX_ID_CHARS = 64
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")

ROUTE_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
        ("tenant", pa.string()),
        ("fragment_id", pa.string()),
        ("task_type", pa.string()),
        ("model", pa.string()),
        ("quality_cost", pa.float64()),
        ("p_correct", pa.string()),  # a JSON object: model → probability of a right answer
        ("embedding", pa.list_(pa.float32())),
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("us", tz="UTC")),
        ("request_id", pa.string()),
        ("tenant", pa.string()),
        ("fragment_id", pa.string()),  # null: the whole request
        ("score", pa.float64()),
    ]
)
# What the telemetry dataset tells of a request: whose it is and its fragments (its other columns
# are not read).
TELEMETRY_KEYS = pa.schema([("request_id", pa.string()), ("tenant", pa.string()), ("fragment_id", pa.string())])
TRAINING_COLUMNS = ["tenant", "request_id", "fragment_id", "task_type", "model", "embedding", "score"]
KEYS = ["tenant", "request_id", "fragment_id"]


class UnknownRequest(InvalidRequest):
    """No finished request with that id is the tenant's: another tenant's reads the same."""


# --- writing and reading ------------------------------------------------------------------------


def write_routes(root: Path, records: list[RouteRecord]) -> list[Path]:
    """Write the route records as one new Parquet file per date partition; return the files."""
    rows = [r.model_dump() | {"p_correct": json.dumps(r.p_correct, sort_keys=True)} for r in records]
    return write_partitioned(root, rows, ROUTE_SCHEMA)


def write_feedback(root: Path, records: list[FeedbackRecord]) -> list[Path]:
    """Write the feedback records as one new Parquet file per date partition; return the files."""
    return write_partitioned(root, [r.model_dump() for r in records], FEEDBACK_SCHEMA)


def read_routes(root: Path, tenant: str | None = None) -> pd.DataFrame:
    """Every route record so far (one tenant's when `tenant` is given); `p_correct` as a dict and
    `embedding` as a float32 array. An empty frame with the columns when there is none."""
    frame = _read(root, ROUTE_SCHEMA, tenant)
    frame["p_correct"] = frame["p_correct"].map(json.loads)
    frame["embedding"] = frame["embedding"].map(_vector)
    return frame


def read_feedback(root: Path, tenant: str | None = None) -> pd.DataFrame:
    """Every feedback record so far (one tenant's when `tenant` is given); `fragment_id` is None for
    a whole request's. An empty frame with the columns when there is none."""
    frame = _read(root, FEEDBACK_SCHEMA, tenant)
    frame["fragment_id"] = frame["fragment_id"].astype(object).where(frame["fragment_id"].notna(), None)
    return frame


def _files(root: Path) -> list[str]:
    return [str(f) for f in sorted(root.glob("date=*/part-*.parquet"))] if root.exists() else []


def _read(root: Path, schema: pa.Schema, tenant: str | None) -> pd.DataFrame:
    files = _files(root)
    if not files:
        return schema.empty_table().to_pandas()
    where = None if tenant is None else ds.field("tenant") == tenant
    return ds.dataset(files, format="parquet", schema=schema).to_table(filter=where).to_pandas()


def _vector(values) -> np.ndarray:
    return np.asarray(values if values is not None else [], dtype=np.float32)


# --- whose request ------------------------------------------------------------------------------


def _request_rows(telemetry_root: Path, request_id: str, tenant: str | None = None) -> pa.Table:
    """The request's rows of the telemetry dataset (its id, tenant and fragment columns only),
    found by a filter the dataset applies file by file: the dataset is never read whole."""
    files = _files(telemetry_root)
    if not files:
        return TELEMETRY_KEYS.empty_table()
    where = ds.field("request_id") == request_id
    if tenant is not None:
        where = where & (ds.field("tenant") == tenant)
    return ds.dataset(files, format="parquet", schema=TELEMETRY_KEYS).to_table(filter=where)


def owner_of(telemetry_root: Path, request_id: str) -> str | None:
    """The tenant whose finished request this is; None when there is none (or when more than one
    tenant's requests used the id: then it is no one's alone)."""
    tenants = set(_request_rows(telemetry_root, request_id)["tenant"].to_pylist())
    return tenants.pop() if len(tenants) == 1 else None


def fragments_of(telemetry_root: Path, request_id: str, tenant: str | None = None) -> list[str]:
    """The fragment ids of a finished request (of `tenant`'s request of that id, when given), in
    order; empty when there is no such request."""
    table = _request_rows(telemetry_root, request_id, tenant)
    return sorted(set(table["fragment_id"].to_pylist()), key=lambda f: (len(f), f))


# --- rating an answer ---------------------------------------------------------------------------


def _checked_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{what} is {len(value)} characters; at most {MAX_ID_CHARS}")
    if not ID.fullmatch(value):
        raise InvalidRequest(f"{what} may hold letters, digits and . _ : - only (and start with a letter or digit)")
    return value


def checked_score(score: object) -> float:
    """The score as a float, or InvalidRequest: a finite number from 0 to 1."""
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise InvalidRequest(f"score must be a number from 0 to 1, not {type(score).__name__}")
    if not math.isfinite(score) or not 0 <= score <= 1:
        raise InvalidRequest(f"score must be a number from 0 to 1, not {score!r}")
    return float(score)


def record_feedback(
    feedback_root: Path,
    telemetry_root: Path,
    tenant: str,
    request_id: str,
    score: float,
    fragment_id: str | None = None,
) -> FeedbackRecord:
    """Record the tenant's score (0 to 1) of its finished request's answer, or of one fragment's.

    The inputs are bounded before anything is read: ids of at most MAX_ID_CHARS letters, digits
    and . _ : -, a finite score from 0 to 1 (else InvalidRequest). A request that is not the
    tenant's and one that does not exist (or has not finished) raise the same UnknownRequest with
    the same message; a fragment the tenant's request does not have is an InvalidRequest naming it.
    """
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_ID_CHARS:
        raise InvalidRequest(f"tenant must be a non-empty string of at most {MAX_ID_CHARS} characters")
    _checked_id("request_id", request_id)
    if fragment_id is not None:
        _checked_id("fragment", fragment_id)
    score = checked_score(score)
    fragments = fragments_of(telemetry_root, request_id, tenant)
    if not fragments:
        raise UnknownRequest(f"there is no finished request {request_id!r} of yours to rate")
    if fragment_id is not None and fragment_id not in fragments:
        raise InvalidRequest(
            f"request {request_id!r} has no fragment {fragment_id!r}; its fragments: {', '.join(fragments)}"
        )
    record = FeedbackRecord(
        ts=datetime.now(UTC), request_id=request_id, tenant=tenant, fragment_id=fragment_id, score=score
    )
    write_feedback(feedback_root, [record])
    return record


# --- what the router refits from ----------------------------------------------------------------


def training_rows(routes_root: Path, feedback_root: Path, tenant: str | None = None) -> pd.DataFrame:
    """Each routed fragment that has feedback, with its score: columns TRAINING_COLUMNS, the
    embedding a float32 array.

    Feedback is joined to routes on (tenant, request_id, fragment_id): a tenant's feedback meets
    only its own routes. Feedback without a fragment is the score of every fragment of its request.
    Per (tenant, request, fragment) the latest feedback wins; of a fragment's and its whole
    request's given at the same instant, the fragment's."""
    routes = read_routes(routes_root, tenant)
    feedback = read_feedback(feedback_root, tenant)
    whole = feedback[feedback["fragment_id"].isna()].drop(columns="fragment_id")
    fragments = routes[KEYS].drop_duplicates()
    spread = whole.merge(fragments, on=["tenant", "request_id"]).assign(specific=False)
    specific = feedback[feedback["fragment_id"].notna()].assign(specific=True)
    scores = pd.concat([spread, specific], ignore_index=True)
    scores = scores.sort_values(["ts", "specific"], kind="stable").drop_duplicates(KEYS, keep="last")
    rows = routes.merge(scores[[*KEYS, "score"]], on=KEYS)
    return rows[TRAINING_COLUMNS].reset_index(drop=True)
