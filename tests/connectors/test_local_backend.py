"""The local backend (`connectors.local_backend`) on the session's PostgreSQL: a remote model's
slice of a local pool hands out the provider's URL, is listed as the tenant's, and only that
tenant releases it."""

import re

import httpx
import pytest

from connectors import openai_client
from connectors.ledger import new_allocation_id
from connectors.local_backend import LocalBackend
from homeskillet import catalog as cat
from homeskillet.catalog import load_catalog
from homeskillet.errors import AllocationNotFound
from homeskillet.settings import PACKAGED_CATALOG, get_settings


@pytest.mark.usefixtures("postgres")
async def test_a_remote_models_slice_hands_out_its_providers_url_and_only_its_tenant_releases_it(test_catalog):
    catalog = load_catalog(test_catalog)
    backend = LocalBackend(get_settings(), catalog)
    echo = cat.model(catalog, "echo")
    allocation_id = new_allocation_id()
    allocation = await backend.allocate(
        allocation_id=allocation_id, tenant="acme", request_id="r-local", pool="roomy", model=echo, wait_s=5
    )
    try:
        assert allocation.endpoint == echo.serving.base_url and allocation.backend == "local"
        assert (allocation.pool, allocation.model, allocation.tflops) == ("roomy", "echo", echo.tflops)
        assert allocation_id in [a.allocation_id for a in await backend.held("acme")]
        assert allocation_id not in [a.allocation_id for a in await backend.held("globex")]
        assert await backend.verify(allocation) is True  # local pools are never reclaimed
        with pytest.raises(AllocationNotFound):
            await backend.release(allocation_id, "globex")
    finally:
        await backend.release(allocation_id, "acme")
    assert allocation_id not in [a.allocation_id for a in await backend.held()]


@pytest.mark.usefixtures("postgres", "llama_server")
async def test_a_local_models_slice_reaches_its_server_with_a_key_it_never_hands_out():
    """The endpoint a slice hands out (and the ledger keeps) is the bare address: the model
    server's key stays with the backend's process, which sends it; a call without it is refused."""
    catalog = load_catalog(PACKAGED_CATALOG)
    backend = LocalBackend(get_settings(), catalog)
    smol = cat.model(catalog, "smollm2-135m")
    pool = next(p for p in catalog.pools if p.backend == "local")
    allocation_id = new_allocation_id()
    allocation = await backend.allocate(
        allocation_id=allocation_id, tenant="acme", request_id="r-key", pool=pool.id, model=smol, wait_s=30
    )
    try:
        key = backend.servers.api_key.get_secret_value()
        (held,) = [a for a in await backend.held("acme") if a.allocation_id == allocation_id]
        for shown in (allocation.endpoint, repr(allocation), allocation.model_dump_json(), held.model_dump_json()):
            assert key not in shown
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", allocation.endpoint)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        async with httpx.AsyncClient(timeout=60) as http:
            assert (await http.post(f"{allocation.endpoint}/chat/completions", json=body)).status_code == 401
        out = await openai_client.complete(
            allocation.endpoint, smol.name, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4
        )
        assert out.tokens_out >= 1
    finally:
        await backend.release(allocation_id, "acme")
