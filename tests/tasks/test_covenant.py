"""Covenants (`tasks.covenant`) enforced through the flow: a request asking for what its tenant's
covenant forbids is refused before anything runs, routing stays within it and provenance says so,
a change holds from the next request without a restart, a budget crossed mid-request stops it with
everything released (each call reserves its worst case first); the CLI exits 2 naming the term and
shows the usage."""

import json
import os
import subprocess

import pytest

from flows.fusion import fuse_request
from homeskillet.errors import CovenantViolation
from homeskillet.schemas import Covenant
from homeskillet.settings import get_settings
from tasks import runtime
from tasks.routing import worst_case_cost
from tests.support import HOMESKILLET, NARROW, one_echo_call_on_tiny


@pytest.mark.usefixtures("assert_no_leaks")
@pytest.mark.parametrize(
    ("constraints", "strategy", "term"),
    [
        ({"allowed_models": ["smollm2-135m"]}, "single", "allowed_models"),
        ({"tier": "dedicated"}, "single", "allowed_tiers"),
        ({"backend": "hostedai", "pool": "hostedai-preemptible"}, "single", "allowed_regions"),
        ({"pool": "tiny"}, "single", "allowed_tiers"),
    ],
)
async def test_a_request_asking_for_what_its_covenant_forbids_is_refused_before_anything_runs(
    covenant_catalog, echo_server, constraints, strategy, term
):
    seen = len(echo_server.seen)
    with pytest.raises(CovenantViolation) as refusal:
        await fuse_request(
            prompt="Say hi.",
            tenant="cov-narrow",
            strategy=strategy,
            constraints=constraints,
            catalog_path=covenant_catalog.path,
        )
    assert refusal.value.term == term and refusal.value.tenant == "cov-narrow"
    assert f"tenant 'cov-narrow' covenant term {term}: limit" in str(refusal.value)
    assert len(echo_server.seen) == seen  # no model was called


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_request_is_routed_within_its_covenant_and_its_provenance_says_so(covenant_catalog):
    result = await fuse_request(prompt="Say hi.", tenant="cov-narrow", catalog_path=covenant_catalog.path)
    (fragment,) = result.fragments
    assert fragment.model in ("echo", "echo-lite") and fragment.tier == "preemptible"
    assert fragment.covenant_version == Covenant(**NARROW).version
    assert fragment.covenant_terms == ["allowed_models", "allowed_regions", "allowed_tiers"]


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_covenant_change_holds_from_the_next_request_without_a_restart(covenant_catalog):
    asked = {"allowed_models": ["echo"], "pool": "roomy", "max_tokens": 8}
    first = await fuse_request(
        prompt="Say hi.", tenant="cov-change", constraints=asked, catalog_path=covenant_catalog(cov_change={})
    )
    assert first.fragments[0].model == "echo"
    covenant_catalog(cov_change={"allowed_models": ["echo-lite"]})
    with pytest.raises(CovenantViolation, match="covenant term allowed_models: limit \\['echo-lite'\\]"):
        await fuse_request(prompt="Say hi.", tenant="cov-change", constraints=asked, catalog_path=covenant_catalog.path)
    second = await fuse_request(
        prompt="Say hi.", tenant="cov-change", constraints={"max_tokens": 8}, catalog_path=covenant_catalog.path
    )
    assert second.fragments[0].model == "echo-lite"
    assert second.fragments[0].covenant_version != first.fragments[0].covenant_version


@pytest.mark.usefixtures("assert_no_leaks")
async def test_a_budget_crossed_mid_request_stops_it_and_releases_everything(covenant_catalog, echo_server):
    """Three fragments that take turns on the one-slice pool `tiny`. The budget is one call's
    worst case and half an estimated call: the first call reserves its worst case, runs and
    settles what it cost (about a second of the slice: more than half an estimate), which leaves
    too little for the second call's worst case, so that one is refused once its slice is held,
    and the request stops with everything released."""
    catalog = runtime.catalog(covenant_catalog.path)
    echo = next(m for m in catalog.models if m.name == "echo")
    tiny = next(p for p in catalog.pools if p.id == "tiny")
    worst = worst_case_cost(echo, tiny, "Say one.", 128, get_settings().infer_timeout_s)
    budget = worst + 0.5 * one_echo_call_on_tiny(covenant_catalog.path)
    path = covenant_catalog(cov_budget={"budget_usd_per_day": budget})
    seen = len(echo_server.seen)
    with pytest.raises(
        CovenantViolation, match="covenant term budget_usd_per_day: limit .* spent today; the next call may cost up to"
    ):
        await fuse_request(
            prompt="1. Say one.\n2. Say two.\n3. Say three.",
            tenant="cov-budget",
            constraints={"allowed_models": ["echo"], "pool": "tiny"},
            catalog_path=path,
        )
    assert len(echo_server.seen) - seen == 1  # one call ran; the others were stopped before theirs
    ledger = await runtime.services(path).ledger()
    day, month = await ledger.spend("cov-budget")
    assert 0 < day == month <= budget
    seen = len(echo_server.seen)
    with pytest.raises(CovenantViolation, match="budget_usd_per_day"):  # the next request's call does not run
        await fuse_request(
            prompt="Say hi.",
            tenant="cov-budget",
            catalog_path=path,
            constraints={"allowed_models": ["echo"], "pool": "tiny"},
        )
    assert len(echo_server.seen) == seen
    usage = await ledger.usage("cov-budget")
    assert usage["held_slices"] == 0 and usage["requests_running"] == 0


def test_the_cli_exits_2_naming_the_term_and_shows_the_usage(covenant_catalog):
    env = os.environ | {"HOMESKILLET_CATALOG": covenant_catalog.path}
    done = subprocess.run(
        [HOMESKILLET, "run", "Say hi.", "--tenant", "cov-narrow", "--tier", "dedicated"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "tenant 'cov-narrow' covenant term allowed_tiers: limit ['preemptible']" in done.stderr
    assert "Traceback" not in done.stderr
    shown = subprocess.run(
        [HOMESKILLET, "covenant", "show", "cov-narrow", "--json"], capture_output=True, text=True, timeout=300, env=env
    )
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["version"] == Covenant(**NARROW).version and report["terms"] == NARROW
    assert report["usage"]["held_slices"] == 0 and report["usage"]["spend_usd_today"] >= 0
