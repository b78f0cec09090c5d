"""The services a run uses (`tasks.runtime`): the catalog they hand out follows the latest
benchmark's measurements without a restart."""

import logging

from homeskillet.catalog import load_catalog
from homeskillet.schemas import InferenceRequest
from homeskillet.settings import PACKAGED_CATALOG
from tasks.context import RunContext
from tasks.routing import preview
from tasks.runtime import Services
from tests.support import plan

CATALOG = load_catalog(PACKAGED_CATALOG)
LOG = logging.getLogger("test")


def test_a_new_benchmark_changes_routing_without_a_restart(tmp_path):
    import json
    import os

    services = Services(catalog_path=PACKAGED_CATALOG, home=tmp_path)
    fragment = plan(("12 times 12?", "math"))
    assert services.catalog.models == CATALOG.models  # no benchmark yet: the catalog's priors
    latest = tmp_path / "benchmarks" / "latest.json"
    latest.parent.mkdir()
    latest.write_text(json.dumps({"quality": {"gemma3-270m": {"math": 0.9}, "smollm2-135m": {"math": 0.1}}}))
    ctx = RunContext(InferenceRequest(tenant="demo", prompt="p"), services, services.catalog, LOG)
    assert preview(fragment, ctx)["f0"].model == "gemma3-270m"
    latest.write_text(json.dumps({"quality": {"gemma3-270m": {"math": 0.1}, "smollm2-135m": {"math": 0.9}}}))
    os.utime(latest, ns=(1, latest.stat().st_mtime_ns + 1_000_000))  # a later write, even within one tick
    ctx = RunContext(InferenceRequest(tenant="demo", prompt="p"), services, services.catalog, LOG)
    assert preview(fragment, ctx)["f0"].model == "smollm2-135m"
