"""vLLM's own flags, parsed by vLLM's own parser (``make_arg_parser``, what ``vllm serve``
uses): the profile's vLLM keys and ``GATEWAY_<FLAG>`` env vars become command-line tokens
placed before the flags given on the command line, so the command line wins and every value
is checked by vLLM exactly as ``vllm serve`` checks it."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Sequence

from service.settings import Settings

log = logging.getLogger(__name__)

#: vLLM flags the gateway owns or must keep: set from our settings, refused on the command line
OWNED = {"host": "--host (use the gateway's --host)", "port": "--port (use the gateway's --port)",
         "uds": "--uds (the gateway listens on --host/--port)"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class VllmArgsError(ValueError):
    pass


def vllm_parser() -> argparse.ArgumentParser:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm (flags after the gateway's own)"))


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _long_flag(action: argparse.Action, negative: bool = False) -> str:
    flags = [f for f in action.option_strings if f.startswith("--")]
    if negative:
        neg = [f for f in flags if f.startswith("--no-")]
        return neg[0] if neg else ""
    return next(f for f in flags if not f.startswith("--no-"))


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise VllmArgsError(f"{name}: expected true or false, got {value!r}")


def to_tokens(name: str, value: Any, action: argparse.Action) -> list[str]:
    """One profile/env value as vLLM command-line tokens."""
    if value is None:
        return []
    if action.nargs == 0:  # store_true / BooleanOptionalAction
        on = _as_bool(name, value)
        if on:
            return [_long_flag(action)]
        neg = _long_flag(action, negative=True)
        if neg:
            return [neg]
        if action.default in (False, None):
            return []
        raise VllmArgsError(f"{name}: vLLM has no flag to turn this off")
    flag = _long_flag(action)
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    if isinstance(value, (list, tuple)):
        items = [json.dumps(v) if isinstance(v, dict) else str(v) for v in value]
        if action.nargs in ("+", "*"):
            return [flag, *items]
        if isinstance(action, argparse._AppendAction):
            return [t for v in items for t in (flag, v)]
        raise VllmArgsError(f"{name}: takes one value, got a list")
    if isinstance(value, bool):
        value = str(value).lower()
    if action.nargs in ("+", "*") and isinstance(value, str):
        return [flag, *[v for v in value.replace(",", " ").split() if v]]
    return [flag, str(value)]


def _cli_dests(parser: argparse.ArgumentParser, cli: Sequence[str]) -> set[str]:
    by_flag = parser._option_string_actions
    dests = set()
    for tok in cli:
        if tok.startswith("-"):
            head = tok.split("=", 1)[0]
            action = by_flag.get(head) or by_flag.get(head.replace("_", "-"))
            if action is not None:
                dests.add(action.dest)
    return dests


def build_vllm_args(settings: Settings, cli: Sequence[str] = ()) -> argparse.Namespace:
    """vLLM's Namespace: profile and env values first, then the command line."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    parser = vllm_parser()
    actions = _actions(parser)
    on_cli = _cli_dests(parser, cli)
    tokens: list[str] = []
    unknown = []
    for name, value in settings.vllm_args.items():
        if name in on_cli:
            continue  # the command line wins (and vLLM warns about duplicate flags)
        action = actions.get(name)
        if action is None:
            unknown.append(name)
            continue
        if name in OWNED:
            raise VllmArgsError(f"vLLM's {OWNED[name]}")
        tokens += to_tokens(name, value, action)
    if unknown:
        raise VllmArgsError(
            f"unknown settings {sorted(unknown)}: neither a gateway setting nor a vLLM flag "
            "(profile keys and GATEWAY_* variables)")
    for tok in cli:
        head = tok.split("=", 1)[0].replace("_", "-")
        for name, why in OWNED.items():
            if head == "--" + name:
                raise VllmArgsError(f"vLLM's {why}")
    try:
        args = parser.parse_args([*tokens, *cli])
    except SystemExit as e:  # argparse already printed the reason
        raise VllmArgsError(f"invalid vLLM flags: {' '.join([*tokens, *cli])}") from e
    args.host, args.port = settings.host, settings.port
    if args.disable_log_stats:
        log.warning("--disable-log-stats ignored: the gateway's engine-state metrics need the stats")
        args.disable_log_stats = False
    validate_parsed_serve_args(args)
    return args


def served_name(args: argparse.Namespace) -> str:
    names = args.served_model_name
    return names[0] if names else args.model
