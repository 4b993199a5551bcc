"""KV demand (service/kv/demand.py): hand-worked examples on the CPU default model's cache.

SmolLM2-135M: 23,040 KV bytes per token; block 128 tokens = 2,949,120 bytes;
1 GiB cache = 363 usable blocks; max_model_len 2048."""

import pytest

from service.kv.demand import kv_demand, request_demand_tokens

SMOL = dict(kv_bytes_per_token=23_040, block_size=128, num_blocks=363, max_model_len=2048)
BLOCK_BYTES = 23_040 * 128


@pytest.mark.parametrize("prompt, max_tokens, expected", [
    (100, 28, 128),      # exactly one block
    (100, 29, 129),
    (0, 16, 16),
    (2000, 100, 2048),   # capped by the context limit
    (300, None, 2048),   # no max_tokens: may run to the context limit
    (2048, 0, 2048),
])
def test_request_demand_tokens(prompt, max_tokens, expected):
    assert request_demand_tokens(prompt, max_tokens, 2048) == expected


def test_empty_fleet_has_no_demand():
    d = kv_demand([], **SMOL)
    assert (d.requests, d.tokens, d.blocks, d.bytes, d.ratio) == (0, 0, 0, 0, 0.0)
    assert d.capacity_bytes == 363 * BLOCK_BYTES


def test_blocks_round_up_per_request_not_in_total():
    # two requests of 129 tokens: 258 tokens would fit 3 blocks, but each needs 2 of its own
    d = kv_demand([(100, 29), (100, 29)], **SMOL)
    assert (d.requests, d.tokens, d.blocks) == (2, 258, 4)
    assert d.bytes == 4 * BLOCK_BYTES
    assert d.ratio == pytest.approx(4 / 363)


def test_demand_sees_the_cache_running_out_before_usage_does():
    """40 requests of 120 prompt + 100 output tokens each hold 1 block after prefill
    (usage 40% of 100 blocks) but need 2 blocks at the end: demand 80%. With 60 of them
    usage is 60% and demand 120%: preemptions are ahead unless requests stop early."""
    d = kv_demand([(120, 100)] * 40, **{**SMOL, "num_blocks": 100})
    assert d.blocks == 80 and d.ratio == pytest.approx(0.8)
    d = kv_demand([(120, 100)] * 60, **{**SMOL, "num_blocks": 100})
    assert d.ratio == pytest.approx(1.2)


def test_unbounded_requests_count_to_the_context_limit():
    d = kv_demand([(50, None)] * 3, **SMOL)
    assert d.tokens == 3 * 2048 and d.blocks == 3 * 16


@pytest.mark.parametrize("bad", [dict(num_blocks=0), dict(block_size=0), dict(kv_bytes_per_token=0)])
def test_refuses_a_cache_it_cannot_divide_by(bad):
    with pytest.raises(ValueError):
        kv_demand([(1, 1)], **{**SMOL, **bad})


def test_refuses_negative_lengths():
    with pytest.raises(ValueError):
        request_demand_tokens(-1, 5, 2048)
    with pytest.raises(ValueError):
        request_demand_tokens(5, -1, 2048)
