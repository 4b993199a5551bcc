"""Client-side metric math, on the definitions of vLLM's benchmark client.

For request *i* (successful), with send time ``s_i``, content-chunk arrival times
``c_i,1 < ... < c_i,m``, last ``choices`` chunk at ``l_i`` and ``n_i`` output tokens:

- TTFT_i = c_i,1 - s_i
- E2E_i  = l_i - s_i
- ITL    = { c_i,j+1 - c_i,j } pooled over all requests and j
- TPOT_i = (E2E_i - TTFT_i) / (n_i - 1), defined only when n_i > 1
- duration D = end of the last request - start of the step
- request throughput = completed / D;  output throughput = sum_i n_i / D;
  total token throughput = (sum_i prompt_i + sum_i n_i) / D
- goodput = #{ i : TTFT_i <= ttft_slo and TPOT_i <= tpot_slo and E2E_i <= e2el_slo } / D,
  only the SLOs that are set, TPOT_i taken as 0 when n_i <= 1 (as vLLM does).

``n_i`` is the server's ``usage.completion_tokens``; without usage, the tokenizer's
count of the streamed text, else the number of content chunks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from loadtest.core.config import Slo
from loadtest.core.results import Distribution, RequestRecord, RequestSummary, TokenChecks

PERCENTILES = (50, 90, 95, 99)


def distribution(values: Sequence[float]) -> Distribution:
    """Mean, p50/p90/p95/p99 (linear interpolation) and max; all None when empty."""
    if len(values) == 0:
        return Distribution(count=0)
    array = np.asarray(values, dtype=float)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(array, PERCENTILES))
    return Distribution(
        count=int(array.size),
        mean=float(array.mean()),
        p50=p50,
        p90=p90,
        p95=p95,
        p99=p99,
        max=float(array.max()),
    )


def output_token_count(record: RequestRecord) -> int:
    """n_i: usage if the server sent it, else the re-tokenized text, else content chunks."""
    for count in (record.output_tokens, record.retokenized_output_tokens):
        if count is not None:
            return count
    return record.content_chunks


def tpot(record: RequestRecord) -> float | None:
    """TPOT_i = (E2E_i - TTFT_i) / (n_i - 1); None when n_i <= 1 or the request failed."""
    n = output_token_count(record)
    if not record.success or n <= 1 or record.e2e_s is None or record.ttft_s is None:
        return None
    return (record.e2e_s - record.ttft_s) / (n - 1)


def meets_slo(record: RequestRecord, slo: Slo) -> bool:
    """True when a successful request meets every SLO that is set (TPOT 0 if n_i <= 1)."""
    if not record.success or record.ttft_s is None or record.e2e_s is None:
        return False
    limits = (
        (slo.ttft_ms, record.ttft_s),
        (slo.tpot_ms, tpot(record) or 0.0),
        (slo.e2el_ms, record.e2e_s),
    )
    return all(limit is None or value * 1000.0 <= limit for limit, value in limits)


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once, from the [start_s, end_s] intervals."""
    events = sorted(
        [(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records],
        key=lambda event: (event[0], event[1]),
    )
    peak = level = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def token_checks(records: Sequence[RequestRecord], ignore_eos: bool) -> TokenChecks:
    """Count requests whose server-side token counts differ from the client's expectation.

    Output length is only checked against the request when ``ignore_eos`` forces it.
    """
    checks = TokenChecks()
    for r in records:
        if not r.success:
            continue
        if r.output_tokens is None:
            checks.missing_usage += 1
            continue
        if r.expected_prompt_tokens is not None and r.prompt_tokens != r.expected_prompt_tokens:
            checks.prompt_mismatches += 1
        if ignore_eos and r.requested_output_tokens is not None and r.output_tokens != r.requested_output_tokens:
            checks.output_mismatches += 1
        if r.retokenized_output_tokens is not None and r.retokenized_output_tokens != r.output_tokens:
            checks.retokenization_mismatches += 1
    return checks


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo, ignore_eos: bool) -> RequestSummary:
    """Aggregate one step's requests (formulas in the module docstring)."""
    ok = [r for r in records if r.success]
    failures = Counter(r.error_type or "unknown" for r in records if not r.success)
    output_tokens = sum(output_token_count(r) for r in ok)
    input_tokens = sum(r.prompt_tokens or r.expected_prompt_tokens or 0 for r in ok)
    itls = [gap for r in ok for gap in r.itl_s]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    good = sum(meets_slo(r, slo) for r in ok) if slo.active else None
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return RequestSummary(
        completed=len(ok),
        failed=len(records) - len(ok),
        failures=dict(sorted(failures.items())),
        duration_s=duration_s,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_throughput=len(ok) * per_s,
        output_throughput=output_tokens * per_s,
        total_token_throughput=(input_tokens + output_tokens) * per_s,
        good_requests=good,
        goodput=None if good is None else good * per_s,
        peak_client_concurrency=peak_concurrency(records),
        ttft_s=distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=distribution(tpots),
        itl_s=distribution(itls),
        e2e_s=distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
        token_checks=token_checks(records, ignore_eos),
    )
