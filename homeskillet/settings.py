"""Process settings, from HOMESKILLET_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from limits import parse
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from homeskillet.schemas import MAX_CAPACITY_WAIT_S

PACKAGED_CATALOG = Path(__file__).with_name("catalog.yaml")
# RouterBench recordings of 11 real LLMs (see its SOURCE.md): routing evaluation and training data
RECORDINGS = Path(__file__).with_name("data") / "routerbench"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOMESKILLET_", extra="ignore")

    home: Path = Field(Path.home() / ".homeskillet", description="State folder: databases, logs, pids.")
    catalog: Path = Field(PACKAGED_CATALOG, description="Catalog of models, pools and tenants (YAML).")
    prefect_port: int = Field(4200, description="Port of the local Prefect server on 127.0.0.1.")
    lease_s: float = Field(900.0, gt=0, description="Lease of an allocation; expiry is the crash backstop.")
    capacity_wait_s: float = Field(30.0, ge=0, le=MAX_CAPACITY_WAIT_S, description="Default wait for pool capacity.")
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
    routes_dir: Path | None = Field(
        None, description="Parquet dataset of the learning router's decisions (default: home/routes)."
    )
    feedback_dir: Path | None = Field(
        None, description="Parquet dataset of tenants' scores of their answers (default: home/feedback)."
    )
    routers_dir: Path | None = Field(
        None,
        description="Routers the learn-routing flow published, per tenant and a default (default: home/routers); "
        "without one the router the package ships routes.",
    )
    learned_routing: bool = Field(True, description="Route with a trained router when there is one.")
    metrics_port: int | None = Field(None, description="Serve Prometheus /metrics on 127.0.0.1:PORT.")
    # Fair shares on the server (per process): no tenant, and no stranger, can take it all.
    server_max_in_flight: int = Field(
        256, ge=1, description="HTTP requests and WebSockets the server handles at once; beyond, 429 at once."
    )
    tenant_max_connections: int = Field(16, ge=1, description="One tenant's WebSockets and HTTP requests open at once.")
    tenant_max_sessions: int = Field(8, ge=1, description="One tenant's Streamable HTTP sessions open at once.")
    tenant_max_requests: int = Field(
        8, ge=1, description="Requests one tenant runs at once where its covenant sets no max_concurrent_requests."
    )
    tenant_rate: str = Field("30/second", description="One tenant's tool calls and resource reads (a moving window).")
    connection_max_in_flight: int = Field(8, ge=1, description="Requests in flight on one WebSocket.")
    connection_max_s: float = Field(3600.0, gt=0, description="The longest a WebSocket or stream stays open.")
    auth_failure_rate: str = Field(
        "20/10 seconds", description="Failed authentications per client address before it gets 429."
    )

    @field_validator("tenant_rate", "auth_failure_rate")
    @classmethod
    def _a_rate(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate such as '30/second' or '20/10 seconds'") from None
        return value

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def telemetry(self) -> Path:
        return self.telemetry_dir or self.home / "telemetry"

    @property
    def routes(self) -> Path:
        return self.routes_dir or self.home / "routes"

    @property
    def feedback(self) -> Path:
        return self.feedback_dir or self.home / "feedback"

    @property
    def routers(self) -> Path:
        return self.routers_dir or self.home / "routers"


@lru_cache
def get_settings() -> Settings:
    return Settings()
