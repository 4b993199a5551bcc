"""A small mix of real requests, so that every dashboard panel has something to show:
chat and completion, streaming and not, n > 1, a shared long prefix (prefix-cache hits),
client errors (4xx) and one stream the client abandons (finish reason `abort`)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx


@dataclass
class TrafficResult:
    statuses: dict[str, int] = field(default_factory=dict)  # request name -> HTTP status

    def count(self, status_class: str) -> int:
        return sum(1 for s in self.statuses.values() if f"{s // 100}xx" == status_class)


def _words(n: int) -> str:
    return uuid.uuid4().hex[:8] + " " + " ".join(["river", "stone", "light", "cloud"] * (n // 4))


def _request(client: httpx.Client, api: str, model: str, kind: str, i: int) -> int:
    body: dict = {"model": model, "max_tokens": 12 + 4 * (i % 3), "ignore_eos": True, "temperature": 0.7, "seed": i}
    if kind == "chat":
        r = client.post(api + "/chat/completions", json={**body, "messages": [{"role": "user", "content": _words(12 + 8 * i)}]})
    elif kind == "completion":
        r = client.post(api + "/completions", json={**body, "prompt": _words(20 + 8 * i)})
    elif kind == "chat-n2":
        r = client.post(api + "/chat/completions", json={**body, "n": 2, "messages": [{"role": "user", "content": _words(16)}]})
    elif kind == "stream":
        payload = {**body, "stream": True, "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": _words(24 + 4 * i)}]}
        with client.stream("POST", api + "/chat/completions", json=payload) as s:
            for _ in s.iter_lines():
                pass
            return s.status_code
    elif kind == "abort":
        payload = {**body, "max_tokens": 400, "stream": True, "prompt": _words(16)}
        with client.stream("POST", api + "/completions", json=payload) as s:
            seen = 0
            for line in s.iter_lines():
                seen += line.startswith("data:")
                if seen >= 3:
                    break  # leaving the block closes the connection: the gateway aborts it
            return s.status_code
    elif kind == "unknown-model":
        r = client.post(api + "/completions", json={**body, "model": "no-such-model", "prompt": "hi"})
    elif kind == "bad-max-tokens":
        r = client.post(api + "/completions", json={**body, "max_tokens": -5, "prompt": "hi"})
    elif kind == "no-messages":
        r = client.post(api + "/chat/completions", json={"model": model})
    else:
        raise ValueError(kind)
    return r.status_code


def send_mixed_traffic(api_url: str, model: str, rounds: int = 1, concurrency: int = 4) -> TrafficResult:
    """About 20 requests per round, `concurrency` at a time; returns each one's status."""
    prefix = _words(300)  # > 2 KV blocks of 128 tokens: the second request hits the prefix cache
    jobs: list[tuple[str, str, int]] = []
    for r in range(rounds):
        for i in range(4):
            jobs += [(f"chat-{r}-{i}", "chat", i), (f"completion-{r}-{i}", "completion", i), (f"stream-{r}-{i}", "stream", i)]
        jobs += [(f"chat-n2-{r}", "chat-n2", r), (f"abort-{r}", "abort", r)]
        jobs += [(f"{k}-{r}", k, r) for k in ("unknown-model", "bad-max-tokens", "no-messages")]
    result = TrafficResult()
    with httpx.Client(timeout=120) as client:
        # the shared prefix: one after the other, so the second finds the first's blocks
        for j in range(2):
            r = client.post(api_url + "/completions", json={"model": model, "prompt": prefix + f" question {j}",
                                                            "max_tokens": 4, "ignore_eos": True})
            result.statuses[f"prefix-{j}"] = r.status_code
        with ThreadPoolExecutor(concurrency) as pool:
            futures = {name: pool.submit(_request, client, api_url, model, kind, i) for name, kind, i in jobs}
            for name, f in futures.items():
                result.statuses[name] = f.result()
    return result
