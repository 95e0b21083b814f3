"""The one exception hierarchy of veil, and its warnings.

Every error veil raises on purpose derives from :class:`VeilError`, so callers can
catch one type. Native exceptions from OpenFHE are translated at the engine boundary.
Every warning derives from :class:`VeilWarning`; :func:`warn` emits one at the first
line outside veil.
"""
import os
import sys
import warnings


class VeilError(Exception):
    """Base class of every error veil raises on purpose."""


class UnsupportedOperation(VeilError):
    """The model contains an operation veil cannot compile (names the op and the node)."""


class GraphError(VeilError):
    """The IR graph is malformed (dangling input, cycle, shape mismatch)."""


class CompileError(VeilError):
    """The model cannot be compiled with the requested options."""


class BootstrapRequiredError(CompileError):
    """The model is deeper than any 128-bit CKKS ring holds without bootstrapping,
    and bootstrapping cannot serve it either: one op needs more levels than a bootstrap
    leaves (a very high polynomial degree).

    Raised when such a model is asked to run under HE; ``simulate`` and the compile
    report (depth, bootstraps needed, keys, latency) still work. Carries ``depth``,
    ``max_depth`` and ``bootstraps``.
    """

    def __init__(self, message: str, *, depth: int = 0, max_depth: int = 0,
                 bootstraps: int = 0) -> None:
        super().__init__(message)
        self.depth, self.max_depth, self.bootstraps = depth, max_depth, bootstraps


class InputError(VeilError, ValueError):
    """An input array has the wrong shape, dtype, or non-finite values."""


class InputRangeError(InputError):
    """Input values lie outside the model's calibrated input range, where HE's
    polynomial activations are not accurate (``simulate`` refuses them the same way).

    The message names the first offending row (batch index) and feature (its index in
    the input shape), the value and the allowed range, and says how to proceed
    (``clip=True``). ``rows`` holds every offending row index and ``features`` every
    offending feature index (tuples into the per-sample input shape: ``(12,)`` for a
    flat input), both ascending; they are empty when rebuilt from a service's answer.
    """

    def __init__(self, message: str = "", *, rows: tuple[int, ...] = (),
                 features: tuple[tuple[int, ...], ...] = ()) -> None:
        super().__init__(message)
        self.rows, self.features = tuple(rows), tuple(features)


class ModeError(VeilError, ValueError):
    """An unknown or unavailable execution mode was requested."""


class BundleError(VeilError):
    """An exported bundle is missing, corrupt, or from an incompatible version."""


class SerializationError(VeilError):
    """Bytes received (ciphertext, keys) are malformed, tampered, or of the wrong kind."""


class KeyMaterialError(VeilError):
    """Base for key problems (missing, mismatched, or of the wrong role)."""


class MissingKeyError(KeyMaterialError):
    """An operation needs a key that was not generated or not provided."""


class KeyMismatchError(KeyMaterialError):
    """A ciphertext was encrypted under a different key than the session's keys."""


class KeyTypeError(KeyMaterialError, TypeError):
    """A key of the wrong role was supplied (e.g. a secret key offered to a server)."""


class EngineError(VeilError):
    """The homomorphic engine failed (native error translated)."""


class InsecureParametersError(VeilError):
    """Insecure parameters were requested without the explicit opt-in flag."""


class TEEError(VeilError):
    """Base for sealed (TEE) inference failures."""


class AttestationError(TEEError):
    """Evidence is malformed, its signature does not verify, or it does not answer the
    nonce this client sent (stale or replayed evidence). Nothing was sent."""


class PolicyError(AttestationError):
    """Authentic evidence that the policy refuses: an unknown measurement, an attester
    kind or key the policy does not trust, or an insecure attester without opt-in."""


class EvidenceExpiredError(PolicyError):
    """The evidence is older than the policy's maximum age (or from the future)."""


class DecryptionError(TEEError):
    """A sealed message could not be opened. Deliberately opaque: tampering, a wrong
    key and a truncated message all look the same."""


class ReplayError(TEEError):
    """A sealed request reuses a sequence number of its channel; it was not opened."""


class SessionError(TEEError):
    """A sealed request names a channel the enclave does not know (never attested, or
    expired): fetch fresh evidence."""


class KeyReleaseError(TEEError):
    """The key-release service refused to release a model key, or its answer was bad."""


class TransportError(VeilError):
    """A link between veil's processes failed: the peer is gone, timed out, or sent
    something that did not authenticate (:mod:`veil.backends.sockets`)."""


class ProcessError(VeilError):
    """A child process (enclave, MPC party or dealer) failed to start."""


class MpcError(VeilError):
    """An MPC inference failed: a party or the dealer died, stalled or misbehaved."""


class MpcRefusedError(MpcError):
    """MPC party 0 refused the client's shares (HTTP 400): the other share never reached
    party 1, the two shares' batch sizes differ, or a share is malformed. The request
    is the client's fault; send both shares again."""


class TicketError(VeilError):
    """A share came to MPC party 1 without a valid ticket: missing, forged, expired or
    for another request."""


class ServiceError(VeilError):
    """The inference service failed or could not be reached; the request may be retried.
    Raised by the SDK for transport failures and for answers that are not veil's."""


class UnavailableError(ServiceError):
    """A backend the service fronts (an enclave, an MPC party) cannot be reached
    (HTTP 503); the request may be retried later."""


class AuthError(VeilError):
    """A request carried no API key, or one that is unknown or revoked (HTTP 401)."""


class ForbiddenError(AuthError):
    """A valid API key whose role does not allow this request (HTTP 403), e.g. a client
    key uploading model weights, or a model owner's key for another model."""


class NotFoundError(VeilError):
    """No such model or session. Deliberately the same for a session that never existed,
    has expired, or belongs to another client, so callers learn nothing about others."""


class SessionExpiredError(NotFoundError):
    """The session existed for this client but outlived its time to live (it is deleted).
    Looks exactly like :class:`NotFoundError` on the wire."""


class PayloadTooLargeError(VeilError):
    """A request body exceeds the limit of its route (HTTP 413); nothing of it was kept."""


class RejectedInputError(SerializationError):
    """Bytes that passed the checks still made the evaluator process fail (it died on
    them). Only that request fails; the worker is restarted (HTTP 400)."""


class RateLimitError(VeilError):
    """A per-client quota or rate limit is exhausted (HTTP 429). ``retry_after`` is the
    number of seconds after which the same request may succeed."""

    def __init__(self, message: str = "", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, float(retry_after))


class StorageFullError(VeilError):
    """The service's storage budget cannot take this upload now (HTTP 507); nothing of
    it was kept. Retry later or ask the operator for a larger disk budget."""


class MediaTypeError(SerializationError):
    """A request body has the wrong Content-Type for its route (HTTP 415)."""


class ResourceError(VeilError):
    """A run would exceed a configured resource budget (memory, time)."""


class ModelTooLargeError(ResourceError):
    """The model's estimated peak memory exceeds a process's budget; raised before
    anything is allocated. The message names the model, the estimate and the budget."""


class VeilWarning(UserWarning):
    """Base class of every warning veil issues: the call succeeded, but the result is
    likely not what the caller wants. Filter on it, or silence one kind with
    ``warnings.filterwarnings("ignore", category=...)``; a compile's warnings are also
    in ``compiled.report()``'s notes."""


class InputClippedWarning(VeilWarning):
    """Inputs were clamped to the model's calibrated input range (``clip=True``); the
    message counts the values and rows that changed."""


class ApproximationWarning(VeilWarning):
    """An activation's polynomial is far from the activation on its calibrated range
    (its error is a large part of the activation's output span)."""


class TrainingModeWarning(VeilWarning):
    """A torch model in training mode was compiled; veil reads it as in eval mode."""


class DepthWarning(VeilWarning):
    """The HE depth forces a larger CKKS ring (or bootstrapping) than the model's slots
    need: every operation and every key costs more."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(warning: VeilWarning) -> None:
    """Emit ``warning`` attributed to the first caller outside veil (the user's line,
    however deep in veil it was found), so the default filter shows it once per line
    of the user's code."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    warnings.warn(warning, stacklevel=level)
