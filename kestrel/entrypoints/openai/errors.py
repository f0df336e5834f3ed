"""Errors in the OpenAI JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Owns the mapping from kestrel's exceptions (ValueError for bad input, QueueFullError,
EngineDeadError) and HTTP failures to status codes and error bodies. Must not know routes.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from kestrel.engine.async_engine import EngineDeadError, QueueFullError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}
# "top_p must be ...", "prompt_token_ids contains ...": the leading word names the field.
_FIELD = re.compile(r"^([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_]+)?)\b", re.I)
_NOT_FIELDS = {"the", "a", "an", "no", "only"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else
                                       "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(exc: BaseException | str, param: str | None = None) -> APIError:
    message = str(exc)
    if param is None:
        match = _FIELD.match(message)
        if match and match.group(1).lower() not in _NOT_FIELDS:
            param = match.group(1)
    return APIError(400, message, param=param)


def from_exception(exc: BaseException) -> APIError:
    """Map an exception raised while handling a request to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(exc)
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), code="queue_full")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not running: {exc}", code="engine_dead")
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error")


def http_error(status: int, detail: Any = None) -> APIError:
    message = detail if isinstance(detail, str) and detail else HTTPStatus(status).phrase
    return APIError(status, message)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic/FastAPI validation errors -> one 400 naming the first bad field."""
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    # Union members add their type name to the location (e.g. "list[int]"): drop them.
    field = ".".join(p for p in loc if not re.search(r"[\[\]\s]|^(str|int|float)$", p))
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {message}")
    if first.get("type") == "missing":
        return APIError(400, f"{field or 'body'} is required", param=field or None)
    if first.get("type") == "value_error":  # our own validators: the message names the field
        return bad_request(message.removeprefix("Value error, "))
    text = f"{field}: {message}" if field else message
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, text, param=field or None)
