"""The errors every layer raises (`homeskillet.errors`): a covenant refusal names the tenant, the
term, its limit and the usage; hosted·ai errors keep what the client decides on (when to retry,
the business code); and the classes sort errors the way the retry rules and the CLI read them."""

import pytest

from homeskillet import errors
from homeskillet.errors import (
    AlreadySubscribed,
    CircuitOpen,
    CovenantViolation,
    HomeskilletError,
    HostedAIAuthError,
    HostedAIRejected,
    HostedAIUnavailable,
    InferenceError,
    InsufficientResources,
    InvalidRequest,
    Preempted,
    UnknownModel,
    UnknownPool,
    UnknownTenant,
)


def test_a_covenant_violation_names_the_tenant_the_term_its_limit_and_the_usage():
    refused = CovenantViolation("acme", "max_tflops", "2 TFLOPS held at once", "2 TFLOPS held")
    assert str(refused) == (
        "tenant 'acme' covenant term max_tflops: limit 2 TFLOPS held at once, current usage 2 TFLOPS held"
    )
    assert (refused.tenant, refused.term, refused.limit, refused.usage) == (
        "acme",
        "max_tflops",
        "2 TFLOPS held at once",
        "2 TFLOPS held",
    )
    detailed = CovenantViolation("acme", "max_fragments", 1, 0, "the prompt splits into 2")
    assert str(detailed).endswith("limit 1, current usage 0; the prompt splits into 2")


def test_hostedai_errors_keep_the_retry_delay_and_the_business_code():
    assert HostedAIUnavailable("busy").retry_after is None
    assert HostedAIUnavailable("busy", retry_after=2.5).retry_after == 2.5
    assert CircuitOpen("circuit open", retry_after=1.0).retry_after == 1.0
    assert HostedAIRejected("quota exceeded").code is None
    assert InsufficientResources("no room", code=10189007).code == 10189007
    assert AlreadySubscribed("Already subscribed", code=409).code == 409


@pytest.mark.parametrize("refusal", [HostedAIRejected, InsufficientResources, AlreadySubscribed, HostedAIAuthError])
def test_a_refusal_is_never_unavailability(refusal):
    """The client retries, and the circuit breaker counts, unavailability only."""
    assert not issubclass(refusal, HostedAIUnavailable)


def test_errors_sort_as_the_retry_rules_and_the_cli_read_them():
    assert issubclass(CircuitOpen, HostedAIUnavailable)  # failing fast is still "not answering"
    assert issubclass(Preempted, InferenceError)  # a preempted fragment failed its inference
    for wrong_input in (UnknownTenant, UnknownModel, UnknownPool):  # the CLI exits 2 on bad input
        assert issubclass(wrong_input, InvalidRequest)
    raised = [e for e in vars(errors).values() if isinstance(e, type) and issubclass(e, Exception)]
    assert len(raised) > 15 and all(issubclass(e, HomeskilletError) for e in raised)  # one line each in the CLI
