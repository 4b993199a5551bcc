"""The in-process vLLM engine: ``AsyncLLM`` built from vLLM's own parsed flags (plus the
gateway's KV budget), started before the HTTP server and always shut down after it."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from service.kv.geometry import KVGeometry
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class EngineInfo:
    """What the gateway's own routes say about the engine (the KV-cache card)."""

    model_name: str
    model_path: str
    max_model_len: int
    geometry: KVGeometry
    num_blocks: int  # usable KV blocks (vLLM's pool less its null block)
    started_at: float
    start_seconds: float

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.geometry.block_size

    def card(self) -> dict[str, Any]:
        return {**self.geometry.as_dict(), "num_blocks": self.num_blocks,
                "capacity_tokens": self.capacity_tokens}


def fractional_cpu_budget(settings: Settings) -> bool:
    gib = settings.kv_cache_gib
    return settings.device == "cpu" and gib is not None and gib != int(gib)


def cpu_budget_blocks(settings: Settings, args: argparse.Namespace) -> int:
    """vLLM's CPU budget is whole GiB; a fractional one becomes an exact block count."""
    from service.kv.geometry import geometry_from_model_dir

    if not os.path.isdir(args.model):
        raise ValueError("a fractional kv_cache_gib needs a local model folder; use whole GiB")
    g = geometry_from_model_dir(args.model, block_size=args.block_size or 128,
                                kv_cache_dtype=args.kv_cache_dtype,
                                dtype=None if args.dtype == "auto" else args.dtype)
    return max(1, int(settings.kv_cache_gib * 2**30) // g.kv_bytes_per_block)


def apply_process_env(settings: Settings, args: argparse.Namespace) -> None:
    """Environment the engine reads at start (must be set before it is created)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # A dead engine turns /health and requests into 503 (and /health/live too, so the
    # orchestrator restarts the process) instead of vLLM's watchdog exiting under clients.
    os.environ.setdefault("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    if settings.device == "cpu":
        # Always set the CPU KV space: without it vLLM asks for most of the NUMA node.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(settings.kv_cache_gib or 1))
    if os.path.isdir(args.model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def engine_info(engine: Any, name: str, model_path: str, start_seconds: float) -> EngineInfo:
    """The KV card: the same whole-model geometry and usable pool the accounting plugin reads."""
    from service.telemetry.engine_geometry import geometry_from_vllm_config

    eg = geometry_from_vllm_config(engine.vllm_config)
    return EngineInfo(model_name=name, model_path=model_path, max_model_len=eg.max_model_len,
                      geometry=eg.geometry, num_blocks=eg.num_blocks,
                      started_at=time.time(), start_seconds=start_seconds)


@contextlib.asynccontextmanager
async def build_engine(settings: Settings, args: argparse.Namespace) -> AsyncIterator[Any]:
    """Start one AsyncLLM the way ``vllm serve`` does, and always shut it down. Our stat
    logger is vLLM's plugin (entry point ``kv_gateway``): vLLM adds it to this AsyncLLM."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    apply_process_env(settings, args)
    if args.num_gpu_blocks_override is None and fractional_cpu_budget(settings):
        args.num_gpu_blocks_override = cpu_budget_blocks(settings, args)
    if settings.kv_attribution:
        from service.telemetry.kv_connector import with_accounting

        if settings.device == "cpu" and args.kv_transfer_config is None:
            # vLLM's CPU build reserves one more core when any KV connector is configured
            # (meant for NIXL's transfers); ours moves no KV, so keep the reservation vLLM
            # makes without one (one core per local rank), unless the user set it.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
        args.kv_transfer_config = with_accounting(args.kv_transfer_config)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    propagate_flash_late_interaction(args, engine_args)
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    engine = AsyncLLM.from_vllm_config(
        vllm_config=vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=False)
    try:
        await engine.reset_mm_cache()
        yield engine
    finally:
        engine.shutdown(timeout=vllm_config.shutdown_timeout)


async def warmup(engine: Any) -> None:
    """One tiny greedy generation so the first user request does not pay one-time costs."""
    from vllm import SamplingParams

    t0 = time.monotonic()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    async for _ in engine.generate({"prompt_token_ids": [1, 2, 3]}, params, "warmup-" + uuid.uuid4().hex):
        pass
    log.info("warm-up generation took %.2f s", time.monotonic() - t0)
