"""The isolation report's edge-worker group: every attempt refused by edge/worker.mjs, and a worker
that builds the upstream URL from the request path (as a naive proxy does) shows as ALLOWED."""

import shutil
from types import SimpleNamespace

import pytest

from apps.isolation import edge
from apps.isolation.report import Report, broken

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")

# The upstream URL resolved from the client's path and query against the base, every header and
# the body passed on, redirects followed: what edge/worker.mjs must not be.
NAIVE_WORKER = """
export function createWorker({ endpoints, fetch }) {
  return {
    async fetch(request) {
      const url = new URL(request.url);
      const base = endpoints.default.endsWith("/") ? endpoints.default : endpoints.default + "/";
      const target = new URL(url.pathname.replace(/^\\//, "") + url.search, base);
      const body = ["GET", "HEAD"].includes(request.method) ? null : await request.arrayBuffer();
      return fetch(new Request(target, { method: request.method, headers: request.headers, body }));
    },
  };
}
"""


async def rows_for(worker=edge.WORKER):
    report = Report()
    await edge.attacks(report, SimpleNamespace(), worker=worker)  # the group reads nothing of the target
    return report.rows


@needs_node
async def test_the_edge_worker_refuses_every_way_past_its_endpoint():
    rows = await rows_for()
    assert [r.result for r in rows] == ["refused"] * len(edge.ATTACKS), [vars(r) for r in rows]
    assert {r.path for r in rows} == {
        "edge worker /http://127.0.0.1:4200/api/health",
        "edge worker ///169.254.169.254/latest/meta-data/",
        "edge worker /file:///etc/passwd",
        "edge worker //admin/secret",
        "edge worker /v1/chat/completions/../../admin",
        "edge worker /%2e%2e/admin",
        "edge worker /v1/chat/completions, upstream 302 → http://127.0.0.1:4200/api/health",
    }
    assert not broken(rows)


@needs_node
async def test_a_worker_that_forwards_by_the_request_path_is_reported(tmp_path):
    naive = tmp_path / "naive.mjs"
    naive.write_text(NAIVE_WORKER)
    rows = await rows_for(naive)
    assert [r.result for r in rows] == ["ALLOWED"] * len(edge.ATTACKS), [vars(r) for r in rows]
    details = {r.path: r.detail for r in rows}
    assert "http://127.0.0.1:4200/api/health" in details["edge worker /http://127.0.0.1:4200/api/health"]
    assert "https://169.254.169.254/latest/meta-data/" in details["edge worker ///169.254.169.254/latest/meta-data/"]
    assert "file:///etc/passwd" in details["edge worker /file:///etc/passwd"]
    assert "https://homeskillet.example/admin/secret" in details["edge worker //admin/secret"]
    assert broken(rows)


@needs_node
async def test_a_worker_that_forwards_nothing_voids_the_rows(tmp_path):
    refuses_all = tmp_path / "refuses_all.mjs"
    refuses_all.write_text(
        "export const createWorker = () => ({ fetch: async () => new Response(null, { status: 404 }) });"
    )
    rows = await rows_for(refuses_all)
    assert {r.result for r in rows} == {"control failed"}


async def test_without_node_the_rows_say_n_a(monkeypatch):
    monkeypatch.setattr(edge.shutil, "which", lambda _name: None)
    rows = await rows_for()
    assert [(r.result, r.detail) for r in rows] == [("n/a", "node is not installed")] * len(edge.ATTACKS)
