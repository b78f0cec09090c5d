"""The MCP `feedback` tool over Streamable HTTP and WebSocket on a real server on loopback: the
token's tenant (never an argument) rates its own finished request, another tenant's is refused
exactly like an unknown one, and bad input is refused naming it."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from tests.apps.test_feedback_api import finished, made_tokens, stored
from tests.apps.test_mcp_server import CLIENTS, serving

pytestmark = pytest.mark.usefixtures("local_services")


@pytest.fixture(scope="module")
def server(test_catalog):
    """A server of its own on the test catalog: host:port and a token of acme's and globex's."""
    from apps.mcp_server import create_app

    tokens = asyncio.run(made_tokens("acme", "globex"))
    with serving(create_app(test_catalog)) as where:
        yield where, tokens


def said(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_the_owner_rates_and_another_tenant_is_refused_like_an_unknown_request(server, transport):
    where, tokens = server
    request_id, unknown = finished("acme"), "fb-" + uuid.uuid4().hex[:12]
    async with CLIENTS[transport](where, tokens["acme"]) as acme, CLIENTS[transport](where, tokens["globex"]) as globex:
        (tool,) = [t for t in (await acme.list_tools()).tools if t.name == "feedback"]
        assert "tenant" not in json.dumps(tool.input_schema)  # the token is the tenant
        theirs = await globex.call_tool("feedback", {"request_id": request_id, "score": 1})
        none = await globex.call_tool("feedback", {"request_id": unknown, "score": 1})
        assert theirs.is_error and none.is_error
        assert said(theirs).replace(request_id, "ID") == said(none).replace(unknown, "ID")
        assert "UnknownRequest: there is no finished request" in said(theirs)
        assert stored(request_id) == []

        rated = await acme.call_tool("feedback", {"request_id": request_id, "score": 0.25, "fragment": "f1"})
        assert not rated.is_error, said(rated)
        record = rated.structured_content
        assert {k: record[k] for k in ("request_id", "tenant", "fragment_id", "score")} == {
            "request_id": request_id,
            "tenant": "acme",
            "fragment_id": "f1",
            "score": 0.25,
        }
        assert json.loads(said(rated)) == record
        assert stored(request_id) == [{"tenant": "acme", "fragment_id": "f1", "score": 0.25}]


async def test_bad_input_is_refused_naming_it_and_nothing_is_written(server):
    where, tokens = server
    request_id = finished("acme")
    async with CLIENTS["ws"](where, tokens["acme"]) as acme:
        for arguments, named in (
            ({"request_id": request_id, "score": 1.5}, "score must be a number from 0 to 1, not 1.5"),
            ({"request_id": request_id, "score": 0.5, "fragment": "f9"}, "has no fragment 'f9'; its fragments: f1, f2"),
            ({"request_id": "x" * 100_000, "score": 0.5}, "request_id is 100000 characters; at most 64"),
            ({"request_id": request_id}, "score"),
        ):
            refused = await acme.call_tool("feedback", arguments)
            assert refused.is_error and named in said(refused), said(refused)[:300]
        still = await acme.call_tool("allocations", {})  # the connection stays usable
        assert not still.is_error
    assert stored(request_id) == []
