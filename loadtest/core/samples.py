"""Small sample files of every dataset and trace format (``python -m loadtest samples``).

The files under ``configs/loadtest/samples/`` are this module's output (deterministic:
the same bytes on every run), so the formats can be tried and tested offline:
``sharegpt.json`` (multi-turn conversations), ``azure.csv`` (an Azure LLM inference trace
with the public trace's columns and timestamp style) and ``mooncake.jsonl`` (a Mooncake
trace whose requests share leading hash ids, i.e. prompt prefixes). The texts and figures
are made up: they have the public formats' shape, not their content.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

_TOPICS = ["paged attention", "grouped-query attention", "prefix caching", "speculative decoding",
           "continuous batching", "KV-cache quantization"]  # fmt: skip
_FOLLOW_UPS = ["Can you give a concrete example?", "How does that change the memory needed per token?",
               "What would you measure to check it?", "Summarize that in two sentences."]  # fmt: skip


def sharegpt(count: int = 4, seed: int = 0) -> list[dict]:
    """``count`` ShareGPT conversations of 2-4 turns (a system prompt in every other one)."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for i in range(count):
        topic = _TOPICS[i % len(_TOPICS)]
        messages = [{"from": "system", "value": "You are a concise assistant for ML systems engineers."}] if i % 2 else []
        for k in range(int(rng.integers(2, 5))):
            question = f"Explain {topic} in a serving engine." if k == 0 else _FOLLOW_UPS[(i + k) % len(_FOLLOW_UPS)]
            answer = " ".join(["It"] + [f"{topic.split()[0]}-{int(v)}" for v in rng.integers(0, 999, 8 + 4 * k)]) + "."
            messages += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        out.append({"id": f"sample-{i}", "conversations": messages})
    return out


def azure_csv(count: int = 20, seed: int = 0, rate: float = 2.0) -> str:
    """An Azure trace CSV of ``count`` requests, Poisson arrivals at ``rate``/s."""
    rng = np.random.default_rng([seed, 2])
    start = datetime(2023, 11, 16, 18, 15, 46)
    t = 0.0
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for _ in range(count):
        stamp = start + timedelta(seconds=t)
        lines.append(f"{stamp:%Y-%m-%d %H:%M:%S}.{stamp.microsecond:06d}0,{int(rng.integers(24, 160))},"
                     f"{int(rng.integers(4, 32))}")  # fmt: skip
        t += float(rng.exponential(1.0 / rate))
    return "\n".join(lines) + "\n"


def mooncake_jsonl(count: int = 20, seed: int = 0, rate: float = 2.0, prefixes: int = 3) -> str:
    """A Mooncake trace of ``count`` requests: each starts with one of ``prefixes`` shared
    block runs (hash ids), then 0-1 blocks of its own; the last block is partial."""
    rng = np.random.default_rng([seed, 3])
    shared = [[100 * p + b for b in range(1 + p % 2)] for p in range(prefixes)]
    next_id = 1000
    t_ms = 0
    lines = []
    for _ in range(count):
        ids = list(shared[int(rng.integers(0, prefixes))])
        for _ in range(int(rng.integers(0, 2))):
            ids.append(next_id)
            next_id += 1
        length = 512 * (len(ids) - 1) + int(rng.integers(64, 513))
        line = {"timestamp": t_ms, "input_length": length, "output_length": int(rng.integers(4, 32)), "hash_ids": ids}
        lines.append(json.dumps(line))
        t_ms += int(1000 * rng.exponential(1.0 / rate))
    return "\n".join(lines) + "\n"


def write_samples(out_dir: Path) -> list[Path]:
    """Write the three sample files into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "sharegpt.json": json.dumps(sharegpt(), indent=1) + "\n",
        "azure.csv": azure_csv(),
        "mooncake.jsonl": mooncake_jsonl(),
    }
    for name, text in files.items():
        (out_dir / name).write_text(text)
    return [out_dir / name for name in files]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("samples", help="write the sample ShareGPT, Azure and Mooncake files")
    p.add_argument("--output-dir", type=Path, default=Path("configs/loadtest/samples"))
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    print("wrote " + ", ".join(str(p) for p in write_samples(args.output_dir)))
    return 0
