"""Soak test with faults: mixed load plus disconnects, malformed requests and over-limit
bursts against a gateway, then check nothing leaked.

    python -m loadtest soak --duration 600 --output-dir docs/results/soak-cpu

Starts its own gateway (with a small admission limit, so bursts get shed) unless
``--base-url`` is given. Bounded by ``--duration``; traffic goes only to that gateway.
Pass criteria: zero 5xx (or transport failures) for valid admitted requests, running
requests and KV blocks in use back to zero at the end, resident memory within 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.local.servers import Server
from loadtest.server.scrape import parse_exposition

PROMPTS = ["Tell me about the sea.", "Write a haiku about GPUs.", "What is 17 times 23?",
           "List three prime numbers.", "Explain attention in one sentence.", "Name a city in Spain."]
MALFORMED: list[tuple[str, bytes]] = [
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b'{"messages": "hi"}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -5}'),
    ("/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 1}'),
    ("/v1/completions", b'{"prompt": "hello ", "max_tokens": 1000000}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 1000}'),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
]


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    status: Counter = field(default_factory=Counter)
    valid_ok: int = 0
    valid_shed: int = 0
    valid_failed: int = 0  # 5xx or transport error for a valid request: must stay 0
    disconnects: int = 0
    malformed_4xx: int = 0
    malformed_other: int = 0
    failures: list[str] = field(default_factory=list)


def _valid_body(rng: random.Random, model: str) -> tuple[str, dict[str, Any]]:
    max_tokens = rng.randint(8, 48)
    stream = rng.random() < 0.6
    if rng.random() < 0.5:
        body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}]}
        path = "/v1/chat/completions"
    else:
        body = {"model": model, "prompt": rng.choice(PROMPTS)}
        path = "/v1/completions"
    body.update(max_tokens=max_tokens, stream=stream, temperature=0.7, ignore_eos=rng.random() < 0.5)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return path, body


async def valid_request(session: aiohttp.ClientSession, base: str, model: str, rng: random.Random, t: Tally) -> None:
    path, body = _valid_body(rng, model)
    t.sent["valid"] += 1
    try:
        async with session.post(base + path, json=body) as r:
            t.status[r.status] += 1
            text = await r.text()
            if r.status == 200:
                if body["stream"] and not text.rstrip().endswith("data: [DONE]"):
                    t.valid_failed += 1
                    t.failures.append("stream without [DONE]")
                elif '"error"' in text and body["stream"]:
                    t.valid_failed += 1
                    t.failures.append(text[-200:])
                else:
                    t.valid_ok += 1
            elif r.status in (429, 503):
                t.valid_shed += 1
            else:
                t.valid_failed += 1
                t.failures.append(f"{r.status}: {text[:200]}")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        t.valid_failed += 1
        t.failures.append(repr(e)[:200])


async def disconnect(session: aiohttp.ClientSession, base: str, model: str, rng: random.Random, t: Tally) -> None:
    t.sent["disconnect"] += 1
    body = {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 400, "ignore_eos": True,
            "stream": rng.random() < 0.8}
    try:
        async with session.post(base + "/v1/completions", json=body) as r:
            t.status[r.status] += 1
            if r.status != 200:
                return
            if body["stream"]:
                chunks = rng.randint(1, 4)
                async for _ in r.content:
                    chunks -= 1
                    if chunks <= 0:
                        break
            else:
                await asyncio.sleep(rng.uniform(0.2, 1.5))
            r.close()  # drop the connection mid-answer
            t.disconnects += 1
    except (aiohttp.ClientError, asyncio.TimeoutError):
        t.disconnects += 1


async def malformed(session: aiohttp.ClientSession, base: str, rng: random.Random, t: Tally) -> None:
    path, raw = rng.choice(MALFORMED)
    t.sent["malformed"] += 1
    try:
        async with session.post(base + path, data=raw, headers={"content-type": "application/json"}) as r:
            t.status[r.status] += 1
            body = await r.json(content_type=None)
            ok_shape = isinstance(body, dict) and set(body.get("error", {})) == {"message", "type", "param", "code"}
            if 400 <= r.status < 500 and ok_shape:
                t.malformed_4xx += 1
            else:
                t.malformed_other += 1
                t.failures.append(f"malformed {path} -> {r.status}")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        t.malformed_other += 1
        t.failures.append(repr(e)[:200])


async def scrape(session: aiohttp.ClientSession, base: str) -> list[tuple[str, dict[str, str], float]]:
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    return [(name, labels, value) for name, rows in parse_exposition(text).items() for labels, value in rows]


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


async def soak(base: str, model: str, duration: float, seed: int, workers: int, pids: list[int]) -> dict[str, Any]:
    import psutil

    rng = random.Random(seed)
    t = Tally()
    timeout = aiohttp.ClientTimeout(total=300)
    procs = [psutil.Process(p) for p in pids]

    def rss() -> int:
        total = 0
        for p in procs:
            for q in [p, *p.children(recursive=True)]:
                try:
                    total += q.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        return total

    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=256)) as session:
        # warm up so start-up allocations do not count as growth
        await asyncio.gather(*(valid_request(session, base, model, rng, Tally()) for _ in range(8)))
        rss_start = rss()
        memory = [(0.0, rss_start)]
        t0 = time.monotonic()
        stop = t0 + duration

        async def loop(kind: str, idx: int) -> None:
            r = random.Random(seed * 1000 + idx)
            while time.monotonic() < stop:
                if kind == "valid":
                    await valid_request(session, base, model, r, t)
                elif kind == "disconnect":
                    await disconnect(session, base, model, r, t)
                    await asyncio.sleep(r.uniform(0.5, 2.0))
                else:
                    await malformed(session, base, r, t)
                    await asyncio.sleep(r.uniform(0.2, 1.0))

        async def bursts() -> None:
            r = random.Random(seed + 7)
            while time.monotonic() + 30 < stop:
                await asyncio.sleep(30)
                t.sent["burst"] += 1
                await asyncio.gather(*(valid_request(session, base, model, r, t) for _ in range(40)))

        async def sample_memory() -> None:
            while time.monotonic() < stop:
                await asyncio.sleep(10)
                memory.append((time.monotonic() - t0, rss()))

        tasks = [loop("valid", i) for i in range(workers)]
        tasks += [loop("disconnect", 100 + i) for i in range(3)] + [loop("malformed", 200 + i) for i in range(2)]
        await asyncio.gather(*tasks, bursts(), sample_memory())
        elapsed = time.monotonic() - t0
        # idle: everything admitted is answered; the engine must hold nothing
        deadline = time.monotonic() + 60
        while True:
            m = await scrape(session, base)
            if (metric_sum(m, "gateway_requests_running") == 0 and metric_sum(m, "gateway_requests_waiting") == 0) \
                    or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        m = await scrape(session, base)
        rss_end = rss()
    return {
        "duration_s": elapsed, "sent": dict(t.sent), "status": {str(k): v for k, v in sorted(t.status.items())},
        "valid_ok": t.valid_ok, "valid_shed": t.valid_shed, "valid_failed": t.valid_failed,
        "disconnects": t.disconnects, "malformed_4xx": t.malformed_4xx, "malformed_other": t.malformed_other,
        "end_running": metric_sum(m, "gateway_requests_running"), "end_waiting": metric_sum(m, "gateway_requests_waiting"),
        "end_kv_blocks_used": metric_sum(m, "gateway_kv_cache_blocks_used"),
        "aborted_total": metric_sum(m, "gateway_requests_total", finish_reason="abort"),
        "rss_start_bytes": rss_start, "rss_end_bytes": rss_end, "rss_growth": rss_end / rss_start - 1 if rss_start else None,
        "memory": memory, "failures": t.failures[:50],
    }


def verdict(r: dict[str, Any]) -> list[str]:
    problems = []
    if r["valid_failed"]:
        problems.append(f"{r['valid_failed']} valid admitted requests failed")
    if r["malformed_other"]:
        problems.append(f"{r['malformed_other']} malformed requests did not get an OpenAI-shaped 4xx")
    if r["end_running"] or r["end_kv_blocks_used"]:
        problems.append(f"not idle at the end: running {r['end_running']}, KV blocks {r['end_kv_blocks_used']}")
    if r["rss_growth"] is not None and abs(r["rss_growth"]) > 0.10:
        problems.append(f"resident memory changed by {r['rss_growth']:.1%}")
    return problems


def render(r: dict[str, Any], command: str) -> str:
    mib = 2**20
    problems = verdict(r)
    rows = [("duration", f"{r['duration_s']:.0f} s"), ("requests sent", f"{sum(r['sent'].values()) - r['sent'].get('burst', 0)}"
             f" ({', '.join(f'{k} {v}' for k, v in r['sent'].items())})"),
            ("valid: answered", r["valid_ok"]), ("valid: shed (429/503)", r["valid_shed"]),
            ("valid: failed (5xx / transport)", r["valid_failed"]), ("client disconnects", r["disconnects"]),
            ("engine requests aborted (gateway_requests_total{finish_reason=abort})", int(r["aborted_total"])),
            ("malformed: OpenAI-shaped 4xx", r["malformed_4xx"]), ("malformed: other", r["malformed_other"]),
            ("HTTP status counts", ", ".join(f"{k}: {v}" for k, v in r["status"].items())),
            ("running / waiting at the end", f"{r['end_running']:.0f} / {r['end_waiting']:.0f}"),
            ("KV blocks in use at the end", f"{r['end_kv_blocks_used']:.0f}"),
            ("resident memory (gateway + engine) start / end",
             f"{r['rss_start_bytes'] / mib:.0f} MiB / {r['rss_end_bytes'] / mib:.0f} MiB ({r['rss_growth']:+.1%})")]
    lines = ["# Soak test with faults", "", "```", command, "```", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "**PASS**" if not problems else "**FAIL**: " + "; ".join(problems), ""]
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="mixed load with faults, then check nothing leaked")
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--base-url", help="an already running gateway (default: start one)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--model-dir", default="models/SmolLM2-135M-Instruct")
    p.add_argument("--workers", type=int, default=12, help="closed-loop valid-request workers")
    p.add_argument("--max-in-flight", type=int, default=24, help="admission limit of the started gateway")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="soak-results")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: list[str]) -> int:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if args.base_url:
        base, pids = args.base_url.rstrip("/"), []
    else:
        server = Server("gateway", args.model_dir, args.model, log_path=out / "gateway.log",
                        env={"GATEWAY_MAX_IN_FLIGHT": str(args.max_in_flight)})
        server.engine["enforce_eager"] = True
        server.start()
        base, pids = server.base_url, [server.process.pid]
    try:
        result = asyncio.run(soak(base, args.model, args.duration, args.seed, args.workers, pids))
    finally:
        if server is not None:
            server.stop()
    if server is not None:
        result["gateway_exit_code"] = server.process.returncode
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    text = render(result, "python -m loadtest soak " + " ".join(argv[1:]))
    (out / "soak.md").write_text(text)
    print(text)
    return 0 if not verdict(result) else 1
