"""Feedback (`connectors.feedback`): the routes and feedback datasets on real Parquet, a tenant
rating only its own finished requests (another tenant's reads exactly like an unknown one), bad
input refused before anything is read, and the rows the router refits from, joined within one
tenant, a fragment's score or its whole request's, the latest winning."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from connectors.feedback import (
    TRAINING_COLUMNS,
    UnknownRequest,
    fragments_of,
    owner_of,
    read_feedback,
    read_routes,
    record_feedback,
    training_rows,
    write_feedback,
    write_routes,
)
from connectors.telemetry import write_records
from homeskillet.errors import InvalidRequest
from homeskillet.schemas import FeedbackRecord, RouteRecord, TelemetryRecord
from tests.support import telemetry_record

NOW = datetime(2025, 3, 1, 12, tzinfo=UTC)


def attempt(request_id: str, tenant: str, fragment_id: str) -> TelemetryRecord:
    return telemetry_record(request_id, tenant, fragment_id, ts=NOW)


def route(request_id: str, tenant: str, fragment_id: str, model: str = "m", seed: int = 0) -> RouteRecord:
    return RouteRecord(
        ts=NOW,
        request_id=request_id,
        tenant=tenant,
        fragment_id=fragment_id,
        task_type="factual_qa",
        model=model,
        quality_cost=0.5,
        p_correct={model: 0.75, "other": 0.25},
        embedding=list(np.random.default_rng(seed).standard_normal(384)),
    )


def rating(request_id: str, tenant: str, score: float, fragment_id: str | None = None, at: int = 0) -> FeedbackRecord:
    return FeedbackRecord(
        ts=NOW + timedelta(minutes=at), request_id=request_id, tenant=tenant, fragment_id=fragment_id, score=score
    )


@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path, Path]:
    """(telemetry, feedback, routes): acme's request r-acme (f1, f2), globex's r-globex (f1)."""
    telemetry = tmp_path / "telemetry"
    write_records(telemetry, [attempt("r-acme", "acme", "f1"), attempt("r-acme", "acme", "f2")])
    write_records(telemetry, [attempt("r-globex", "globex", "f1")])
    return telemetry, tmp_path / "feedback", tmp_path / "routes"


def test_routes_and_feedback_round_trip_one_new_file_per_date_and_write(tmp_path):
    routes = [route("r1", "acme", "f1"), route("r1", "acme", "f2", seed=1), route("r2", "globex", "f1", seed=2)]
    yesterday = routes[2].model_copy(update={"ts": NOW - timedelta(days=1)})
    first = write_routes(tmp_path / "routes", routes[:2] + [yesterday])
    again = write_routes(tmp_path / "routes", routes[:1])
    assert sorted(p.parent.name for p in first) == ["date=2025-02-28", "date=2025-03-01"]
    assert len(set(first + again)) == 3 and not list(tmp_path.rglob("*.tmp"))
    back = read_routes(tmp_path / "routes")
    assert len(back) == 4
    row = back[(back.request_id == "r2")].iloc[0]
    assert row.embedding.dtype == np.float32 and row.embedding.shape == (384,)
    assert np.allclose(row.embedding, np.asarray(routes[2].embedding, dtype=np.float32))
    assert row.p_correct == {"m": 0.75, "other": 0.25} and row.tenant == "globex"
    assert set(read_routes(tmp_path / "routes", tenant="globex").request_id) == {"r2"}

    write_feedback(tmp_path / "feedback", [rating("r1", "acme", 0.5), rating("r1", "acme", 1.0, "f2")])
    feedback = read_feedback(tmp_path / "feedback", tenant="acme").sort_values("score")
    assert list(feedback.fragment_id) == [None, "f2"] and list(feedback.score) == [0.5, 1.0]
    assert read_feedback(tmp_path / "feedback", tenant="globex").empty


def test_nothing_written_reads_as_empty_frames_with_the_columns(tmp_path):
    assert list(read_routes(tmp_path / "none").columns) == [
        "ts",
        "request_id",
        "tenant",
        "fragment_id",
        "task_type",
        "model",
        "quality_cost",
        "p_correct",
        "embedding",
    ]
    assert list(read_feedback(tmp_path / "none").columns) == ["ts", "request_id", "tenant", "fragment_id", "score"]
    rows = training_rows(tmp_path / "none", tmp_path / "none")
    assert rows.empty and list(rows.columns) == TRAINING_COLUMNS
    assert owner_of(tmp_path / "none", "r1") is None and fragments_of(tmp_path / "none", "r1") == []


def test_the_telemetry_tells_whose_request_it_is_and_its_fragments(roots):
    telemetry, _, _ = roots
    assert owner_of(telemetry, "r-acme") == "acme" and owner_of(telemetry, "r-globex") == "globex"
    assert owner_of(telemetry, "r-none") is None
    assert fragments_of(telemetry, "r-acme") == ["f1", "f2"]
    assert fragments_of(telemetry, "r-acme", "globex") == []
    write_records(telemetry, [attempt("r-acme", "globex", "f1")])  # an id two tenants' requests used
    assert owner_of(telemetry, "r-acme") is None
    assert fragments_of(telemetry, "r-acme", "acme") == ["f1", "f2"]


def test_the_owner_rates_its_request_or_one_fragment(roots):
    telemetry, feedback, _ = roots
    whole = record_feedback(feedback, telemetry, "acme", "r-acme", 1)
    one = record_feedback(feedback, telemetry, "acme", "r-acme", 0.25, fragment_id="f2")
    assert (whole.tenant, whole.fragment_id, whole.score) == ("acme", None, 1.0)
    assert (one.fragment_id, one.score) == ("f2", 0.25)
    stored = read_feedback(feedback).sort_values("ts")
    assert list(stored.fragment_id) == [None, "f2"] and list(stored.tenant) == ["acme", "acme"]


def test_another_tenants_request_is_refused_exactly_like_an_unknown_one(roots):
    telemetry, feedback, _ = roots
    with pytest.raises(UnknownRequest) as theirs:
        record_feedback(feedback, telemetry, "globex", "r-acme", 0.0)
    with pytest.raises(UnknownRequest) as unknown:
        record_feedback(feedback, telemetry, "globex", "r-acmf", 0.0)
    assert str(theirs.value).replace("r-acme", "ID") == str(unknown.value).replace("r-acmf", "ID")
    with pytest.raises(UnknownRequest) as with_fragment:  # naming a fragment changes nothing
        record_feedback(feedback, telemetry, "globex", "r-acme", 0.0, fragment_id="f2")
    assert str(with_fragment.value) == str(theirs.value)
    assert read_feedback(feedback).empty


def test_an_unknown_fragment_of_an_owned_request_is_named(roots):
    telemetry, feedback, _ = roots
    with pytest.raises(InvalidRequest, match="request 'r-acme' has no fragment 'f9'; its fragments: f1, f2"):
        record_feedback(feedback, telemetry, "acme", "r-acme", 0.5, fragment_id="f9")
    assert read_feedback(feedback).empty


@pytest.mark.parametrize(
    ("request_id", "score", "fragment", "named"),
    [
        ("r-acme", -0.1, None, r"score must be a number from 0 to 1, not -0.1"),
        ("r-acme", 1.5, None, r"not 1.5"),
        ("r-acme", float("nan"), None, r"not nan"),
        ("r-acme", float("inf"), None, r"not inf"),
        ("r-acme", True, None, r"not bool"),
        ("r-acme", "0.5", None, r"not str"),
        ("", 0.5, None, r"request_id must be a non-empty string"),
        ("r" * 65, 0.5, None, r"request_id is 65 characters; at most 64"),
        ("../r-acme", 0.5, None, r"request_id may hold letters, digits and \. _ : - only"),
        ("r-acme' OR 1=1", 0.5, None, r"request_id may hold"),
        ("r-acme", 0.5, "f 1", r"fragment may hold"),
        ("r-acme", 0.5, "f" * 65, r"fragment is 65 characters"),
    ],
)
def test_bad_input_is_refused_before_anything_is_read(tmp_path, request_id, score, fragment, named):
    telemetry = tmp_path / "telemetry"
    (telemetry / "date=2025-03-01").mkdir(parents=True)
    (telemetry / "date=2025-03-01" / "part-junk.parquet").write_bytes(b"not parquet")  # reading it would fail
    with pytest.raises(InvalidRequest, match=named) as refused:
        record_feedback(tmp_path / "feedback", telemetry, "acme", request_id, score, fragment_id=fragment)
    assert not isinstance(refused.value, UnknownRequest)
    assert not (tmp_path / "feedback").exists()


def test_training_rows_join_a_fragments_score_or_its_whole_requests_latest_first(roots):
    _, feedback, routes = roots
    write_routes(
        routes,
        [
            route("r-acme", "acme", "f1", "small", seed=1),
            route("r-acme", "acme", "f2", "large", seed=2),
            route("r-quiet", "acme", "f1", seed=3),  # never rated: no row
            route("r-acme", "globex", "f1", seed=4),  # the same id, globex's request
        ],
    )
    write_feedback(
        feedback,
        [
            rating("r-acme", "acme", 0.2, at=0),  # the whole request: f1 and f2
            rating("r-acme", "acme", 0.9, "f2", at=1),  # later, f2's own: f2's score
            rating("r-acme", "globex", 0.0, at=0),  # globex's request of that id: never acme's rows
        ],
    )
    rows = training_rows(routes, feedback).sort_values(["tenant", "fragment_id"]).reset_index(drop=True)
    assert list(rows.columns) == TRAINING_COLUMNS
    assert rows[["tenant", "request_id", "fragment_id", "model", "score"]].values.tolist() == [
        ["acme", "r-acme", "f1", "small", 0.2],
        ["acme", "r-acme", "f2", "large", 0.9],
        ["globex", "r-acme", "f1", "m", 0.0],
    ]
    assert all(e.dtype == np.float32 and e.shape == (384,) for e in rows.embedding)
    assert np.allclose(rows.embedding[1], np.asarray(route("x", "x", "x", seed=2).embedding, dtype=np.float32))

    write_feedback(feedback, [rating("r-acme", "acme", 0.6, at=2)])  # later still, the whole request again
    acme = training_rows(routes, feedback, tenant="acme").sort_values("fragment_id")
    assert list(acme.score) == [0.6, 0.6] and set(acme.tenant) == {"acme"}
    assert list(training_rows(routes, feedback, tenant="globex").score) == [0.0]
    assert training_rows(routes, feedback, tenant="initech").empty


def test_of_a_fragments_and_its_whole_requests_score_at_the_same_instant_the_fragments_wins(roots):
    _, feedback, routes = roots
    write_routes(routes, [route("r-acme", "acme", "f1")])
    write_feedback(feedback, [rating("r-acme", "acme", 0.7, "f1"), rating("r-acme", "acme", 0.1)])
    assert list(training_rows(routes, feedback).score) == [0.7]
