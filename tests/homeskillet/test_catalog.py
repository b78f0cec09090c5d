"""Loading the catalog (`homeskillet.catalog`): a bad tenant covenant fails on load, naming the
tenant and the field."""

from pathlib import Path

import pytest

from homeskillet.catalog import load_catalog
from homeskillet.errors import InvalidRequest
from tests.support import write_catalog


@pytest.mark.parametrize(
    ("covenant", "message"),
    [
        ({"allowed_models": ["echo", "gpt-9"]}, "tenant 'acme' covenant.allowed_models: unknown model 'gpt-9'"),
        ({"allowed_pools": ["nowhere"]}, "tenant 'acme' covenant.allowed_pools: unknown pool 'nowhere'"),
        ({"max_tflops": -1}, "tenant 'acme' covenant.max_tflops: Input should be greater than or equal to 0"),
        ({"budget_usd_per_dai": 1}, "tenant 'acme' covenant.budget_usd_per_dai: Extra inputs are not permitted"),
    ],
)
def test_a_bad_covenant_fails_on_load_naming_the_tenant_and_the_field(tmp_path, test_catalog, covenant, message):
    path = write_catalog(tmp_path / "c.yaml", test_catalog, {"globex": {}, "acme": covenant})
    with pytest.raises(InvalidRequest) as failure:
        load_catalog(Path(path))
    assert message in str(failure.value)
