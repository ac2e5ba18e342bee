"""Every error a client of the gateway can see, in OpenAI's error JSON, and the one place each is mapped.

    GatewayError            an error answer: HTTP callers get it as JSON, handle callers get it raised
      .status               its HTTP status
      .kind: ErrorKind      why, as counted in /v1/stats and /metrics

Where errors come from, and where they are mapped:
- the policies' refusals (`policy.refusals`): `refusal_error`;
- an engine's error answer, whole or as an event in a stream: `GatewayError.from_body`;
- the gateway's own checks: raised as GatewayError where they are made.
"""

from __future__ import annotations

from enum import Enum
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

from serve_app.policy.refusals import NotReady, QueueFull, QueueTimeout, Refused, Shed

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ErrorKind(str, Enum):
    """Why a request was rejected, cancelled or failed: the `kind` label of the gateway's figures."""

    # the request itself
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TOO_LARGE = "too_large"
    # load
    RATE_LIMITED = "rate_limited"
    SHED = "shed"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    NOT_READY = "not_ready"
    # the client
    CLIENT_GONE = "client_gone"
    CLIENT_GONE_WHILE_QUEUED = "client_gone_while_queued"
    # the gateway and its engines
    ADMISSION_FAILED = "admission_failed"
    ADMISSION_RECOVERING = "admission_recovering"  # Admission restarted: 503 until its state is rebuilt
    ENGINE_ERROR = "engine_error"
    ENGINE_UNREACHABLE = "engine_unreachable"
    SHUTDOWN = "shutdown"
    INTERNAL = "internal_error"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def for_status(cls, status: int) -> ErrorKind:
        """The kind of an error answer known only by its status: the gateway's own, or an engine's."""
        return _STATUS_KINDS.get(status) or (cls.ENGINE_ERROR if status >= 500 else cls.BAD_REQUEST)


_STATUS_KINDS = {
    400: ErrorKind.BAD_REQUEST,
    401: ErrorKind.UNAUTHORIZED,
    403: ErrorKind.FORBIDDEN,
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED,
    413: ErrorKind.TOO_LARGE,
    422: ErrorKind.BAD_REQUEST,
    429: ErrorKind.RATE_LIMITED,
    500: ErrorKind.INTERNAL,
}


class GatewayError(Exception):
    """An error answer; Python handle callers get it raised, HTTP callers get it as JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: int | None = None,
        kind: ErrorKind | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.kind = ErrorKind(kind) if kind else ErrorKind.for_status(status)
        self.headers = headers or {}

    @classmethod
    def from_body(cls, status: int, body: Any) -> GatewayError:
        """An engine's error answer (OpenAI's error JSON, or anything else), as the gateway counts it: a 5xx
        is an engine error, whatever the engine called it."""
        error = body.get("error", {}) if isinstance(body, dict) else {}
        error = error if isinstance(error, dict) else {}
        kind = ErrorKind.ENGINE_ERROR if status >= 500 else ErrorKind.for_status(status)
        return cls(status, str(error.get("message", body)), param=error.get("param"), kind=kind)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, HTTPStatus(self.status).phrase.replace(" ", "")),
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)

    def __reduce__(self) -> tuple[Any, ...]:  # keeps keyword fields across Ray's pickling
        return (_rebuild, (self.status, self.message, self.param, self.retry_after_s, self.kind, self.headers))


def _rebuild(
    status: int, message: str, param: str | None, retry_after_s: int | None, kind: ErrorKind, headers: dict[str, str]
) -> GatewayError:
    return GatewayError(status, message, param=param, retry_after_s=retry_after_s, kind=kind, headers=headers)


_REFUSALS: dict[type[Refused], tuple[int, ErrorKind]] = {
    Shed: (429, ErrorKind.SHED),
    QueueFull: (429, ErrorKind.QUEUE_FULL),
    QueueTimeout: (429, ErrorKind.QUEUE_TIMEOUT),
    NotReady: (503, ErrorKind.NOT_READY),
}


def file_too_large(size: int, limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"the file is {size} bytes; the limit is {limit} (batch.max_file_bytes): split it into several batches",
        kind=ErrorKind.TOO_LARGE,
    )


def refusal_error(exc: Refused, message: str | None = None) -> GatewayError:
    """429 for load (retry later), 503 while no replica can serve; both with Retry-After."""
    status, kind = _REFUSALS[type(exc)]
    text = message or (f"{exc}; retry later" if status == 429 else str(exc))
    return GatewayError(status, text, retry_after_s=exc.retry_after_s, kind=kind)
