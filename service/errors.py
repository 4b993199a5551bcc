"""One error shape, one place that renders it: the OpenAI body
``{"error": {"message", "type", "param", "code"}}``, for our own refusals, for every error
vLLM's server or FastAPI produces (re-shaped by the middleware), and for SSE streams."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

#: OpenAI's error types by HTTP status
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if status < 500 else "internal_server_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_bytes(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(error_body(message, error_type(status), param, code)).encode()


def sse_error(status: int, message: str, code: str | None = None) -> bytes:
    """The error as a final SSE event (a stream cannot change its status code)."""
    return b"data: " + error_bytes(status, message, code) + b"\n\n"


def _code_for(status: int, message: str) -> str | None:
    m = message.lower()
    if status == 404 and "model" in m and "does not exist" in m:
        return "model_not_found"
    if status == 400 and ("maximum context length" in m or "context length" in m
                          or "max_model_len" in m or "too long" in m):
        return "context_length_exceeded"
    if status == 413:
        return "request_too_large"
    return None


def _param_from_vllm(param: Any) -> str | None:
    if not isinstance(param, str) or not param:
        return None
    return param.removeprefix("body.") or None


def normalize(status: int, raw: bytes) -> bytes:
    """Any error body (vLLM's ``{"error": {..., "type": "BadRequestError", "code": 400}}``,
    FastAPI's ``{"detail": ...}``, plain text) in the OpenAI shape with OpenAI's types."""
    message, param, code = "", None, None
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        e = data["error"]
        message = str(e.get("message") or "")
        param = _param_from_vllm(e.get("param"))
        if isinstance(e.get("code"), str) and not e["code"].isdigit():
            code = e["code"]
    elif isinstance(data, dict) and "detail" in data:
        d = data["detail"]
        message = d if isinstance(d, str) else json.dumps(d)[:1000]
    elif isinstance(data, dict) and isinstance(data.get("message"), str):
        message = data["message"]
    elif raw:
        message = raw.decode("utf-8", "replace")[:1000]
    if not message:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = "error"
    if status == 400 and message.startswith("1 validation error") and "json_invalid" in message:
        message = "request body is not valid JSON: " + message.split("'msg': ", 1)[-1][:200]
    code = code or _code_for(status, message)
    return json.dumps(error_body(message, error_type(status), param, code)).encode()


def is_openai_error(raw: bytes, status: int) -> bool:
    """Already in the OpenAI shape with OpenAI's type (nothing to rewrite)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    e = data.get("error") if isinstance(data, dict) else None
    return (isinstance(e, dict) and set(data) == {"error"}
            and set(e) == {"message", "type", "param", "code"}
            and e.get("type") == error_type(status) and not isinstance(e.get("code"), int))
