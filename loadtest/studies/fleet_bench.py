"""Fleet benchmarks (not tests): each starts its own local fleet on 127.0.0.1, runs once and
writes JSON + Markdown + PNG under --out (default docs/results/fleet-cpu/).

    python -m loadtest fleet-bench prefix     # cache_aware vs round_robin, alternated, one run
    python -m loadtest fleet-bench failover   # kill a replica mid-load, bring it back

prefix: two routers (cache_aware, round_robin) in front of the same two replicas. Rounds
alternate between them; every round uses fresh shared prefixes (so no round profits from
another's cache) and measures the replicas' prefix-cache hit ratio from vLLM's counters
(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, deltas over the round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.studies.fleet import MODEL, REPO, Fleet, free_port, router, text_of
from loadtest.studies.fleet_failover import bench_failover
from loadtest.output.text import num
from loadtest.server.scrape import parse_exposition


def counters(url: str) -> dict[str, float]:
    samples = parse_exposition(httpx.get(url + "/metrics", timeout=10).text)
    names = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "gateway_requests_total")
    return {name: sum(value for _, value in samples[name]) for name in names if name in samples}


async def send_all(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(p: str) -> dict:
            async with sem:
                t0 = time.time()
                try:
                    r = await client.post(base + "/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": max_tokens})
                    return {"start": t0, "end": time.time(), "status": r.status_code,
                            "error": None if r.status_code == 200 else r.text[:300]}
                except httpx.HTTPError as e:
                    return {"start": t0, "end": time.time(), "status": None, "error": f"{type(e).__name__}: {e}"[:300]}
        return await asyncio.gather(*(one(p) for p in prompts))


def _plot(path: Path, labels: list[str], values: list[float], colors: list[str], ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, values, color=colors)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_prefix(out: Path, rounds: int, prefixes: int, per_prefix: int, prefix_words: int, concurrency: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kv-fleet-prefix-"))
    load_start = round(os.getloadavg()[0], 2)
    rng = random.Random(0)
    with Fleet(work, replicas=2, policy="cache_aware", prometheus_port=None) as fleet:
        rr = router(fleet.urls, "round_robin", free_port(), free_port(), work, name="router-rr").start()
        try:
            rr.wait_ready(60)
            routers = {"cache_aware": fleet.router.url, "round_robin": rr.url}
            rows = []
            for i in range(rounds):
                policy = ("cache_aware", "round_robin")[i % 2]
                heads = [text_of(rng, prefix_words) for _ in range(prefixes)]
                prompts = [f"{h} Question {rng.randint(0, 10**6)}: {text_of(rng, 12)}?" for h in heads for _ in range(per_prefix)]
                rng.shuffle(prompts)
                before = [counters(u) for u in fleet.urls]
                res = asyncio.run(send_all(routers[policy], prompts, concurrency, 4))
                time.sleep(1.5)  # the last step's stats reach /metrics
                after = [counters(u) for u in fleet.urls]
                d = [{k: a[k] - b.get(k, 0) for k in a} for a, b in zip(after, before)]
                hits = sum(x["vllm:prefix_cache_hits_total"] for x in d)
                queries = sum(x["vllm:prefix_cache_queries_total"] for x in d)
                rows.append({"round": i + 1, "policy": policy, "requests": len(prompts),
                             "ok": sum(r["status"] == 200 for r in res), "hit_tokens": hits, "query_tokens": queries,
                             "hit_ratio": hits / queries if queries else None,
                             "per_replica_requests": [x["gateway_requests_total"] for x in d]})
                print(json.dumps(rows[-1]), flush=True)
            rmetrics = {name: httpx.get(f"http://127.0.0.1:{p.cmd[p.cmd.index('--prometheus-port') + 1]}/metrics").text
                        for name, p in (("cache_aware", fleet.router), ("round_robin", rr))}
        finally:
            rr.stop(10)
    outcomes = {k: {labels.get("outcome"): value for labels, value in
                    parse_exposition(v).get("vllm_router_prefix_routing_decisions_total", [])}
                for k, v in rmetrics.items()}  # fmt: skip
    ratios = {p: [r["hit_ratio"] for r in rows if r["policy"] == p and r["hit_ratio"] is not None]
              for p in ("cache_aware", "round_robin")}
    mean = {p: sum(v) / len(v) if v else None for p, v in ratios.items()}
    result = {"benchmark": "fleet-prefix", "replicas": 2, "rounds": rows, "mean_hit_ratio": mean,
              "ratio_cache_aware_over_round_robin": mean["cache_aware"] / mean["round_robin"] if mean["cache_aware"] is not None and mean["round_robin"] else None,
              "router_prefix_outcomes": outcomes,
              "workload": {"prefixes_per_round": prefixes, "requests_per_prefix": per_prefix,
                           "prefix_words": prefix_words, "concurrency": concurrency, "max_tokens": 4},
              "settings": {"model": MODEL, "kv_cache_gib": 1.0,
                           "enforce_eager": os.environ.get("GATEWAY_ENFORCE_EAGER", "profile default")},
              "load_average_1m": {"start": load_start, "end": round(os.getloadavg()[0], 2)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix.json").write_text(json.dumps(result, indent=2))
    md = ["# Fleet prefix-cache hit ratio: cache_aware vs round_robin (vllm-router 0.1.17)", "",
          f"Two gateway replicas, two routers over the same replicas, {rounds} rounds alternated; each round "
          f"{prefixes} fresh prefixes x {per_prefix} requests (prefix ~{prefix_words} words), concurrency {concurrency}. "
          "Hit ratio = delta vllm:prefix_cache_hits_total / delta vllm:prefix_cache_queries_total over both replicas. "
          f"One run; load average (1 min) at start/end: {result['load_average_1m']['start']} / "
          f"{result['load_average_1m']['end']}.", "",
          "| round | policy | ok/requests | hit ratio | requests per replica |", "|---|---|---|---|---|"]
    md += [f"| {r['round']} | {r['policy']} | {r['ok']}/{r['requests']} | {num(r['hit_ratio'], 3)} | "
           f"{' / '.join(str(int(v)) for v in r['per_replica_requests'])} |" for r in rows]
    md += ["", f"Mean hit ratio: cache_aware {num(mean['cache_aware'], 3)}, round_robin {num(mean['round_robin'], 3)}.", "",
           f"Router prefix-routing outcomes: {json.dumps(outcomes)}"]
    (out / "prefix.md").write_text("\n".join(md) + "\n")
    _plot(out / "prefix.png", [f"{r['round']}:{r['policy'][:5]}" for r in rows], [r["hit_ratio"] or 0.0 for r in rows],
          ["tab:blue" if r["policy"] == "cache_aware" else "tab:orange" for r in rows], "prefix-cache hit ratio",
          "fleet of 2: cache_aware (blue) vs round_robin (orange), alternated")
    return result


def add_parser(top: argparse._SubParsersAction) -> None:
    ap = top.add_parser("fleet-bench", help="fleet benchmarks: prefix-cache routing, failover (docs/fleet.md)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "fleet-cpu")
    sub = ap.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("prefix", help="prefix-cache hit ratio: cache_aware vs round_robin")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--prefixes", type=int, default=6)
    p.add_argument("--per-prefix", type=int, default=4)
    p.add_argument("--prefix-words", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=4)
    f = sub.add_parser("failover", help="kill one replica mid-load and bring it back")
    f.add_argument("--concurrency", type=int, default=4)
    f.add_argument("--before", type=float, default=15)
    f.add_argument("--down", type=float, default=15)
    f.add_argument("--after", type=float, default=15)
    ap.set_defaults(handler=main)


def main(a: argparse.Namespace, argv: list[str] | None = None) -> int:
    if a.bench == "prefix":
        r = bench_prefix(a.out, a.rounds, a.prefixes, a.per_prefix, a.prefix_words, a.concurrency)
    else:
        r = bench_failover(a.out, a.concurrency, a.before, a.down, a.after)
    print(json.dumps({k: v for k, v in r.items() if k != "rounds"}, indent=2))
    return 0

