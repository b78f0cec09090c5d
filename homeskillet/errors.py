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


class NoRoute(InvalidRequest):
    """No model and pool satisfy the request's constraints."""


class CapacityTimeout(HomeskilletError):
    """A pool had no room for the slice within the wait limit."""


class AllocationNotFound(HomeskilletError):
    """No active allocation with that id for that tenant (another tenant's looks the same)."""


class InferenceError(HomeskilletError):
    """The model endpoint failed or answered something unusable."""


class ServiceError(HomeskilletError):
    """A local service (PostgreSQL, Prefect server, model server) failed to start or answer."""
