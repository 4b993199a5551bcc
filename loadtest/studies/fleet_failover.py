"""Fleet failover benchmark (not a test): kill one replica mid-load, bring it back.

    python -m loadtest fleet-bench failover

A local fleet (2 replicas behind vllm-router, round_robin) takes a steady load from
`concurrency` clients; half of them stream (64 tokens), half do not (24 tokens). One
replica is SIGKILLed (its whole process group: a crash, no drain), restarted after
`down` seconds, and the load goes on `after` seconds once it is ready again.

What it measures, from both sides:
- clients: every request's outcome; the ones in flight at the kill (started before it,
  ended after it) and how many seconds after the kill each of those failed, with the
  error the client saw; failures of requests started after the kill;
- the router (its /metrics, sampled every 0.5 s): when it stopped routing to the dead
  replica, when its health check marked it down and up again, when it routed to it
  again, and its own error/retry counters over the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.server.scrape import parse_exposition
from loadtest.studies.fleet import MODEL, Fleet, text_of

STREAM_TOKENS, PLAIN_TOKENS = 64, 24


def _new_record(stream: bool) -> dict:
    return {"start": time.time(), "end": None, "stream": stream, "status": None, "error": None,
            "first_token": None, "chunks": 0, "done": False}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, stream: bool) -> dict:
    """One request; streams are read to the end, and a stream that stops without
    `data: [DONE]` or carries an error event counts as failed."""
    rec = _new_record(stream)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": STREAM_TOKENS if stream else PLAIN_TOKENS,
            "ignore_eos": True, "stream": stream}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
            elif not stream:
                await r.aread()
            else:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        rec["done"] = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            rec["error"] = f"error event: {json.dumps(event['error'])[:200]}"
                        else:
                            rec["chunks"] += 1
                            rec["first_token"] = rec["first_token"] or time.time()
                if not rec["done"] and rec["error"] is None:
                    rec["error"] = f"stream ended without [DONE] after {rec['chunks']} chunks"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
    rec["end"] = time.time()
    rec["ok"] = rec["status"] == 200 and rec["error"] is None
    return rec


def router_sample(metrics_url: str) -> dict:
    """Per-worker decisions and health, and every error/retry counter, from the router's /metrics."""
    samples = parse_exposition(httpx.get(metrics_url, timeout=5).text)
    out: dict = {"t": time.time(), "decisions": {}, "health": {}, "counters": {}}
    for name, rows in samples.items():
        for labels, value in rows:
            if name == "vllm_router_policy_decisions_total":
                w = labels.get("worker", "")
                out["decisions"][w] = out["decisions"].get(w, 0.0) + value
            elif name == "vllm_router_worker_health":
                out["health"][labels.get("worker", "")] = value
            elif any(k in name for k in ("error", "retr", "fail")) and name.endswith("_total"):
                out["counters"][name + json.dumps(labels, sort_keys=True)] = value
    return out


def _first(samples: list[dict], after: float, pred) -> float | None:
    prev = None
    for s in samples:
        if s["t"] >= after and prev is not None and pred(prev, s):
            return s["t"]
        prev = s
    return None


def router_timeline(samples: list[dict], victim: str, events: dict) -> dict:
    """Seconds, relative to the kill or the replica's return, at which the router changed its mind."""
    k, ready = events["kill"], events["ready_again"]
    grew = lambda a, b: b["decisions"].get(victim, 0) > a["decisions"].get(victim, 0)  # noqa: E731
    last_before_restart = [s["t"] for a, s in zip(samples, samples[1:]) if k <= s["t"] < events["restart"] and grew(a, s)]
    down = _first(samples, k, lambda a, b: b["health"].get(victim, 1) == 0)
    up = _first(samples, events["restart"], lambda a, b: b["health"].get(victim, 0) == 1 and a["health"].get(victim, 1) == 0)
    back = _first(samples, ready, grew)
    first, last = samples[0]["counters"], samples[-1]["counters"]
    return {
        "last_routed_to_victim_s_after_kill": round(max(last_before_restart) - k, 2) if last_before_restart else None,
        "marked_unhealthy_s_after_kill": round(down - k, 2) if down else None,
        "marked_healthy_s_after_ready": round(up - ready, 2) if up else None,
        "routed_to_victim_again_s_after_ready": round(back - ready, 2) if back else None,
        "router_error_counters_delta": {n: v - first.get(n, 0.0) for n, v in last.items() if v - first.get(n, 0.0)},
    }


def summarize(results: list[dict], events: dict, timeline: dict, concurrency: int, settings: dict) -> dict:
    k = events["kill"]
    failed = [r for r in results if not r["ok"]]
    in_flight = [r for r in results if r["start"] < k <= r["end"]]
    in_flight_failed = [r for r in in_flight if not r["ok"]]
    later = [r for r in failed if r["start"] >= k]
    errors: dict[str, int] = {}
    for r in failed:
        key = (r["error"] or "")[:120]
        errors[key] = errors.get(key, 0) + 1
    streams = [r for r in results if r["stream"]]
    return {
        "benchmark": "fleet-failover", "policy": "round_robin", "concurrency": concurrency,
        "requests": len(results), "ok": len(results) - len(failed), "failed": len(failed),
        "streams": len(streams), "streams_failed": sum(not r["ok"] for r in streams),
        "in_flight_at_kill": len(in_flight), "in_flight_at_kill_failed": len(in_flight_failed),
        "in_flight_failed_streams_mid_generation": sum(r["stream"] and r["chunks"] > 0 for r in in_flight_failed),
        "in_flight_failure_seconds_after_kill": sorted(round(r["end"] - k, 2) for r in in_flight_failed),
        "failed_started_after_kill": len(later),
        "seconds_down": round(events["restart"] - k, 1),
        "seconds_to_ready_again": round(events["ready_again"] - events["restart"], 1),
        **timeline,
        "errors": errors, "settings": settings,
        "load_average_1m": {"start": events["load_start"], "end": events["load_end"]},
    }


def bench_failover(out: Path, concurrency: int, before_s: float, down_s: float, after_s: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="kv-fleet-failover-"))
    events: dict[str, float] = {"load_start": round(os.getloadavg()[0], 2)}
    results: list[dict] = []
    samples: list[dict] = []
    with Fleet(work, replicas=2, policy="round_robin", prometheus_port=None) as fleet:
        victim = fleet.gateways[1]
        metrics_url = f"http://127.0.0.1:{fleet.router_metrics_port}/metrics"

        async def script() -> None:
            halt = asyncio.Event()

            async def worker(i: int) -> None:
                rng = random.Random(i)
                async with httpx.AsyncClient(timeout=120) as client:
                    while not halt.is_set():
                        prompt = text_of(rng, 20)
                        results.append(await one_request(client, fleet.router.url, prompt, stream=i % 2 == 0))

            async def sampler() -> None:
                while not halt.is_set():
                    try:
                        samples.append(await asyncio.to_thread(router_sample, metrics_url))
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.5)

            tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)] + [asyncio.create_task(sampler())]
            await asyncio.sleep(before_s)
            events["kill"] = time.time()
            victim.kill()
            await asyncio.sleep(down_s)
            events["restart"] = time.time()
            victim.start()
            await asyncio.to_thread(victim.wait_ready, 600)
            events["ready_again"] = time.time()
            await asyncio.sleep(after_s)
            halt.set()
            await asyncio.gather(*tasks)
        asyncio.run(script())
    events["load_end"] = round(os.getloadavg()[0], 2)
    settings = {"replicas": 2, "model": MODEL, "kv_cache_gib": 1.0,
                "enforce_eager": os.environ.get("GATEWAY_ENFORCE_EAGER", "profile default"),
                "stream_max_tokens": STREAM_TOKENS, "plain_max_tokens": PLAIN_TOKENS,
                "before_s": before_s, "down_s": down_s, "after_s": after_s}
    result = summarize(results, events, router_timeline(samples, victim.url, events), concurrency, settings)
    write(out, result, results, events)
    return result


def write(out: Path, result: dict, results: list[dict], events: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "failover.json").write_text(json.dumps(result, indent=2))
    s = result["settings"]
    md = ["# Fleet failover: one replica killed mid-load (vllm-router, round_robin)", "",
          f"{result['concurrency']} concurrent clients through the router, half streaming "
          f"({s['stream_max_tokens']} tokens), half not ({s['plain_max_tokens']} tokens); replica 1 SIGKILLed "
          f"(whole process group) after {s['before_s']:g} s, restarted {s['down_s']:g} s later, load kept "
          f"{s['after_s']:g} s after it was ready again. Load average (1 min) at start/end: "
          f"{result['load_average_1m']['start']} / {result['load_average_1m']['end']}.", "",
          "| figure | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in result.items()
           if k not in ("errors", "settings", "benchmark", "load_average_1m", "router_error_counters_delta")]
    md += ["", "Errors seen by clients:", ""] + [f"- {n} x `{e}`" for e, n in result["errors"].items()]
    md += ["", "Router error/retry counters, change over the run:", ""]
    md += [f"- `{n}`: {v:g}" for n, v in result["router_error_counters_delta"].items()] or ["- none changed"]
    (out / "failover.md").write_text("\n".join(md) + "\n")
    _plot(out / "failover.png", results, events)


def _plot(path: Path, results: list[dict], events: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t0 = min(r["start"] for r in results)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for r in results:
        color = "tab:green" if r["ok"] else "tab:red"
        ax.plot([r["start"] - t0, r["end"] - t0], [r["stream"]] * 2, color=color, alpha=0.5, lw=4)
    for name, color in (("kill", "black"), ("restart", "grey"), ("ready_again", "tab:blue")):
        ax.axvline(events[name] - t0, color=color, ls="--", label=name)
    ax.set_yticks([0, 1], ["plain", "stream"])
    ax.set_xlabel("seconds")
    ax.set_title("requests through the router (green ok, red failed)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
