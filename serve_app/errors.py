"""OpenAI's error JSON, for every error a client of the gateway can see."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

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


class GatewayError(Exception):
    """An error answer; Python handle callers get it raised, HTTP callers get it as JSON."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, retry_after_s: int | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.kind = kind or HTTPStatus(status).phrase.lower().replace(" ", "_")

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any]) -> GatewayError:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        return cls(status, str(error.get("message", body)), param=error.get("param"), kind=_kind_of(status, error))

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
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def __reduce__(self) -> tuple[Any, ...]:  # keeps keyword fields across Ray's pickling
        return (_rebuild, (self.status, self.message, self.param, self.retry_after_s, self.kind))


def _rebuild(status: int, message: str, param: str | None, retry_after_s: int | None, kind: str) -> GatewayError:
    return GatewayError(status, message, param=param, retry_after_s=retry_after_s, kind=kind)


def _kind_of(status: int, error: dict[str, Any]) -> str:
    kind = str(error.get("type") or HTTPStatus(status).phrase)
    return kind.removesuffix("Error").lower() or "error"
