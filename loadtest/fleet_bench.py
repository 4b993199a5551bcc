"""Fleet benchmarks (not tests): each starts its own local fleet on 127.0.0.1, runs once and
writes JSON + Markdown + PNG under --out (default docs/results/fleet-cpu/).

    python -m loadtest.fleet_bench prefix     # cache_aware vs round_robin, alternated, one run
    python -m loadtest.fleet_bench failover   # kill a replica mid-load, bring it back

prefix: two routers (cache_aware, round_robin) in front of the same two replicas. Rounds
alternate between them; every round uses fresh shared prefixes (so no round profits from
another's cache) and measures the replicas' prefix-cache hit ratio from vLLM's counters
(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, deltas over the round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.fleet import REPO, Fleet, free_port, router

MODEL = "SmolLM2-135M-Instruct"
WORDS = ("apple river stone cloud paper garden window silver forest engine copper lantern harbor meadow "
         "violet thunder marble canyon pepper saddle falcon glacier orchard velvet compass ember willow").split()


def counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            if s.name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "gateway_requests_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def text_of(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


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
    outcomes = {k: {s.labels.get("outcome"): s.value for f in text_string_to_metric_families(v) for s in f.samples
                    if s.name == "vllm_router_prefix_routing_decisions_total"} for k, v in rmetrics.items()}
    mean = {p: sum(r["hit_ratio"] for r in rows if r["policy"] == p) / max(1, sum(r["policy"] == p for r in rows))
            for p in ("cache_aware", "round_robin")}
    result = {"benchmark": "fleet-prefix", "replicas": 2, "rounds": rows, "mean_hit_ratio": mean,
              "ratio_cache_aware_over_round_robin": mean["cache_aware"] / mean["round_robin"] if mean["round_robin"] else None,
              "router_prefix_outcomes": outcomes,
              "workload": {"prefixes_per_round": prefixes, "requests_per_prefix": per_prefix,
                           "prefix_words": prefix_words, "concurrency": concurrency, "max_tokens": 4},
              "note": "one run on a shared 2-core machine (other engineers' jobs running); CPU, SmolLM2-135M, KV 1 GiB each"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix.json").write_text(json.dumps(result, indent=2))
    md = ["# Fleet prefix-cache hit ratio: cache_aware vs round_robin (vllm-router 0.1.17)", "",
          f"Two gateway replicas, two routers over the same replicas, {rounds} rounds alternated; each round "
          f"{prefixes} fresh prefixes x {per_prefix} requests (prefix ~{prefix_words} words), concurrency {concurrency}. "
          "Hit ratio = delta vllm:prefix_cache_hits_total / delta vllm:prefix_cache_queries_total over both replicas. "
          "One run on a shared 2-core machine.", "",
          "| round | policy | ok/requests | hit ratio | requests per replica |", "|---|---|---|---|---|"]
    md += [f"| {r['round']} | {r['policy']} | {r['ok']}/{r['requests']} | {r['hit_ratio']:.3f} | "
           f"{' / '.join(str(int(v)) for v in r['per_replica_requests'])} |" for r in rows]
    md += ["", f"Mean hit ratio: cache_aware {mean['cache_aware']:.3f}, round_robin {mean['round_robin']:.3f}.", "",
           f"Router prefix-routing outcomes: {json.dumps(outcomes)}"]
    (out / "prefix.md").write_text("\n".join(md) + "\n")
    _plot(out / "prefix.png", [f"{r['round']}:{r['policy'][:5]}" for r in rows], [r["hit_ratio"] for r in rows],
          ["tab:blue" if r["policy"] == "cache_aware" else "tab:orange" for r in rows], "prefix-cache hit ratio",
          "fleet of 2: cache_aware (blue) vs round_robin (orange), alternated")
    return result


def bench_failover(out: Path, concurrency: int, before_s: float, down_s: float, after_s: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kv-fleet-failover-"))
    events: dict[str, float] = {}
    with Fleet(work, replicas=2, policy="round_robin", prometheus_port=None) as fleet:
        victim = fleet.gateways[1]
        results: list[dict] = []
        stop = {"flag": False}

        async def load() -> None:
            rng = random.Random(1)
            async with httpx.AsyncClient(timeout=120) as client:
                async def worker() -> None:
                    while not stop["flag"]:
                        t0 = time.time()
                        try:
                            r = await client.post(fleet.router.url + "/v1/completions", json={
                                "model": MODEL, "prompt": text_of(rng, 20), "max_tokens": 24, "ignore_eos": True})
                            results.append({"start": t0, "end": time.time(), "status": r.status_code,
                                            "error": None if r.status_code == 200 else r.text[:300]})
                        except httpx.HTTPError as e:
                            results.append({"start": t0, "end": time.time(), "status": None,
                                            "error": f"{type(e).__name__}: {e}"[:300]})
                await asyncio.gather(*(worker() for _ in range(concurrency)))

        async def script() -> None:
            task = asyncio.create_task(load())
            await asyncio.sleep(before_s)
            events["kill"] = time.time()
            victim.kill()  # SIGKILL to its whole process group: a crash, no drain
            await asyncio.sleep(down_s)
            events["restart"] = time.time()
            victim.start()
            await asyncio.to_thread(victim.wait_ready, 600)
            events["ready_again"] = time.time()
            base = counters(victim.url).get("gateway_requests_total", 0.0)
            await asyncio.sleep(after_s)
            events["victim_requests_after_return"] = counters(victim.url).get("gateway_requests_total", 0.0) - base
            stop["flag"] = True
            await task
        asyncio.run(script())
    k = events["kill"]
    failed = [r for r in results if r["status"] != 200]
    in_flight = [r for r in failed if r["start"] < k <= r["end"]]
    later = [r for r in failed if r["start"] >= k]
    errors: dict[str, int] = {}
    for r in failed:
        key = f"{r['status']}: {(r['error'] or '')[:120]}"
        errors[key] = errors.get(key, 0) + 1
    result = {"benchmark": "fleet-failover", "policy": "round_robin", "concurrency": concurrency,
              "requests": len(results), "ok": len(results) - len(failed), "failed": len(failed),
              "failed_in_flight_at_kill": len(in_flight), "failed_started_after_kill": len(later),
              "in_flight_failure_seconds_after_kill": sorted(round(r["end"] - k, 2) for r in in_flight),
              "victim_requests_after_it_returned": events["victim_requests_after_return"],
              "seconds_down": round(events["restart"] - k, 1), "seconds_to_ready_again": round(events["ready_again"] - events["restart"], 1),
              "errors": errors, "note": "one run on a shared 2-core machine; CPU, SmolLM2-135M, KV 1 GiB each"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "failover.json").write_text(json.dumps(result, indent=2))
    md = ["# Fleet failover: one replica killed mid-load (vllm-router 0.1.17, round_robin)", "",
          f"{concurrency} concurrent clients through the router; replica 1 SIGKILLed (whole process group) after "
          f"{before_s:g} s, restarted {down_s:g} s later, load kept {after_s:g} s after it was ready again. "
          "One run on a shared 2-core machine.", "",
          "| figure | value |", "|---|---|"]
    md += [f"| {k2} | {v} |" for k2, v in result.items() if k2 not in ("errors", "note", "benchmark")]
    md += ["", "Errors seen by clients:", ""] + [f"- {n} x `{e}`" for e, n in errors.items()]
    (out / "failover.md").write_text("\n".join(md) + "\n")
    t0 = min(r["start"] for r in results)
    _plot(out / "failover.png", ["ok", "failed in flight", "failed after kill"],
          [result["ok"], len(in_flight), len(later)], ["tab:green", "tab:red", "tab:orange"], "requests",
          f"kill at {k - t0:.0f} s, ready again at {events['ready_again'] - t0:.0f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.fleet_bench")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "fleet-cpu")
    sub = ap.add_subparsers(dest="command", required=True)
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
    a = ap.parse_args(argv)
    if a.command == "prefix":
        r = bench_prefix(a.out, a.rounds, a.prefixes, a.per_prefix, a.prefix_words, a.concurrency)
    else:
        r = bench_failover(a.out, a.concurrency, a.before, a.down, a.after)
    print(json.dumps({k: v for k, v in r.items() if k != "rounds"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
