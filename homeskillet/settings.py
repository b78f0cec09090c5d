"""Process settings, from HOMESKILLET_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PACKAGED_CATALOG = Path(__file__).with_name("catalog.yaml")
# RouterBench recordings of 11 real LLMs (see its SOURCE.md): routing evaluation and training data
RECORDINGS = Path(__file__).with_name("data") / "routerbench"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOMESKILLET_", extra="ignore")

    home: Path = Field(Path.home() / ".homeskillet", description="State folder: databases, logs, pids.")
    catalog: Path = Field(PACKAGED_CATALOG, description="Catalog of models, pools and tenants (YAML).")
    prefect_port: int = Field(4200, description="Port of the local Prefect server on 127.0.0.1.")
    lease_s: float = Field(900.0, gt=0, description="Lease of an allocation; expiry is the crash backstop.")
    capacity_wait_s: float = Field(30.0, ge=0, description="Default wait for pool capacity.")
    infer_timeout_s: float = Field(300.0, gt=0, description="Client timeout of one inference call.")
    model_idle_s: float = Field(300.0, gt=0, description="Stop a local model server idle this long.")
    model_threads: int | None = Field(None, description="CPU threads per local model server.")
    llama_server: Path | None = Field(None, description="llama-server executable (default: the one the set-up built).")
    hostedai_url: str | None = Field(None, description="hosted·ai API base URL (single-tenant set-up).")
    hostedai_api_key: SecretStr | None = Field(None, description="hosted·ai API key (single-tenant set-up).")
    hostedai_team_id: str | None = Field(None, description="hosted·ai team of that key.")
    hostedai_tenant: str = Field("demo", description="The tenant the environment's hosted·ai key belongs to.")
    hostedai_auth_header: str = Field("x-api-key", description="x-api-key or bearer.")
    hostedai_idle_s: float = Field(60.0, ge=0, description="Unsubscribe a tenant's idle subscription after this.")

    telemetry_dir: Path | None = Field(
        None, description="Parquet dataset of fragment records (default: home/telemetry)."
    )
    metrics_port: int | None = Field(None, description="Serve Prometheus /metrics on 127.0.0.1:PORT.")
    mcp_max_concurrent: int = Field(2, ge=1, description="Concurrent fuse calls per tenant on the MCP server.")

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def telemetry(self) -> Path:
        return self.telemetry_dir or self.home / "telemetry"


@lru_cache
def get_settings() -> Settings:
    return Settings()
