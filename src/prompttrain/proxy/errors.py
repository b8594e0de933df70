"""Errors the proxy answers itself, each rendered in Anthropic's error shape.

ProxyError
├── InvalidRequestError        400 invalid_request_error
├── AuthenticationError        401 authentication_error
├── PermissionDeniedError      403 permission_error
├── NotFoundError              404 not_found_error
├── RequestTooLargeError       413 request_too_large
├── UpstreamUnreachableError   502 api_error
├── ServiceUnavailableError    503 api_error
└── UpstreamTimeoutError       504 timeout_error
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson


class ProxyError(Exception):
    status = 500
    error_type = "api_error"

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def body(self, request_id: str) -> bytes:
        return orjson.dumps(
            {
                "type": "error",
                "error": {"type": self.error_type, "message": self.message},
                "request_id": request_id,
            }
        )


class InvalidRequestError(ProxyError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(ProxyError):
    status = 401
    error_type = "authentication_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, {"www-authenticate": 'Bearer realm="Agent Prompt Train"'})


class PermissionDeniedError(ProxyError):
    status = 403
    error_type = "permission_error"


class NotFoundError(ProxyError):
    status = 404
    error_type = "not_found_error"


class RequestTooLargeError(ProxyError):
    status = 413
    error_type = "request_too_large"


class UpstreamUnreachableError(ProxyError):
    status = 502
    error_type = "api_error"


class ServiceUnavailableError(ProxyError):
    status = 503
    error_type = "api_error"


class UpstreamTimeoutError(ProxyError):
    status = 504
    error_type = "timeout_error"
