"""The matmuls of one decode step alone, timed: evidence for the latency sweep's residuals.

``python -m loadtest gemm-probe --model DIR [DIR ...] --batch 1 4 16 --dtype bfloat16 float32``
times ``torch.nn.functional.linear`` over every linear layer of a Llama-shaped model (q, k, v,
o, gate, up, down per layer, then the LM head) with b input rows, on one thread (the engine
runs one on 2 cores), random weights of the model's shapes, best of ``--repeat``. It reports
the time, the matmul rate (2 x b x parameters / time) and the weight bytes streamed per
second. If the step's matmuls alone take most of a measured TPOT and their rate sits far
below the hwprobe matmul peak, the decode step is bound by matmul kernel time, not by memory.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def linear_shapes(config: dict[str, Any]) -> tuple[list[tuple[int, int]], tuple[int, int], int]:
    """(in, out) of one layer's linears, the LM head's, and the layer count, from config.json."""
    c = dict(config.get("text_config") or config)
    h, inter, q = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or q)
    d = int(c.get("head_dim") or h // q)
    layer = [(h, q * d), (h, kv * d), (h, kv * d), (q * d, h), (h, inter), (h, inter), (inter, h)]
    return layer, (h, int(c["vocab_size"])), int(c["num_hidden_layers"])


def time_step(config: dict[str, Any], batch: int, dtype_name: str, repeat: int = 5) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    layer, head, layers = linear_shapes(config)
    weights = [torch.randn(o, i, dtype=dtype) for i, o in layer] + [torch.randn(head[1], head[0], dtype=dtype)]
    inputs = {i: torch.randn(batch, i, dtype=dtype) for i, _ in [*layer, head]}

    def step() -> None:
        for _ in range(layers):
            for w in weights[:-1]:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
        torch.nn.functional.linear(inputs[head[0]], weights[-1])

    step()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    params = layers * sum(w.numel() for w in weights[:-1]) + weights[-1].numel()
    return {"batch": batch, "dtype": dtype_name, "seconds": best, "matmul_parameters": params,
            "flop_per_s": 2 * batch * params / best, "weight_bytes_per_s": params * weights[0].element_size() / best}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gemm-probe", help=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", nargs="+", type=Path, required=True, help="model folders (config.json)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--output", type=Path, help="JSON file")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    rows = []
    for dtype in args.dtype:
        for folder in args.model:
            config = json.loads((folder / "config.json").read_text())
            for b in args.batch:
                row = {"model": folder.name, **time_step(config, b, dtype, args.repeat)}
                rows.append(row)
                print(f"{dtype:9s} {folder.name:32s} b={b:3d}: {1000 * row['seconds']:8.1f} ms "
                      f"{row['flop_per_s'] / 1e9:6.1f} GFLOP/s  weights {row['weight_bytes_per_s'] / 1e9:6.2f} GB/s",
                      flush=True)  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps({"kind": "decode-gemm-probe", "rows": rows}, indent=1) + "\n")
    return 0

