"""Benchmark: per-request KV attribution on a shared-prefix conversation workload.

Two gateways with identical engine settings, one with the accounting KV connector
(``GATEWAY_KV_ATTRIBUTION=true``, the default) and one without, both up, driven in
alternation (A B B A per round) with the same workload: concurrent conversations that
share one long system prompt, each turn sending the whole history. Reported:

- output throughput on vs off (the accounting's cost), and the connector's own time in the
  engine's scheduler loop as a fraction of the run (``gateway_kv_attribution_cost_seconds_total``);
- on the attributed server, the engine's used blocks and the sum of the fair shares sampled
  over time (plotted), the two block-second counters and their ratio, mismatched steps, and
  how much the RSS-like referenced figure overstates the memory held.

``python -m loadtest attribution-bench --output-dir docs/results/kv-attribution-cpu``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from loadtest.local.servers import Server

SYSTEM = "You are a meticulous assistant who answers in full sentences and cites nothing. " * 36
ENGINE = {"max_model_len": 2048, "dtype": "float32", "block_size": 128, "max_num_seqs": 64,
          "kv_cache_gib": 1, "seed": 0, "enforce_eager": True, "enable_prefix_caching": True}
GAUGES = ("gateway_kv_cache_blocks_used", "gateway_kv_attributed_blocks", "gateway_kv_unattributed_blocks",
          "gateway_kv_referenced_blocks")
COUNTERS = ("gateway_kv_engine_block_seconds_total", "gateway_kv_attributed_block_seconds_total",
            "gateway_kv_unattributed_block_seconds_total", "gateway_kv_attribution_cost_seconds_total",
            "gateway_kv_fair_share_byte_seconds_total", "gateway_kv_referenced_byte_seconds_total")


def read_metrics(text: str) -> dict[str, float]:
    """Sum of each family's samples (one model here), and steps by result."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("gateway_kv_"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name == "gateway_kv_attribution_steps_total":
            name += ":" + name_labels.split('result="', 1)[1].split('"', 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
    return out


async def scrape(client: httpx.AsyncClient, base: str) -> dict[str, float]:
    return read_metrics((await client.get(base + "/metrics")).text)


async def conversation(client: httpx.AsyncClient, base: str, model: str, tag: str, turns: int, out_tokens: int) -> int:
    history = [{"role": "system", "content": SYSTEM}]
    produced = 0
    for t in range(turns):
        history.append({"role": "user", "content": f"{tag} turn {t}: tell me more."})
        r = await client.post(base + "/v1/chat/completions", json={
            "model": model, "messages": history, "max_tokens": out_tokens, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        body = r.json()
        produced += body["usage"]["completion_tokens"]
        history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return produced


async def run_once(base: str, model: str, sessions: int, turns: int, out_tokens: int,
                   sample_every: float | None) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600) as client:
        before = await scrape(client, base)
        samples: list[dict[str, float]] = []
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                m = await scrape(client, base)
                samples.append({"t": time.monotonic() - t0, **{g: m.get(g, 0.0) for g in GAUGES}})
                await asyncio.sleep(sample_every or 1.0)

        t0 = time.monotonic()
        task = asyncio.create_task(sampler()) if sample_every else None
        tokens = await asyncio.gather(*(conversation(client, base, model, uuid.uuid4().hex[:6], turns, out_tokens)
                                        for _ in range(sessions)))
        wall = time.monotonic() - t0
        stop.set()
        if task:
            await task
        await asyncio.sleep(1.0)  # the last step's figures
        after = await scrape(client, base)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}
    return {"wall_seconds": wall, "output_tokens": sum(tokens), "output_tok_per_s": sum(tokens) / wall,
            "delta": delta, "samples": samples}


def synthetic_cost(steps: int = 300, grow_every: int = 16) -> list[dict[str, float]]:
    """The ledger's time per step at GPU-like scale, without an engine: N requests of M
    blocks (half of them a shared prefix), each growing one block every ``grow_every``
    steps (decode with 16-token blocks), staggered."""
    from types import SimpleNamespace

    from service.kv.attribution import FairShareLedger

    out = []
    for nreq, nblk in ((64, 16), (256, 128), (512, 128)):
        shared = nblk // 2
        pool = [SimpleNamespace(block_id=i) for i in range(shared + nreq * (nblk + steps // grow_every + 2))]
        table, nxt = {}, shared
        for i in range(nreq):
            table[f"r{i}"] = pool[:shared] + pool[nxt: nxt + nblk - shared]
            nxt += nblk - shared
        led = FairShareLedger()
        led.step(0.0, table)
        spent = 0.0
        for s in range(1, steps):
            for i, v in enumerate(table.values()):
                if (s + i) % grow_every == 0:
                    v.append(pool[nxt])
                    nxt += 1
            t0 = time.perf_counter()
            led.step(s * 0.02, table)
            spent += time.perf_counter() - t0
        out.append({"requests": nreq, "blocks_each": nblk, "us_per_step": spent / (steps - 1) * 1e6})
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    on = [r for r in runs if r["attribution"]]
    off = [r for r in runs if not r["attribution"]]
    tps = lambda rs: sum(r["output_tokens"] for r in rs) / sum(r["wall_seconds"] for r in rs)  # noqa: E731
    d = lambda k: sum(r["delta"].get(k, 0.0) for r in on)  # noqa: E731
    engine, attributed = d("gateway_kv_engine_block_seconds_total"), d("gateway_kv_attributed_block_seconds_total")
    unattributed = d("gateway_kv_unattributed_block_seconds_total")
    fair, ref = d("gateway_kv_fair_share_byte_seconds_total"), d("gateway_kv_referenced_byte_seconds_total")
    return {
        "throughput_on_tok_per_s": tps(on), "throughput_off_tok_per_s": tps(off),
        "throughput_ratio_on_over_off": tps(on) / tps(off),
        "connector_seconds_fraction_of_run": d("gateway_kv_attribution_cost_seconds_total") / sum(r["wall_seconds"] for r in on),
        "engine_block_seconds": engine, "attributed_block_seconds": attributed,
        "unattributed_block_seconds": unattributed,
        "accounted_over_engine": (attributed + unattributed) / engine if engine else None,
        "steps_exact": d("gateway_kv_attribution_steps_total:exact"),
        "steps_remainder": d("gateway_kv_attribution_steps_total:remainder"),
        "steps_mismatch": d("gateway_kv_attribution_steps_total:mismatch"),
        "referenced_over_fair_share": ref / fair if fair else None,
    }


def write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "attribution.json").write_text(json.dumps(result, indent=2) + "\n")
    s, c = result["summary"], result["config"]
    lines = [
        "# Per-request KV attribution on shared-prefix conversations", "",
        f"Command: `{c['command']}`", "",
        f"Workload per run: {c['sessions']} concurrent conversations x {c['turns']} turns, one shared system "
        f"prompt (~{c['system_words']} words), {c['out_tokens']} output tokens per turn (ignore_eos), each turn "
        "sending the whole history. Engine settings, identical for both servers: "
        + ", ".join(f"{k}={v}" for k, v in ENGINE.items())
        + f". Order per round: on, off, off, on; {c['rounds']} rounds. Load average at start: {c['loadavg']}.", "",
        "| figure | value |", "|---|---:|",
        f"| output tok/s, attribution on | {s['throughput_on_tok_per_s']:.2f} |",
        f"| output tok/s, attribution off | {s['throughput_off_tok_per_s']:.2f} |",
        f"| on / off | {s['throughput_ratio_on_over_off']:.3f} |",
        f"| connector time / run time | {s['connector_seconds_fraction_of_run']:.5f} |",
        f"| engine block-seconds (kv_cache_usage) | {s['engine_block_seconds']:.2f} |",
        f"| attributed block-seconds (sum of fair shares) | {s['attributed_block_seconds']:.2f} |",
        f"| unattributed block-seconds | {s['unattributed_block_seconds']:.2f} |",
        f"| (attributed + unattributed) / engine | {s['accounted_over_engine']:.4f} |",
        f"| steps exact / remainder / mismatch | {s['steps_exact']:.0f} / {s['steps_remainder']:.0f} / {s['steps_mismatch']:.0f} |",
        f"| referenced (RSS-like) / fair share byte-seconds | {s['referenced_over_fair_share']:.3f} |",
        "", "The ledger alone at GPU-like scale (synthetic block tables, no engine; half of each "
        "request's blocks a shared prefix, one block grown every 16 steps):", "",
        "| requests | blocks each | microseconds per step |", "|---:|---:|---:|",
        *[f"| {r['requests']} | {r['blocks_each']} | {r['us_per_step']:.0f} |" for r in result["synthetic"]],
        "", "![engine used blocks vs sum of fair shares](attribution.png)", "",
    ]
    (out / "attribution.md").write_text("\n".join(lines))
    plot(out / "attribution.png", result)


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = next(r["samples"] for r in result["runs"] if r["attribution"])
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(t, [s["gateway_kv_cache_blocks_used"] for s in samples], where="post", label="engine used blocks (kv_cache_usage)", lw=2.5)
    ax.step(t, [s["gateway_kv_attributed_blocks"] + s["gateway_kv_unattributed_blocks"] for s in samples], where="post",
            label="sum of fair shares + unattributed", ls="--", lw=1.5)
    ax.step(t, [s["gateway_kv_referenced_blocks"] for s in samples], where="post",
            label="sum of referenced blocks (RSS-like)", ls=":", lw=1.5)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("KV blocks")
    ax.set_title("Engine used blocks vs per-request fair shares and references (first attributed run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model_dir, name = args.model, "SmolLM2-135M-Instruct"
    logs = Path(args.output_dir)
    logs.mkdir(parents=True, exist_ok=True)
    servers = {flag: Server("gateway", model_dir, name, env={"GATEWAY_KV_ATTRIBUTION": str(flag).lower(),
                                                             "GATEWAY_WARMUP": "true"},
                            engine=dict(ENGINE), log_path=Path(args.log_dir) / f"attribution-{flag}.log")
               for flag in (False, True)}  # started in this order (the unattributed first)
    runs = []
    try:
        for s in servers.values():
            s.start()
        for rnd in range(args.rounds):
            for flag in (True, False, False, True):
                r = await run_once(servers[flag].base_url, name, args.sessions, args.turns, args.out_tokens,
                                   args.sample_every if flag and rnd == 0 else None)
                r.update(attribution=flag, round=rnd)
                runs.append(r)
                print(f"round {rnd} attribution={flag}: {r['output_tok_per_s']:.2f} tok/s in {r['wall_seconds']:.1f} s")
    finally:
        for s in servers.values():
            s.stop()
    config = {"command": "python -m loadtest " + " ".join(args.argv), "sessions": args.sessions,
              "turns": args.turns, "out_tokens": args.out_tokens, "rounds": args.rounds,
              "system_words": len(SYSTEM.split()), "engine": ENGINE, "started_first": "attribution off", "loadavg": os.getloadavg()[0]}
    return {"version": 1, "config": config, "summary": summarise(runs), "synthetic": synthetic_cost(), "runs": runs}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribution-bench", help=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--output-dir", default="docs/results/kv-attribution-cpu")
    p.add_argument("--log-dir", default=tempfile.gettempdir(), help="server logs")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--out-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sample-every", type=float, default=0.25)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: list[str]) -> int:
    args.argv = list(argv)
    result = asyncio.run(bench(args))
    write(Path(args.output_dir), result)
    print(json.dumps(result["summary"], indent=2))
    return 0
