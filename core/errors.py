"""The one error hierarchy of medkms.

Every error carries a message that is safe to show to a caller (no secrets, no
stack traces) and the gRPC status it maps to, by name, so that this module
imports nothing from grpc. Adapters translate their technology's exceptions
into these (``raise HsmUnavailable(...) from e``); the gRPC layer
(``proto.rpc``) is the only place that turns them into statuses.
"""

from __future__ import annotations


class KmsError(Exception):
    """Base class. ``str(e)`` is safe to send to a caller."""

    grpc_status = "INTERNAL"
    #: the id of the signed request this error answers, when known (the SDK sets it):
    #: the id the nodes' audit logs, and so the auditor's report, carry
    request_id = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(KmsError, ValueError):
    """The caller sent something malformed: wrong size, bad encoding, unknown value."""

    grpc_status = "INVALID_ARGUMENT"


class ConfigurationError(KmsError, ValueError):
    """A setting is missing or malformed (a config file, an environment variable, a TLS
    or PIN file): the operator's to fix, never a caller's request."""

    grpc_status = "FAILED_PRECONDITION"


class Unauthenticated(KmsError):
    """The caller could not be identified (bad or missing signature)."""

    grpc_status = "UNAUTHENTICATED"


class AccessDenied(KmsError, PermissionError):
    """The caller is identified, but the registry does not allow the request."""

    grpc_status = "PERMISSION_DENIED"


class NotFound(KmsError, LookupError):
    """A named object (record, patient, kfrag) does not exist."""

    grpc_status = "NOT_FOUND"


class PreconditionFailed(KmsError):
    """The system is not in a state where the request can be served."""

    grpc_status = "FAILED_PRECONDITION"


class ResourceExhausted(KmsError):
    """A rate or size limit was hit."""

    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(KmsError):
    """A dependency (chain, HSM, nodes) cannot be reached; retrying later may help."""

    grpc_status = "UNAVAILABLE"


class HsmUnavailable(Unavailable):
    """The PKCS#11 token cannot be opened or used."""


class ChainUnavailable(Unavailable):
    """The chain's JSON-RPC endpoint cannot be reached or answered nonsense."""


class ChainAnswerTooLarge(ChainUnavailable):
    """The answer to a request would be too large: more than this client reads, or more
    than the endpoint serves (a block range or result count over its limit). Ask for less."""


class ChainRejected(KmsError):
    """The registry contract reverted a transaction or call (e.g. ``NotPatient``)."""

    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        #: the contract's custom error name, e.g. "GrantNotFound", when known
        self.reason = reason


class InsufficientFunds(ChainRejected):
    """The chain refused a transaction because its sender cannot pay for the gas: the
    message names the account and how to fund it."""

    def __init__(self, message: str, account: str) -> None:
        super().__init__(message)  # the chain refused it, not the contract: no reason
        #: the sender's address (0x...), the account to fund
        self.account = account


class IntegrityError(KmsError):
    """Data failed a cryptographic check (bad tag, hash mismatch, bad cfrag)."""

    grpc_status = "DATA_LOSS"


class InsufficientFragments(Unavailable):
    """Fewer than the threshold of valid capsule fragments could be collected."""


_BY_STATUS: dict[str, type[KmsError]] = {
    cls.grpc_status: cls
    for cls in (
        InvalidRequest,
        Unauthenticated,
        AccessDenied,
        NotFound,
        PreconditionFailed,
        ResourceExhausted,
        Unavailable,
        IntegrityError,
    )
}
_BY_STATUS["DEADLINE_EXCEEDED"] = Unavailable


def error_for_status(status: str, message: str) -> KmsError:
    """The error class that stands for a gRPC status name, e.g. from a remote node."""
    error = _BY_STATUS.get(status, KmsError)(message)
    if error.grpc_status != status and status != "DEADLINE_EXCEEDED":
        error.grpc_status = status
    return error
