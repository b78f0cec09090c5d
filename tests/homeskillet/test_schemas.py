"""The shared vocabulary (`homeskillet.schemas`): what its validation refuses and what it derives
(a covenant's version, a plan's order)."""

import pytest

from homeskillet.schemas import Covenant, HostedAIMatch, Plan
from tests.support import frag


def test_the_version_changes_with_any_term():
    assert Covenant().version == Covenant().version
    assert Covenant(max_tflops=2).version != Covenant(max_tflops=3).version != Covenant().version


def test_plans_must_list_dependencies_first():
    with pytest.raises(ValueError, match="do not come before"):
        Plan(request_id="r", fusion="reduce", fragments=[frag("f1", "{f2}", deps=["f2"]), frag("f2", "b")])


def test_a_pattern_that_is_no_regex_is_refused_in_the_catalog():
    with pytest.raises(ValueError, match="not a regular expression"):
        HostedAIMatch(patterns=["spot("])
