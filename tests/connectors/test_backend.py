"""What every backend's allocate shares (`connectors.backend.lease`): a slice whose endpoint cannot
be had is given back at once, not left to its lease."""

import pytest

from connectors.ledger import new_allocation_id
from connectors.local_backend import LocalBackend
from homeskillet import catalog as cat
from homeskillet.catalog import load_catalog
from homeskillet.errors import ServiceError
from homeskillet.settings import get_settings


@pytest.mark.usefixtures("postgres")
async def test_a_slice_whose_endpoint_cannot_be_had_is_released(test_catalog, monkeypatch):
    catalog = load_catalog(test_catalog)
    backend = LocalBackend(get_settings(), catalog)

    def no_server(model):
        raise ServiceError(f"the model server of {model.name} did not start")

    monkeypatch.setattr(backend, "model_endpoint", no_server)  # SmolLM2 is served by llama.cpp here
    allocation_id = new_allocation_id()
    with pytest.raises(ServiceError, match="smollm2-135m did not start"):
        await backend.allocate(
            allocation_id=allocation_id,
            tenant="acme",
            request_id="r-no-endpoint",
            pool="roomy",
            model=cat.model(catalog, "smollm2-135m"),
            wait_s=5,
        )
    assert allocation_id not in [a.allocation_id for a in await backend.held()]
