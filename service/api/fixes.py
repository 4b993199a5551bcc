"""Request hooks where vLLM 0.32's OpenAI server is wrong (docs/api.md lists each case):
run by the middleware on the raw JSON body of chat, completions and responses requests,
before vLLM's own validation. A hook either refuses with an OpenAI-shaped 4xx, or rewrites
the body into the request OpenAI's API means. Pure functions of the body: unit-testable."""

from __future__ import annotations

import functools
import json
from typing import Any

FIXED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
RESPONSES_ROLES = frozenset({"system", "developer", "user", "assistant"})
BOOLEANS = {
    "/v1/chat/completions": ("stream", "logprobs", "parallel_tool_calls", "store"),
    "/v1/completions": ("stream", "echo"),
    "/v1/responses": ("stream", "store", "background", "parallel_tool_calls"),
}


# OpenAI request fields vLLM 0.32's request models lack, whose absence cannot change the
# answer (hints about billing, caching, storage, moderation): accepted and ignored.
IGNORED_HINTS = frozenset({
    "metadata", "service_tier", "prompt_cache_key", "prompt_cache_options",
    "prompt_cache_retention", "safety_identifier", "prediction", "moderation", "access_programs",
    "background_options", "stream_options", "user"})
# Fields the route's model lacks that pass only at the value that asks for what this server
# does anyway; any other value is refused. OpenAI's `store` (chat and completions: nothing is
# stored here), and SGLang's fields, which vllm-router 0.1.17 adds to every request it forwards.
NO_OP_VALUES = {"store": False, "no_stop_trim": False, "return_hidden_states": False,
                "separate_reasoning": True, "stream_reasoning": True, "include_reasoning": True,
                "continue_final_message": False}
# Fields a client may well send that this server cannot honour: refused with what to use instead.
UNSUPPORTED = {
    "functions": "use `tools`", "function_call": "use `tool_choice`",
    "audio": "this server returns text only", "web_search_options": "this server has no web search",
    "conversation": "send the previous turns in `input`", "context_management": None, "image": None,
    "best_of": "use `n` and pick on the client side", "store": "nothing is stored here",
    **{k: "vLLM removed it: use `structured_outputs` or `response_format`" for k in (
        "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
        "guided_whitespace_pattern")},
}


class RequestRefused(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def fix_body(path: str, raw: bytes, rt: Any) -> tuple[bytes, str | None]:
    """The body to hand to vLLM (unchanged bytes when nothing needed fixing) and the
    body's ``request_id`` if it names one."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise RequestRefused(f"request body is not valid JSON: {_short(e)}") from None
    if not isinstance(body, dict):
        raise RequestRefused("request body must be a JSON object")
    if rt.settings.unknown_fields == "reject":
        check_fields(path, body)
    changed = fix_request(path, body, rt.settings, rt.vocab_size)
    rid = body.get("request_id") if isinstance(body.get("request_id"), str) else None
    if not changed:
        return raw, rid
    return json.dumps(body, ensure_ascii=False).encode(), rid


def _short(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)[:200]


def fix_request(path: str, body: dict[str, Any], settings: Any, vocab_size: int | None = None) -> bool:
    """Check and rewrite ``body`` in place; True when it changed."""
    changed = False
    # OpenAI: a null field means "not given". vLLM 0.32 refuses null for n, stream, ...
    for key in [k for k, v in body.items() if v is None]:
        del body[key]
        changed = True
    for key in BOOLEANS.get(path, ()):
        if key in body and not isinstance(body[key], bool):
            raise RequestRefused(f"{key} must be true or false, not {json.dumps(body[key])[:40]}", key)
    _check_counts(body, settings, vocab_size)
    if path == "/v1/chat/completions":
        _check_roles(body.get("messages"), CHAT_ROLES, "messages")
        changed |= _pin_forced_tool_arguments(body)
    elif path == "/v1/responses" and isinstance(body.get("input"), list):
        _check_roles(body["input"], RESPONSES_ROLES, "input")
    return changed


@functools.cache
def known_fields(path: str) -> frozenset[str]:
    """Every field name and alias of the route's vLLM request model."""
    if path == "/v1/chat/completions":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as model
    elif path == "/v1/completions":
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as model
    else:
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as model
    names = set(model.model_fields)
    names |= {f.alias for f in model.model_fields.values() if f.alias}
    return frozenset(names)


def check_fields(path: str, body: dict[str, Any]) -> None:
    """OpenAI refuses a field it does not know; vLLM 0.32 ignores it (logging at debug level),
    so a typo, or a field vLLM removed (``guided_json``), silently changes the answer."""
    known = known_fields(path)
    for key in body:
        if key in known or key in IGNORED_HINTS or (key == "best_of" and body[key] in (None, 1)):
            continue
        if key in NO_OP_VALUES and body[key] is NO_OP_VALUES[key]:
            continue
        if key in UNSUPPORTED or key in NO_OP_VALUES:
            hint = UNSUPPORTED.get(key)
            raise RequestRefused(f"{key} is not supported by this server" + (f"; {hint}" if hint else ""),
                                 key, code="unsupported_parameter")
        raise RequestRefused(f"Unrecognized request argument supplied: {key}", key, code="unknown_parameter")


def _check_counts(body: dict[str, Any], settings: Any, vocab_size: int | None) -> None:
    v = body.get("n")
    if isinstance(v, int) and not isinstance(v, bool) and v > settings.max_n:
        raise RequestRefused(f"n must be at most {settings.max_n}", "n")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > settings.max_stop:
        raise RequestRefused(f"at most {settings.max_stop} stop sequences are allowed", "stop")
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list):
            raise RequestRefused("stop_token_ids must be a list of token ids", "stop_token_ids")
        if len(ids) > settings.max_stop:
            raise RequestRefused(f"at most {settings.max_stop} stop_token_ids are allowed", "stop_token_ids")
        top = vocab_size or 2**31
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < top:
                raise RequestRefused(f"stop_token_ids: {json.dumps(t)[:40]} is not a token id of this "
                                     f"model (0 <= id < {top})", "stop_token_ids")


def _check_roles(messages: Any, roles: frozenset[str], param: str) -> None:
    if not isinstance(messages, list):
        return  # vLLM's own validation answers (a string input is valid for responses)
    for i, m in enumerate(messages):
        if isinstance(m, dict) and "role" in m and m["role"] not in roles:
            raise RequestRefused(
                f"{param}[{i}].role: {json.dumps(m['role'])[:40]} is not one of {sorted(roles)}",
                f"{param}[{i}].role")


def _pin_forced_tool_arguments(body: dict[str, Any]) -> bool:
    """A forced tool call (named ``tool_choice`` or ``"required"``) must produce arguments
    that match the tool's parameters schema. vLLM 0.32 constrains forced calls with a
    structural tag when the tool parser has one (hermes does), and leaves the arguments
    free unless the tool says ``"strict": true`` (or the server runs with
    ``--tool-strict-level parameter``): the model then wrote ``"gaben"`` for an object.
    Marking the forced tools strict (unless the client said otherwise) pins them."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return False
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            return False
        names = {_tool_name(t) for t in tools}
        if name not in names:
            raise RequestRefused(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        forced = {name}
    elif choice == "required":
        forced = {_tool_name(t) for t in tools}
    else:
        return False
    changed = False
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name") in forced and "strict" not in fn:
            fn["strict"] = True
            changed = True
    return changed


def _tool_name(tool: Any) -> str | None:
    fn = tool.get("function") if isinstance(tool, dict) else None
    return fn.get("name") if isinstance(fn, dict) else None
