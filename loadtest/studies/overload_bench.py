"""Overload benchmark: the gateway's admission on predicted KV demand against `vllm serve`.

Three servers on the same engine settings (a small KV cache so that KV demand passes it),
all up at once and alternated step by step: the gateway (admission on, its defaults but a
queue deadline equal to the TTFT goal), `vllm serve` as it comes, and `vllm serve` with its
own limits tuned (``--max-num-seqs`` at what the cache holds at full length and
``--max-num-queued-reqs``). Two tenants send open-loop streams of completions: a steady
one (Poisson) and a bursting one (gamma arrivals, burstiness 0.25). The saturation rate is
measured first (closed loop on the gateway); the steps offer 0.5x .. 3x of it.

    python -m loadtest overload-bench --output-dir docs/results/overload-cpu

Goodput = requests that finished with TTFT <= goal and TPOT <= goal / arrival window.
TTFT, TPOT as vLLM's benchmark client defines them (loadtest.core.client). Requests still open
at the end of a step's grace period are cancelled and count as not good (and as unserved).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from loadtest.core.client import RequestOptions, StreamClient, endpoint_url
from loadtest.core.workload import RandomPromptBuilder, load_tokenizer
from loadtest.local.servers import Server

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"
NAME = "SmolLM2-135M-Instruct"
KEYS = {"steady": "bench-steady", "burst": "bench-burst"}


@dataclass
class Plan:
    blocks: int = 21  # vLLM's pool: 20 usable blocks of 128 tokens + its null block
    prompt_tokens: int = 100
    output_tokens: int = 150  # 250 tokens: 2 blocks each at the end, 1 at admission by vLLM
    ttft_goal: float = 8.0
    tpot_goal: float = 0.2
    window: float = 40.0  # arrivals per step
    grace: float = 30.0  # after the window, before open requests are cancelled
    multiples: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
    steady_share: float = 0.25  # of the saturation rate, whatever the multiple
    burstiness: float = 0.25
    seed: int = 0

    @property
    def full_length_seqs(self) -> int:
        per = -(-(self.prompt_tokens + self.output_tokens) // 128)
        return (self.blocks - 1) // per


class BenchServer(Server):
    """A loadtest Server with extra flags (the KV block count, limits) after the common ones."""

    def __init__(self, label: str, kind: str, extra: list[str], env: dict[str, str], log: Path):
        super().__init__(kind, str(MODEL_DIR), NAME, env=env, log_path=log)
        self.engine.update(enforce_eager=True)
        self.label, self.extra = label, extra

    def command(self) -> list[str]:
        return super().command() + self.extra


def servers(plan: Plan, out: Path) -> list[BenchServer]:
    common = ["--num-gpu-blocks-override", str(plan.blocks)]
    gw_env = {"GATEWAY_API_KEYS": ",".join(f"{k}:{v}" for k, v in KEYS.items()),
              "GATEWAY_ADMISSION_DEADLINE_SECONDS": str(plan.ttft_goal), "GATEWAY_WARMUP": "true"}
    tuned = ["--max-num-seqs", str(plan.full_length_seqs),
             "--max-num-queued-reqs", str(plan.full_length_seqs * 2)]
    return [BenchServer("gateway", "gateway", common, gw_env, out / "gateway.log"),
            BenchServer("vllm", "vllm", common, {}, out / "vllm.log"),
            BenchServer("vllm-tuned", "vllm", common + tuned, {}, out / "vllm-tuned.log")]


async def scrape(base: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        text = await r.text()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{") or l.startswith(name + " "))


def arrivals(rng: np.random.Generator, rate: float, window: float, shape: float) -> list[float]:
    """Gamma arrivals (shape 1 = Poisson) at ``rate`` per second over ``window`` seconds."""
    out, t = [], 0.0
    while rate > 0:
        t += rng.gamma(shape, 1.0 / (shape * rate))
        if t >= window:
            return out
        out.append(t)
    return out


async def run_step(srv: BenchServer, plan: Plan, prompts: list, schedule: dict[str, list[float]]) -> dict[str, Any]:
    opts = RequestOptions(url=endpoint_url(srv.base_url, "completions"), model=NAME, endpoint="completions")
    timeout = aiohttp.ClientTimeout(total=plan.window + plan.grace + 60)
    pre = await scrape(srv.base_url, "vllm:num_preemptions_total")
    load0 = os.getloadavg()[0]
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = {t: StreamClient(session, opts, headers={"Authorization": f"Bearer {KEYS[t]}"}) for t in KEYS}
        t0 = time.perf_counter()
        tasks: list[tuple[str, asyncio.Task]] = []

        async def fire(tenant: str, i: int, at: float) -> Any:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            return await clients[tenant].send(i, prompts[i % len(prompts)], t0, at)

        for tenant, times in schedule.items():
            for i, at in enumerate(times):
                tasks.append((tenant, asyncio.create_task(fire(tenant, i, at))))
        done, pending = await asyncio.wait([t for _, t in tasks], timeout=plan.window + plan.grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    post = await scrape(srv.base_url, "vllm:num_preemptions_total")
    recs = [(tenant, t.result() if t in done else None) for tenant, t in tasks]
    return summarize(recs, plan, post - pre, (load0 + os.getloadavg()[0]) / 2)


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(recs: list, plan: Plan, preemptions: float, load: float) -> dict[str, Any]:
    def good(r: Any) -> bool:
        tpot = _tpot(r)
        return bool(r and r.success and r.ttft_s is not None and r.ttft_s <= plan.ttft_goal
                    and (tpot is None or tpot <= plan.tpot_goal))

    served = [r for _, r in recs if r is not None and r.success]
    refused = [r for _, r in recs if r is not None and not r.success and (r.error_type or "").startswith("http_")]
    out = {
        "offered": len(recs), "served": len(served), "refused": len(refused),
        "unfinished": sum(1 for _, r in recs if r is None),
        "other_errors": sum(1 for _, r in recs if r is not None and not r.success and r not in refused),
        "refusal_codes": sorted({r.error_type for r in refused}),
        "refusal_seconds_p50": pct([r.end_s - r.start_s for r in refused], 50),
        "refusal_seconds_p99": pct([r.end_s - r.start_s for r in refused], 99),
        "goodput": sum(1 for _, r in recs if good(r)) / plan.window,
        "ttft_p50": pct([r.ttft_s for r in served], 50), "ttft_p99": pct([r.ttft_s for r in served], 99),
        "tpot_p50": pct([t for r in served if (t := _tpot(r)) is not None], 50),
        "tpot_p99": pct([t for r in served if (t := _tpot(r)) is not None], 99),
        "preemptions": preemptions, "load_average": round(load, 2),
        "tenants": {},
    }
    for tenant in KEYS:
        mine = [r for t, r in recs if t == tenant]
        out["tenants"][tenant] = {"offered": len(mine), "goodput": sum(1 for r in mine if good(r)) / plan.window,
                                  "served": sum(1 for r in mine if r is not None and r.success)}
    return out


def _tpot(r: Any) -> float | None:
    if r is None or r.e2e_s is None or r.ttft_s is None or not r.output_tokens or r.output_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


async def saturation(srv: BenchServer, plan: Plan, prompts: list) -> float:
    """Requests/s the engine completes with the cache full: a closed loop of 3x what it holds."""
    opts = RequestOptions(url=endpoint_url(srv.base_url, "completions"), model=NAME, endpoint="completions")
    n = plan.full_length_seqs * 3
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        c = StreamClient(session, opts, headers={"Authorization": f"Bearer {KEYS['steady']}"})
        t0 = time.perf_counter()
        recs = await asyncio.gather(*[c.send(i, prompts[i], t0) for i in range(n)])
    ok = [r for r in recs if r.success]
    return len(ok) / max(r.end_s for r in ok)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(window=args.window, grace=args.grace)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(plan.seed)
    tok = load_tokenizer(MODEL_DIR)
    builder = RandomPromptBuilder(tok, "completions", rng)
    from dataclasses import replace
    prompts = [replace(builder.build(plan.prompt_tokens), output_tokens=plan.output_tokens) for _ in range(400)]
    srvs = servers(plan, log_dir := Path(args.log_dir))
    log_dir.mkdir(parents=True, exist_ok=True)
    for s in srvs:
        s.start()
        print(f"{s.label} up on {s.base_url} in {s.start_seconds:.0f} s", flush=True)
    try:
        for s in srvs:  # warm-up
            await saturation_warm(s, prompts)
        sat = await saturation(srvs[0], plan, prompts)
        print(f"saturation: {sat:.3f} requests/s", flush=True)
        result: dict[str, Any] = {"plan": plan.__dict__, "saturation_rps": sat, "steps": [], "alone": {}}
        steady_rate = plan.steady_share * sat
        order = list(range(len(srvs)))
        for k, m in enumerate(plan.multiples):
            srng = np.random.default_rng(plan.seed + k)
            sched = {"steady": arrivals(srng, steady_rate, plan.window, 1.0),
                     "burst": arrivals(srng, max(m * sat - steady_rate, 0.0), plan.window, plan.burstiness)}
            for j in order:
                step = await run_step(srvs[j], plan, prompts, sched)
                step.update(server=srvs[j].label, multiple=m, offered_rps=m * sat)
                result["steps"].append(step)
                print(json.dumps({k2: step[k2] for k2 in ("server", "multiple", "goodput", "served", "refused",
                                                           "unfinished", "ttft_p99", "preemptions", "load_average")}),
                      flush=True)
                _write(out, result)
            order = order[1:] + order[:1]  # alternate who goes first
        sched = {"steady": arrivals(np.random.default_rng(plan.seed + 99), steady_rate, plan.window, 1.0), "burst": []}
        for s in srvs:
            result["alone"][s.label] = await run_step(s, plan, prompts, sched)
            _write(out, result)
        return result
    finally:
        for s in srvs:
            s.stop()


async def saturation_warm(srv: BenchServer, prompts: list) -> None:
    opts = RequestOptions(url=endpoint_url(srv.base_url, "completions"), model=NAME, endpoint="completions")
    async with aiohttp.ClientSession() as session:
        c = StreamClient(session, opts, headers={"Authorization": f"Bearer {KEYS['steady']}"})
        await asyncio.gather(*[c.send(i, prompts[i], time.perf_counter()) for i in range(2)])


def _write(out: Path, result: dict[str, Any]) -> None:
    (out / "overload.json").write_text(json.dumps(result, indent=1))


def vllm_client(args: argparse.Namespace) -> None:
    """vLLM's own benchmark client (one tenant, Poisson) at 2x saturation against each server."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    out = Path(args.output_dir)
    result = json.loads((out / "overload.json").read_text())
    plan = Plan(**{k: tuple(v) if k == "multiples" else v for k, v in result["plan"].items()})
    rate = 2 * result["saturation_rps"]
    srvs = servers(plan, Path(args.log_dir))
    with ThreadPoolExecutor(len(srvs)) as pool:
        list(pool.map(lambda s: s.start(), srvs))
    runs = {}
    try:
        for s in srvs:
            name = f"vllm-client-{s.label}.json"
            cmd = [sys.executable, "-m", "loadtest", "vllm-bench", "--backend", "openai", "--base-url", s.base_url,
                   "--model", NAME, "--tokenizer", str(MODEL_DIR), "--dataset-name", "random",
                   "--random-input-len", str(plan.prompt_tokens), "--random-output-len", str(plan.output_tokens),
                   "--ignore-eos", "--num-prompts", str(round(rate * plan.window)), "--request-rate", f"{rate:.3f}",
                   "--seed", str(plan.seed), "--goodput", f"ttft:{plan.ttft_goal * 1000:.0f}",
                   f"tpot:{plan.tpot_goal * 1000:.0f}", "--percentile-metrics", "ttft,tpot,e2el",
                   "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(args.log_dir),
                   "--result-filename", name]
            pre = asyncio.run(scrape(s.base_url, "vllm:num_preemptions_total"))
            subprocess.run(cmd, env={**os.environ, "OPENAI_API_KEY": KEYS["steady"]}, check=True,
                           stdout=subprocess.DEVNULL)
            r = json.loads((Path(args.log_dir) / name).read_text())
            runs[s.label] = {k: r.get(k) for k in ("completed", "failed", "request_throughput", "request_goodput",
                                                    "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms")}
            runs[s.label]["preemptions"] = asyncio.run(scrape(s.base_url, "vllm:num_preemptions_total")) - pre
            runs[s.label]["load_average"] = os.getloadavg()[0]
            print(json.dumps({s.label: runs[s.label]}), flush=True)
    finally:
        for s in srvs:
            s.stop()
    result["vllm_client"] = {"offered_rps": rate, "runs": runs}
    _write(out, result)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("overload-bench", help="admission on KV demand against vllm serve (docs/results/overload-cpu)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="docs/results/overload-cpu")
    p.add_argument("--log-dir", default="overload-logs")
    p.add_argument("--window", type=float, default=40.0)
    p.add_argument("--grace", type=float, default=30.0)
    p.add_argument("--render-only", action="store_true", help="re-render overload.json into Markdown and plots")
    p.add_argument("--vllm-client", action="store_true",
                   help="after a run: vLLM's own benchmark client at 2x saturation against each server")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    if args.vllm_client:
        vllm_client(args)
    elif not args.render_only:
        asyncio.run(main_async(args))
    render(Path(args.output_dir))
    return 0


def _f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render(out: Path) -> None:
    """overload.md and goodput.png / ttft_p99.png from overload.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads((out / "overload.json").read_text())
    plan, steps = r["plan"], r["steps"]
    labels = list(dict.fromkeys(s["server"] for s in steps))
    lines = [f"# Overload: gateway admission vs vllm serve (CPU)\n",
             f"Saturation (closed loop, cache full): {r['saturation_rps']:.3f} requests/s. "
             f"Goals: TTFT <= {plan['ttft_goal']} s, TPOT <= {plan['tpot_goal']} s. "
             f"{plan['window']:.0f} s of arrivals per step + {plan['grace']:.0f} s grace; KV cache "
             f"{plan['blocks'] - 1} usable blocks of 128; prompts {plan['prompt_tokens']} + {plan['output_tokens']} "
             f"output tokens (ignore_eos). Steady tenant: Poisson at {plan['steady_share']} x saturation; burst tenant: "
             f"gamma arrivals (burstiness {plan['burstiness']}) with the rest.\n",
             "| x sat | server | offered | goodput r/s | steady goodput | burst goodput | served | refused | refusal p50 s | "
             "unfinished | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | preemptions | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        t = s["tenants"]
        lines.append(f"| {s['multiple']} | {s['server']} | {s['offered']} | {_f(s['goodput'], 3)} | "
                     f"{_f(t['steady']['goodput'], 3)} | {_f(t['burst']['goodput'], 3)} | {s['served']} | {s['refused']} "
                     f"{','.join(c.removeprefix('http_') for c in s['refusal_codes'])} | {_f(s['refusal_seconds_p50'], 3)} | "
                     f"{s['unfinished']} | {_f(s['ttft_p50'])} | {_f(s['ttft_p99'])} | {_f(s['tpot_p50'], 3)} | "
                     f"{_f(s['tpot_p99'], 3)} | {s['preemptions']:.0f} | {s['load_average']} |")
    if r.get("alone"):
        lines += ["", "Steady tenant alone (same arrivals, no burst):", "",
                  "| server | steady goodput r/s | TTFT p99 | preemptions |", "|---|---|---|---|"]
        lines += [f"| {k} | {_f(a['tenants']['steady']['goodput'], 3)} | {_f(a['ttft_p99'])} | {a['preemptions']:.0f} |"
                  for k, a in r["alone"].items()]
    if r.get("vllm_client"):
        v = r["vllm_client"]
        lines += ["", f"vLLM's own benchmark client (`vllm bench serve`, random {plan['prompt_tokens']} in / "
                  f"{plan['output_tokens']} out, ignore_eos, Poisson, one tenant) at {v['offered_rps']:.3f} requests/s "
                  "(2x saturation), goodput with the same goals:", "",
                  "| server | completed | failed | goodput r/s | throughput r/s | TTFT p50 ms | TTFT p99 ms | "
                  "TPOT p50 ms | TPOT p99 ms | preemptions | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {k} | {a['completed']} | {a['failed']} | {_f(a['request_goodput'], 3)} | "
                  f"{_f(a['request_throughput'], 3)} | {_f(a['p50_ttft_ms'], 0)} | {_f(a['p99_ttft_ms'], 0)} | "
                  f"{_f(a['p50_tpot_ms'], 0)} | {_f(a['p99_tpot_ms'], 0)} | {a['preemptions']:.0f} | "
                  f"{a['load_average']:.2f} |" for k, a in v["runs"].items()]
    (out / "overload.md").write_text("\n".join(lines) + "\n")
    for key, name, ylabel in (("goodput", "goodput.png", "goodput (requests/s within goals)"),
                              ("ttft_p99", "ttft_p99.png", "p99 TTFT of served requests (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in labels:
            pts = [(s["offered_rps"], s[key]) for s in steps if s["server"] == label and s[key] is not None]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_xlabel("offered rate (requests/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


