"""The one table between veil exceptions and HTTP answers, used by both ends.

The server turns an exception into ``status`` + ``{"error": {"code", "message"}}``
(:func:`install_handlers`); the SDK turns such a body back into the same exception
type (:func:`exception_for`). Codes are stable strings: clients branch on them, never
on messages. The most specific class of an exception's MRO that the table lists wins.

Anything not in the table (a bug) becomes 500 ``internal`` with a generic message; the
traceback goes to the ``veil.service`` log, never into the response.
"""
from __future__ import annotations

import logging
import math
from typing import NamedTuple

from ..errors import (AttestationError, AuthError, BootstrapRequiredError, BundleError,
                      CompileError, DecryptionError, EngineError, EvidenceExpiredError,
                      ForbiddenError, GraphError, InputError, InputRangeError,
                      InsecureParametersError, KeyMaterialError, KeyMismatchError,
                      KeyReleaseError, KeyTypeError, MediaTypeError, MissingKeyError,
                      ModeError, ModelTooLargeError, MpcError, MpcRefusedError,
                      NotFoundError, PayloadTooLargeError, PolicyError, ProcessError,
                      RateLimitError, RejectedInputError, ReplayError, ResourceError,
                      SerializationError, ServiceError, SessionError, SessionExpiredError,
                      StorageFullError, TEEError, TicketError, TransportError,
                      UnavailableError, UnsupportedOperation, VeilError)

log = logging.getLogger("veil.service")


class ErrorSpec(NamedTuple):
    exc: type[VeilError]
    status: int
    code: str


# Every class of veil.errors has a row (tests/test_errors.py walks the module). Order
# matters only for codes shared by several classes: the first row of a code is the
# class the SDK raises for it (so "refused" comes back as VeilError); WIRE_ALIASES
# lists the classes that share a code on purpose.
ERRORS: tuple[ErrorSpec, ...] = (
    ErrorSpec(VeilError, 400, "refused"),
    ErrorSpec(TEEError, 400, "refused"),
    ErrorSpec(AuthError, 401, "unauthorized"),
    ErrorSpec(ForbiddenError, 403, "forbidden"),
    ErrorSpec(NotFoundError, 404, "not-found"),
    ErrorSpec(SessionExpiredError, 404, "not-found"),
    ErrorSpec(PayloadTooLargeError, 413, "too-large"),
    ErrorSpec(MediaTypeError, 415, "media-type"),
    ErrorSpec(InputError, 422, "input"),
    ErrorSpec(InputRangeError, 422, "input-range"),
    ErrorSpec(SerializationError, 400, "malformed"),
    ErrorSpec(RejectedInputError, 400, "rejected-input"),
    ErrorSpec(KeyTypeError, 400, "key-type"),
    ErrorSpec(KeyMismatchError, 409, "key-mismatch"),
    ErrorSpec(MissingKeyError, 409, "missing-key"),
    ErrorSpec(ModeError, 404, "mode"),
    ErrorSpec(InsecureParametersError, 400, "insecure"),
    # OpenFHE failing on a request's bytes: the only engine input a client controls is
    # its ciphertext, so this is the client's problem; the native detail is only logged.
    ErrorSpec(EngineError, 400, "engine"),
    ErrorSpec(DecryptionError, 400, "sealed"),
    ErrorSpec(ReplayError, 409, "replay"),
    ErrorSpec(SessionError, 404, "session"),
    ErrorSpec(AttestationError, 400, "attestation"),
    ErrorSpec(PolicyError, 403, "policy"),
    ErrorSpec(EvidenceExpiredError, 403, "expired"),
    ErrorSpec(KeyReleaseError, 403, "key-release"),
    # A served bundle that cannot be read is the operator's fault, not the client's.
    ErrorSpec(BundleError, 500, "bundle"),
    ErrorSpec(RateLimitError, 429, "rate-limited"),
    ErrorSpec(StorageFullError, 507, "storage-full"),
    ErrorSpec(UnavailableError, 503, "unavailable"),
    ErrorSpec(ServiceError, 500, "internal"),
    # A model the service was asked to compile or run cannot be: the request's fault.
    ErrorSpec(UnsupportedOperation, 422, "unsupported"),
    ErrorSpec(GraphError, 422, "graph"),
    ErrorSpec(CompileError, 422, "compile"),
    ErrorSpec(BootstrapRequiredError, 422, "bootstrap-required"),
    ErrorSpec(KeyMaterialError, 400, "key"),
    ErrorSpec(TicketError, 403, "ticket"),
    # The service's own backends failed (a dealer or party, a link, a child process):
    # the client's input was checked before it left, so never a 4xx; a link's or a
    # process's detail goes only to the log (_OPAQUE).
    ErrorSpec(MpcError, 502, "mpc"),
    ErrorSpec(MpcRefusedError, 400, "mpc-refused"),
    ErrorSpec(TransportError, 502, "transport"),
    ErrorSpec(ProcessError, 503, "process"),
    ErrorSpec(ResourceError, 507, "resource"),
    ErrorSpec(ModelTooLargeError, 507, "model-too-large"),
)
# Classes that answer with their base's code on purpose: an expired session must look
# exactly like one that never existed, and a TEE failure without a code of its own is
# a refusal. The SDK raises the base class for them.
WIRE_ALIASES: dict[type[VeilError], type[VeilError]] = {
    SessionExpiredError: NotFoundError, TEEError: VeilError}
_BY_CLASS = {row.exc: row for row in ERRORS}
_BY_CODE: dict[str, type[VeilError]] = {}
for _row in ERRORS:
    _BY_CODE.setdefault(_row.code, _row.exc)
INTERNAL = ErrorSpec(ServiceError, 500, "internal")
# Messages of these classes are replaced: their text may carry native detail.
_OPAQUE = {EngineError: "the homomorphic evaluation failed on this input",
           TransportError: "a link between the service's processes failed",
           ProcessError: "a process of the service did not start",
           BundleError: "the service cannot read this model's bundle",
           DecryptionError: "the sealed message could not be opened"}
# Errors of the HTTP layer itself (unknown route, wrong method, bad parameters).
HTTP_CODES = {400: "malformed", 401: "unauthorized", 404: "not-found",
              405: "method-not-allowed", 413: "too-large", 415: "media-type", 422: "input",
              429: "rate-limited"}


def spec_for(exc: BaseException) -> ErrorSpec:
    """The table row of the most specific listed class of ``exc`` (INTERNAL if none)."""
    for cls in type(exc).__mro__:
        row = _BY_CLASS.get(cls)
        if row is not None:
            return row
    return INTERNAL


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def public_message(exc: VeilError) -> str:
    for cls, text in _OPAQUE.items():
        if isinstance(exc, cls):
            return text
    return str(exc) or type(exc).__name__


def exception_for(code: str, message: str, status: int | None = None,
                  retry_after: float | None = None) -> VeilError:
    """The exception the SDK raises for an error body: same type as on the server.

    Unknown codes (a newer server) become :class:`ServiceError`."""
    cls = _BY_CODE.get(code, ServiceError)
    exc = cls(message)
    if retry_after is not None and isinstance(exc, RateLimitError):
        exc.retry_after = retry_after
    exc.status = status
    exc.code = code
    return exc


def install_handlers(app) -> None:
    """Register the exception handlers that make every error a JSON body."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def veil_error(request, exc: VeilError):
        row = spec_for(exc)
        if row.status >= 500:
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        else:
            log.debug("%s %s refused: %r", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "Bearer"} if row.status == 401 else None
        if isinstance(exc, RateLimitError):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        return JSONResponse(error_body(row.code, public_message(exc)), row.status,
                            headers=headers)

    async def http_error(request, exc: HTTPException):
        code = HTTP_CODES.get(exc.status_code, "http")
        detail = exc.detail if isinstance(exc.detail, str) else code
        return JSONResponse(error_body(code, detail), exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def validation_error(request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                          for e in exc.errors()[:5])
        return JSONResponse(error_body("input", f"invalid request: {where}"), 422)

    async def unexpected(request, exc: Exception):
        log.error("%s %s crashed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(INTERNAL.code, "internal server error"), 500)

    app.add_exception_handler(VeilError, veil_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
