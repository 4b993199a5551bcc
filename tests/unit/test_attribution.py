"""Fair shares of KV blocks (service/kv/attribution.py): hand-worked cases, and conservation
under random block-table histories (the sum of fair shares is the distinct blocks held)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from service.kv.attribution import FairShareLedger


def blocks(*ids):
    return [SimpleNamespace(block_id=i) for i in ids]


def test_two_requests_sharing_a_prefix_hand_worked():
    """a holds blocks 1,2 (prefix) + 3; b joins at t=10 sharing 1,2 with its own 4; a
    leaves at t=20, b at t=30. Fair: a = 3*10 + (1/2+1/2+1)*10 = 50, b = (1/2+1/2+1)*10 +
    3*10 = 50; sum 100 = block-seconds of the distinct blocks (3, then 4, then 3, 10 s each).
    Referenced (RSS-like): a = 3*20 = 60, b = 3*20 = 60."""
    led = FairShareLedger()
    led.step(0.0, {"a": blocks(1, 2, 3)})
    s = led.step(10.0, {"a": blocks(1, 2, 3), "b": blocks(1, 2, 4)})
    assert s.attributed_blocks == 4 and s.holders == 2 and s.referenced_blocks == 6
    assert led.fair_share_now("a") == pytest.approx(2.0) and led.referenced_now("a") == 3
    led.finish("a")
    s20 = led.step(20.0, {"b": blocks(1, 2, 4)})
    a = s20.finished["a"]
    assert a.fair_block_seconds == pytest.approx(50.0)
    assert a.referenced_block_seconds == pytest.approx(60.0)
    assert a.peak_blocks == 3
    led.finish("b")
    s30 = led.step(30.0, {})
    b = s30.finished["b"]
    assert b.fair_block_seconds == pytest.approx(50.0) and b.referenced_block_seconds == pytest.approx(60.0)
    attributed = sum(x.attributed_block_seconds for x in (s, s20, s30))
    assert attributed == pytest.approx(30 + 40 + 30) == a.fair_block_seconds + b.fair_block_seconds


def test_growth_is_appended_and_preemption_keeps_the_totals():
    led = FairShareLedger()
    led.step(0.0, {"a": blocks(1)})
    led.step(1.0, {"a": blocks(1, 2)})  # decode grew a block
    led.step(2.0, {})  # preempted: blocks freed, not finished
    led.step(5.0, {"a": blocks(7, 8)})  # recomputed into other blocks
    led.finish("a")
    done = led.step(6.0, {}).finished["a"]
    assert done.fair_block_seconds == pytest.approx(1 + 2 + 2) == done.referenced_block_seconds
    assert done.peak_blocks == 2


def test_freed_and_reallocated_between_two_steps_starts_over():
    led = FairShareLedger()
    led.step(0.0, {"a": blocks(1, 2)})
    led.step(1.0, {"a": blocks(5, 6, 7), "b": blocks(5)})  # a: other blocks, not a pure append
    assert led.fair_share_now("b") == pytest.approx(0.5)  # block 5 is a's too
    assert led.step(2.0, {"a": blocks(5, 6, 7)}).attributed_blocks == 3
    led.finish("a")
    assert led.step(3.0, {}).finished["a"].fair_block_seconds == pytest.approx(2 + 2.5 + 3)


def test_a_request_finished_before_it_held_anything_reports_zero():
    led = FairShareLedger()
    led.finish("never")
    t = led.step(1.0, {}).finished["never"]
    assert (t.fair_block_seconds, t.referenced_block_seconds, t.peak_blocks) == (0.0, 0.0, 0)


@st.composite
def histories(draw):
    """Random block tables over steps: requests start (maybe sharing a prefix of a common
    pool), grow, get preempted or finish."""
    n_steps = draw(st.integers(2, 25))
    prefix = list(range(1, 6))
    live: dict[str, list[int]] = {}
    next_block, next_req = 100, 0
    steps = []
    for _ in range(n_steps):
        dt = draw(st.floats(0.01, 3.0))
        for rid in list(live):
            action = draw(st.sampled_from(["keep", "grow", "grow", "finish", "preempt", "realloc"]))
            if action == "grow":
                live[rid] = live[rid] + [next_block]
                next_block += 1
            elif action == "realloc":  # preempted and rescheduled within one step
                live[rid] = list(range(next_block, next_block + len(live[rid]) + 1))
                next_block += len(live[rid])
            elif action in ("finish", "preempt"):
                del live[rid]
        for _ in range(draw(st.integers(0, 3))):
            shared = prefix[:draw(st.integers(0, len(prefix)))]
            own = list(range(next_block, next_block + draw(st.integers(0, 3))))
            next_block += len(own)
            live[f"r{next_req}"] = shared + own
            next_req += 1
        steps.append((dt, {k: list(v) for k, v in live.items()}))
    return steps


@settings(max_examples=200, deadline=None)
@given(histories())
def test_fair_shares_conserve_and_never_exceed_referenced(history):
    led = FairShareLedger()
    t, attributed, totals, seen = 0.0, 0.0, {}, set()
    for dt, table in history:
        t += dt
        for rid in seen - set(table):
            led.finish(rid)  # finished or preempted: either way its totals are final here
        s = led.step(t, {k: blocks(*v) for k, v in table.items()})
        distinct = set().union(*table.values()) if table else set()
        assert s.attributed_blocks == len(distinct)
        assert sum(led.fair_share_now(r) for r in table) == pytest.approx(len(distinct))
        attributed += s.attributed_block_seconds
        totals.update(s.finished)
        seen |= set(table)
        seen -= set(s.finished)
    for rid in seen:
        led.finish(rid)
    last = led.step(t + 1.0, {})
    attributed += last.attributed_block_seconds
    totals.update(last.finished)
    assert sum(x.fair_block_seconds for x in totals.values()) == pytest.approx(attributed, rel=1e-9, abs=1e-9)
    for x in totals.values():
        assert x.fair_block_seconds <= x.referenced_block_seconds + 1e-9


def test_without_sharing_fair_equals_referenced():
    led = FairShareLedger()
    led.step(0.0, {"a": blocks(1, 2), "b": blocks(3)})
    led.step(2.0, {"a": blocks(1, 2, 4), "b": blocks(3)})
    led.finish("a"), led.finish("b")
    done = led.step(3.0, {}).finished
    for x in done.values():
        assert x.fair_block_seconds == pytest.approx(x.referenced_block_seconds)
