"""Errors every layer raises; each message names the problem in words a user can act on."""


class HomeskilletError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class InvalidRequest(HomeskilletError):
    """The request itself is wrong: empty, too long, malformed."""


class UnknownTenant(InvalidRequest):
    pass


class UnknownModel(InvalidRequest):
    pass


class UnknownPool(InvalidRequest):
    pass


class NoRoute(HomeskilletError):
    """No model and pool satisfy the request's constraints with the catalog as it is (not bad
    input as such: another catalog, budget or constraint could serve it)."""


class CovenantViolation(HomeskilletError):
    """The request would break its tenant's covenant: the message names the tenant, the term, its
    limit and the current usage. Nothing is allocated for it (or what was, is released)."""

    def __init__(self, tenant: str, term: str, limit: object, usage: object, detail: str = ""):
        self.tenant, self.term, self.limit, self.usage = tenant, term, limit, usage
        tail = f"; {detail}" if detail else ""
        super().__init__(f"tenant {tenant!r} covenant term {term}: limit {limit}, current usage {usage}{tail}")


class CapacityTimeout(HomeskilletError):
    """A pool had no room for the slice within the wait limit."""


class AllocationNotFound(HomeskilletError):
    """No active allocation with that id for that tenant (another tenant's looks the same)."""


class InferenceError(HomeskilletError):
    """The model endpoint failed or answered something unusable."""


class ServiceError(HomeskilletError):
    """A local service (PostgreSQL, Prefect server, model server) failed to start or answer."""


class Preempted(InferenceError):
    """The GPU share disappeared under the fragment (a preemptible subscription was reclaimed)."""


class HostedAIError(HomeskilletError):
    """hosted·ai answered with an error, or not at all."""


class HostedAIUnavailable(HostedAIError):
    """Timeouts, connection errors, 5xx without a business code, 429: worth retrying later."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(HostedAIUnavailable):
    """Too many failures in a row: calls fail fast until the breaker half-opens."""


class HostedAIRejected(HostedAIError):
    """A business error: the call was understood and refused."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class InsufficientResources(HostedAIRejected):
    pass


class AlreadySubscribed(HostedAIRejected):
    pass


class HostedAIAuthError(HostedAIError):
    """401/403: the key is wrong, expired, revoked or IP-blocked, or the team is not the key's."""


class MissingCredentials(HomeskilletError):
    pass


class TooManyRequests(HomeskilletError):
    """A fair-share limit of a server: the caller may try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# What a tenant may read of an error: its own request's problems (bad input, its covenant, no
# route in what it may use, its own allocations, its own limits) in full. Anything else comes from
# a shared or upstream part (the pool, a model server, hosted·ai, PostgreSQL) and may name other
# tenants' load, internal addresses or an upstream's words: the tenant gets the kind of failure
# and the request id, and the operator's log the whole message.
TENANT_SAFE = (InvalidRequest, NoRoute, CovenantViolation, AllocationNotFound, TooManyRequests)
GENERIC = {
    CapacityTimeout: "no GPU capacity was free within the wait; retry later",
    Preempted: "the GPU share was reclaimed and no other could finish the request",
    InferenceError: "a model failed to answer",
    HostedAIError: "the GPU provider failed to serve the request",
    ServiceError: "a service of the orchestrator is unavailable",
}


def public_message(exc: BaseException, request_id: str) -> str:
    """The message a tenant is shown for `exc` raised by its request `request_id`."""
    if isinstance(exc, TENANT_SAFE):
        return f"{type(exc).__name__}: {exc}"
    what = next((text for kind, text in GENERIC.items() if isinstance(exc, kind)), "the request failed")
    name = type(exc).__name__ if isinstance(exc, HomeskilletError) else "InternalError"
    return f"{name}: {what} (request {request_id}; the operator's log has the details)"
