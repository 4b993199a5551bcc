"""Command line: ``python -m service serve|prepare-model``."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from pydantic import ValidationError


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    from service.settings import Settings

    for name, f in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ann = f.annotation
        if ann is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f.description)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                           help=f.description or f"(env GATEWAY_{name.upper()})")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "func") and v is not None}
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as e:
        print(f"invalid settings: {e}", file=sys.stderr)
        return 2
    from service.server import run_server

    _setup_logging(settings.log_level)
    return run_server(create_app(settings), settings)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from service.model_prep import PrepareError, prepare_default_model

    _setup_logging("info")
    try:
        result = prepare_default_model(Path(args.output), force=args.force)
    except PrepareError as e:
        print(f"prepare-model: {e}", file=sys.stderr)
        return 1
    print(f"{'prepared' if result.created else 'already prepared'}: {result.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the gateway (every flag is also a GATEWAY_* env var)")
    _add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    prep = sub.add_parser("prepare-model", help="build the default model folder from the shipped GGUF")
    prep.add_argument("--output", default="models/SmolLM2-135M-Instruct")
    prep.add_argument("--force", action="store_true", help="rebuild even if it is already prepared")
    prep.set_defaults(func=cmd_prepare_model)
    return parser


def main(argv: typing.Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
