"""The local backend (`connectors.local_backend`) on the session's PostgreSQL: a remote model's
slice of a local pool hands out the provider's URL, is listed as the tenant's, and only that
tenant releases it."""

import pytest

from connectors.ledger import new_allocation_id
from connectors.local_backend import LocalBackend
from homeskillet import catalog as cat
from homeskillet.catalog import load_catalog
from homeskillet.errors import AllocationNotFound
from homeskillet.settings import get_settings


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
