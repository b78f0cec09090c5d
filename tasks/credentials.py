"""hosted·ai credentials per tenant: a Prefect Secret block `hostedai-<tenant>` holding
{"url", "api_key", "team_id", "auth_header"?}, or, for the single-tenant case, the
HOMESKILLET_HOSTEDAI_* environment variables for the tenant HOMESKILLET_HOSTEDAI_TENANT."""

from __future__ import annotations

import json

from prefect.blocks.system import Secret
from pydantic import ValidationError

from homeskillet.errors import MissingCredentials
from homeskillet.schemas import HostedAICredentials
from homeskillet.settings import get_settings


def block_name(tenant: str) -> str:
    return f"hostedai-{tenant.lower()}"


async def hostedai_credentials(tenant: str) -> HostedAICredentials:
    try:
        secret = await Secret.aload(block_name(tenant))
    except ValueError:  # no such block
        secret = None
    if secret is not None:
        value = secret.get()
        try:
            return HostedAICredentials.model_validate(json.loads(value) if isinstance(value, str) else value)
        except (ValueError, ValidationError):
            raise MissingCredentials(
                f"Secret block {block_name(tenant)!r} must hold JSON with url, api_key and team_id"
            ) from None
    settings = get_settings()
    if tenant == settings.hostedai_tenant and settings.hostedai_url and settings.hostedai_api_key:
        return HostedAICredentials(
            url=settings.hostedai_url,
            api_key=settings.hostedai_api_key,
            team_id=settings.hostedai_team_id or "",
            auth_header=settings.hostedai_auth_header,
        )
    raise MissingCredentials(
        f"no hosted·ai credentials for tenant {tenant!r}: create the Secret block {block_name(tenant)!r} "
        f"or set HOMESKILLET_HOSTEDAI_URL, _API_KEY and _TEAM_ID (for tenant {settings.hostedai_tenant!r})"
    )


async def save_hostedai_credentials(tenant: str, credentials: HostedAICredentials) -> None:
    """Store a tenant's credentials as its Secret block (overwrites)."""
    value = credentials.model_dump(mode="json") | {"api_key": credentials.api_key.get_secret_value()}
    await Secret(value=json.dumps(value)).asave(block_name(tenant), overwrite=True)


async def has_credentials_block(tenant: str) -> bool:
    try:
        await Secret.aload(block_name(tenant))
    except ValueError:  # no such block
        return False
    return True


async def delete_hostedai_credentials(tenant: str) -> None:
    await Secret.adelete(block_name(tenant))
