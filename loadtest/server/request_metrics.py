"""Server-side figures of each request, joined to the client's records by request id.

Every request carries its own ``X-Request-Id`` (``loadtest.core.client.request_id``). The
gateway keeps each finished request's figures in a bounded ledger and serves them at
``GET /v1/requests/{id}/metrics``: ``{"object": "request.metrics", "id": ..., "data":
[record, ...]}``, one record per sequence (several when n > 1), or a 404 error with code
``request_not_found`` for an id it does not know. A plain ``vllm serve`` has no such
route.

The lookups run once the measured run is over, so they never perturb its timings:

1. probe: up to ``PROBE_LOOKUPS`` ids, one at a time, the requests that succeeded last
   first (the ledger drops its oldest entries first). An answer saying the route is
   missing (a 404 without the ledger's error code, 405, 501, or a 200 that is not a
   ``request.metrics`` document) ends the join at once: ``not_offered``. No figures
   after every probe: ``not_found`` when the route answered, else ``not_offered``.
2. the other ids, ``LOOKUP_CONCURRENCY`` at a time, each bounded by ``LOOKUP_TIMEOUT_S``;
   no new lookup starts after ``MAX_ERRORS`` failed ones (timeouts, refused connections,
   5xx, unreadable answers).

So a run against a server without the route costs one lookup (at most
``PROBE_LOOKUPS``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from loadtest.core.client import api_root
from loadtest.core.metrics import distribution
from loadtest.core.results import JoinedSummary, JoinStatus, RequestMetricsJoin, RequestRecord, ServerFigures, StepResult

LOOKUP_PATH = "/v1/requests/{}/metrics"
NOT_FOUND_CODE = "request_not_found"
LOOKUP_CONCURRENCY = 4
LOOKUP_TIMEOUT_S = 5.0
PROBE_LOOKUPS = 4
MAX_ERRORS = 8

# ledger fields summed over a request's sequences, and those taken from its longest sequence
SUMMED = (
    "prompt_tokens", "generation_tokens", "cached_tokens", "kv_used_bytes", "kv_allocated_bytes",
    "kv_mha_equivalent_bytes", "kv_byte_seconds", "kv_read_bytes", "attention_flops_prefill",
    "attention_flops_decode", "preemptions",
)  # fmt: skip
LONGEST = ("queue_seconds", "prefill_seconds", "decode_seconds", "e2e_seconds")

Answer = Literal["found", "unknown", "absent", "error"]


def lookup_url(base_url: str, request_id: str) -> str:
    return api_root(base_url) + LOOKUP_PATH.format(quote(request_id, safe=""))


def _numbers(records: Sequence[Mapping[str, Any]], name: str) -> list[float]:
    values = (record.get(name) for record in records)
    return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def combine(records: Sequence[Mapping[str, Any]]) -> ServerFigures:
    """One request's figures from its per-sequence ledger records (rules: ``SUMMED``, ``LONGEST``)."""
    fields: dict[str, float | None] = {}
    for name in SUMMED:
        values = _numbers(records, name)
        fields[name] = sum(values) if values else None
    for name in LONGEST:
        values = _numbers(records, name)
        fields[name] = max(values) if values else None
    return ServerFigures(sequences=len(records), **fields)  # type: ignore[arg-type]


def classify(status: int, body: bytes) -> tuple[Answer, ServerFigures | None]:
    """What one answer of the route says (module docstring); figures when found."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status == 200:
        records = data.get("data") if isinstance(data, dict) and data.get("object") == "request.metrics" else None
        if not isinstance(records, list):
            return "absent", None
        records = [r for r in records if isinstance(r, dict)]
        return ("found", combine(records)) if records else ("unknown", None)
    error = data.get("error") if isinstance(data, dict) else None
    if status == 404 and isinstance(error, dict) and error.get("code") == NOT_FOUND_CODE:
        return "unknown", None
    if status in (404, 405, 501):
        return "absent", None
    return "error", None


def summarize_joined(records: Sequence[RequestRecord]) -> JoinedSummary:
    """A step's joined figures: count, and the spread of KV bytes, byte-seconds, queue time."""
    joined = [r.server for r in records if r.server is not None]

    def spread(name: str) -> Any:
        return distribution([v for v in (getattr(f, name) for f in joined) if v is not None])

    return JoinedSummary(
        requests=len(records),
        joined=len(joined),
        kv_used_bytes=spread("kv_used_bytes"),
        kv_allocated_bytes=spread("kv_allocated_bytes"),
        kv_byte_seconds=spread("kv_byte_seconds"),
        queue_seconds=spread("queue_seconds"),
    )


def lookup_order(steps: Sequence[StepResult]) -> list[RequestRecord]:
    """Requests with an id: the successful ones, last finished first, then the failed ones."""
    timed = [(step.offset_s + r.end_s, r) for step in steps for r in step.requests if r.request_id]
    ok = [r for _, r in sorted(((t, r) for t, r in timed if r.success), key=lambda pair: -pair[0])]
    return ok + [r for _, r in timed if not r.success]


class _Tally:
    def __init__(self) -> None:
        self.answers: Counter[Answer] = Counter()
        self.details: Counter[str] = Counter()
        self.start = time.perf_counter()

    def count(self, answer: Answer, detail: str) -> None:
        self.answers[answer] += 1
        self.details[detail] += 1

    @property
    def lookups(self) -> int:
        return sum(self.answers.values())

    @property
    def errors(self) -> int:
        return self.answers["error"] + self.answers["absent"]

    def result(self, status: JoinStatus, note: str | None = None) -> RequestMetricsJoin:
        """The outcome; the note lists the answers unless every lookup found figures."""
        answers = ", ".join(f"{detail} x{n}" for detail, n in self.details.most_common())
        if answers and self.answers["found"] < self.lookups:
            note = f"{note} (answers: {answers})" if note else f"answers: {answers}"
        return RequestMetricsJoin(
            status=status,
            lookups=self.lookups,
            joined=self.answers["found"],
            missing=self.answers["unknown"],
            errors=self.errors,
            duration_s=time.perf_counter() - self.start,
            note=note,
        )


async def _lookup(session: aiohttp.ClientSession, url: str, headers: Mapping[str, str]) -> tuple[Answer, Any, str]:
    try:
        async with session.get(url, headers=dict(headers)) as response:
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return "error", None, type(exc).__name__
    try:
        answer, figures = classify(status, body)
    except ValueError:  # figures that do not fit the record (pydantic's error is a ValueError)
        return "error", None, f"HTTP {status} unreadable"
    return answer, figures, f"HTTP {status}" + (" request_not_found" if answer == "unknown" else "")


async def join_request_metrics(
    steps: Sequence[StepResult], base_url: str, headers: Mapping[str, str] | None = None
) -> RequestMetricsJoin:
    """Look up every request of ``steps`` and set ``record.server`` and ``step.request_metrics``."""
    pending = lookup_order(steps)
    tally = _Tally()
    if not pending:
        return tally.result("not_found", "no request carried an id")
    timeout = aiohttp.ClientTimeout(total=LOOKUP_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=LOOKUP_CONCURRENCY)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(record: RequestRecord) -> Answer:
            url = lookup_url(base_url, record.request_id or "")
            answer, figures, detail = await _lookup(session, url, headers or {})
            tally.count(answer, detail)
            record.server = figures
            return answer

        for record in pending[:PROBE_LOOKUPS]:
            answer = await one(record)
            if answer == "absent":
                return tally.result("not_offered", "the server does not offer them")
            if answer == "found":
                break
        else:
            if tally.answers["unknown"]:
                return tally.result("not_found", f"the server knew none of the {tally.lookups} ids probed")
            return tally.result("not_offered", f"none of the {tally.lookups} lookups probed was answered")
        rest = iter(pending[tally.lookups :])

        async def worker() -> None:
            for record in rest:
                if tally.errors >= MAX_ERRORS:
                    return
                await one(record)

        await asyncio.gather(*(worker() for _ in range(LOOKUP_CONCURRENCY)))
    for step in steps:
        step.request_metrics = summarize_joined(step.requests)
    note = f"stopped after {MAX_ERRORS} failed lookups" if tally.errors >= MAX_ERRORS else None
    return tally.result("joined", note)
