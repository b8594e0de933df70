"""Errors the dashboard answers with, in Anthropic's error shape for the API and as a page for a browser.

DashboardError
├── BadRequestError         400 invalid_request_error   (a parameter is malformed; the message names it)
├── NotAuthenticatedError   401 authentication_error    (pages: redirect to the login form instead)
├── ForbiddenError          403 permission_error        (an identity outside the allowed domains, CSRF)
├── NotFoundError           404 not_found_error
└── UnavailableError        503 api_error               (the database cannot be reached)
"""

from __future__ import annotations

from typing import Any


class DashboardError(Exception):
    status = 500
    error_type = "api_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return error_body(self.error_type, self.message)


class BadRequestError(DashboardError):
    status = 400
    error_type = "invalid_request_error"


class NotAuthenticatedError(DashboardError):
    status = 401
    error_type = "authentication_error"


class ForbiddenError(DashboardError):
    status = 403
    error_type = "permission_error"


class NotFoundError(DashboardError):
    status = 404
    error_type = "not_found_error"


class UnavailableError(DashboardError):
    status = 503
    error_type = "api_error"


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}
