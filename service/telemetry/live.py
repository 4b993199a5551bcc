"""The engine's live requests as the API-server process sees them, every step:
KV demand, and the roofline of the current decode step next to its measured time.

vLLM's ``SchedulerStats`` only counts requests; the lengths live in the front end's
``OutputProcessor.request_states`` (one ``RequestState`` per unfinished engine sequence,
running or waiting, from ``add_request`` to finish or abort): ``prompt_len``,
``max_tokens_param`` (the request's ``max_tokens``; vLLM's OpenAI layer fills a default)
and ``stats`` (``num_generation_tokens``, ``scheduled_ts`` > 0 once scheduled). The stat
logger has no handle on that processor, in our gateway or in a plain ``vllm serve``, so
``install`` wraps ``OutputProcessor.add_request`` once to remember the instance that
receives requests. Pinned to vLLM 0.32 by tests/unit/test_vllm_seams.py.

Hardware for the roofline: service/telemetry/hardware.py (detected, or ``KV_GATEWAY_HARDWARE``);
without one, no prediction is exported (KV demand still is).
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass
from typing import Any

from service.kv import roofline
from service.kv.demand import KVDemand, kv_demand
from service.kv.geometry import KVGeometry
from service.kv.hardware import HARDWARE_ENV  # noqa: F401  (re-exported: the setting's name)

log = logging.getLogger(__name__)

_MARK = "__kv_gateway_live_hook__"
_processor: "weakref.ref[Any] | None" = None


def install() -> bool:
    """Wrap OutputProcessor.add_request (idempotent). True if this call wrapped it."""
    from vllm.v1.engine.output_processor import OutputProcessor

    original = OutputProcessor.add_request
    if getattr(original, _MARK, False):
        return False

    @functools.wraps(original)
    def add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        global _processor
        if _processor is None or _processor() is not self:
            _processor = weakref.ref(self)
        return original(self, *args, **kwargs)

    setattr(add_request, _MARK, True)
    OutputProcessor.add_request = add_request
    return True


def live_states() -> list[Any]:
    """The request states of the processor that last received a request (empty before)."""
    proc = _processor() if _processor is not None else None
    return list(proc.request_states.values()) if proc is not None else []


def demand(states: list[Any], geometry: KVGeometry, num_blocks: int, max_model_len: int) -> KVDemand:
    """KV demand of every unfinished sequence: prompt + max_tokens, block-rounded."""
    return kv_demand(((int(s.prompt_len or 0), s.max_tokens_param) for s in states),
                     kv_bytes_per_token=geometry.kv_bytes_per_token, block_size=geometry.block_size,
                     num_blocks=max(num_blocks, 1), max_model_len=max_model_len)


def decoding_contexts(states: list[Any]) -> list[int]:
    """Context (tokens of KV) of each sequence in its decode phase (it has its first token):
    its prompt and what it generated so far."""
    out = []
    for s in states:
        st = getattr(s, "stats", None)
        if st is not None and st.first_token_ts > 0:
            out.append(int(s.prompt_len or 0) + int(st.num_generation_tokens))
    return out


@dataclass(frozen=True)
class StepModel:
    """What the roofline of a decode step needs besides the batch's contexts."""

    geometry: KVGeometry
    weight_bytes: int
    matmul_params: int
    hardware: roofline.Hardware
    tensor_parallel_size: int = 1

    def step(self, contexts: list[int]) -> roofline.StepCost:
        return roofline.decode_step(self.geometry, self.weight_bytes, self.matmul_params, contexts,
                                    self.hardware, self.tensor_parallel_size)


def step_model(geometry: KVGeometry, model_path: str, dtype_bytes: int, tensor_parallel_size: int,
               hardware: roofline.Hardware | None) -> StepModel | None:
    """The roofline inputs of the served model, or None when they cannot be had exactly
    (no hardware, or no local checkpoint to count the weights of)."""
    if hardware is None:
        return None
    from service.kv.planner import load_shape

    try:
        cfg = load_shape(model_path)
        return StepModel(geometry, roofline.weights_bytes(cfg, dtype_bytes), roofline.matmul_parameters(cfg),
                         hardware, tensor_parallel_size)
    except (ValueError, OSError, KeyError) as e:
        log.warning("kv-gateway: no decode-step prediction for %s: %s", model_path, e)
        return None
