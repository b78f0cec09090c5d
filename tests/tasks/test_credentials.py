"""hosted·ai credentials per tenant (`tasks.credentials`): a tenant with neither a Secret block nor
the environment's credentials gets an error that says how to give it some."""

import pytest

from homeskillet.errors import MissingCredentials


@pytest.mark.usefixtures("local_services", "hostedai_tenants")  # Secret blocks; the test tenants have theirs
async def test_a_tenant_without_credentials_gets_a_clear_error(test_catalog):
    with pytest.raises(MissingCredentials, match="no hosted·ai credentials for tenant 'nobody-here'"):
        from tasks.credentials import hostedai_credentials

        await hostedai_credentials("nobody-here")
