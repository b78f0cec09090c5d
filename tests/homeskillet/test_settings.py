"""Process settings from HOMESKILLET_* variables (`homeskillet.settings`): the state folder's
parts follow it, the telemetry folder can be put elsewhere, bad values are refused, and the
hosted·ai key does not show."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from homeskillet.settings import PACKAGED_CATALOG, Settings


def test_the_state_folder_holds_the_database_and_the_telemetry_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("HOMESKILLET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HOMESKILLET_TELEMETRY_DIR", raising=False)
    settings = Settings()
    assert settings.pgdata == tmp_path / "home" / "pgdata"
    assert settings.telemetry == tmp_path / "home" / "telemetry"
    monkeypatch.setenv("HOMESKILLET_TELEMETRY_DIR", str(tmp_path / "elsewhere"))
    assert Settings().telemetry == tmp_path / "elsewhere"


def test_defaults_where_the_environment_says_nothing(monkeypatch):
    for name in ("CATALOG", "CAPACITY_WAIT_S", "LEASE_S", "HOSTEDAI_TENANT", "HOSTEDAI_AUTH_HEADER"):
        monkeypatch.delenv(f"HOMESKILLET_{name}", raising=False)
    settings = Settings()
    assert settings.catalog == PACKAGED_CATALOG and Path(settings.catalog).exists()
    assert (settings.capacity_wait_s, settings.lease_s) == (30.0, 900.0)
    assert (settings.hostedai_tenant, settings.hostedai_auth_header) == ("demo", "x-api-key")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LEASE_S", "0"),
        ("CAPACITY_WAIT_S", "-1"),
        ("CAPACITY_WAIT_S", "121"),
        ("PREFECT_PORT", "a port"),
        ("TENANT_RATE", "lots"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(f"HOMESKILLET_{name}", value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_the_hostedai_key_does_not_show(monkeypatch):
    monkeypatch.setenv("HOMESKILLET_HOSTEDAI_API_KEY", "hai-secret-key")
    settings = Settings()
    assert settings.hostedai_api_key.get_secret_value() == "hai-secret-key"
    assert "hai-secret-key" not in repr(settings) and "hai-secret-key" not in str(settings)
