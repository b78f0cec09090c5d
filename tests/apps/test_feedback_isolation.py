"""The isolation report's feedback group: B's score of A's request refused over the API, MCP (both
transports) and the command line, word for word as an unknown id; and a check that ignored the
tenant shows as ALLOWED."""

import pytest

import connectors.feedback
from apps.isolation import broken, run_attacks

pytestmark = pytest.mark.usefixtures("local_services", "assert_no_leaks")

PATHS = {
    "POST /v1/feedback with B's key, A's request id",
    "POST /v1/feedback, A's id and an unknown one",
    "MCP feedback tool (Streamable HTTP)",
    "MCP feedback tool (WebSocket)",
    "MCP feedback tool (Streamable HTTP), A's id and an unknown one",
    "MCP feedback tool (WebSocket), A's id and an unknown one",
    "homeskillet feedback A's-id --tenant globex",
    "homeskillet feedback --tenant globex, A's id and an unknown one",
}


async def test_b_cannot_rate_as_answer_nor_tell_its_ids_from_unknown_ones():
    rows = await run_attacks(groups=("feedback",))
    assert not broken(rows), [vars(r) for r in rows if r.result not in ("refused", "operator surface")]
    assert {r.path for r in rows if r.result == "refused"} == PATHS
    assert [r.path for r in rows if r.result == "operator surface"] == ["homeskillet feedback A's-id --tenant acme"]


async def test_an_ownership_check_that_ignores_the_tenant_is_reported(monkeypatch):
    original = connectors.feedback.fragments_of

    def anyones(telemetry_root, request_id, tenant=None):  # the break: the request's owner is not checked
        return original(telemetry_root, request_id)

    monkeypatch.setattr(connectors.feedback, "fragments_of", anyones)
    rows = await run_attacks(groups=("feedback",))
    allowed = {r.path for r in rows if r.result == "ALLOWED"}
    assert {"POST /v1/feedback with B's key, A's request id", "MCP feedback tool (WebSocket)"} <= allowed
    assert broken(rows)
