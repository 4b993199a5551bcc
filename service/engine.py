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

from service.kv.geometry import KVGeometry, kv_cache_dtype_bytes
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


def geometry_from_vllm(vllm_config: Any) -> KVGeometry:
    """KV geometry of the running engine, per tensor-parallel rank."""
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    dtype = str(mc.dtype).removeprefix("torch.")
    cache_dtype = str(cc.cache_dtype)
    return KVGeometry(
        layers=mc.get_num_layers(pc),
        query_heads=mc.get_num_attention_heads(pc),
        kv_heads=mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        dtype_bytes=kv_cache_dtype_bytes(cache_dtype, dtype),
        block_size=cc.block_size,
        dtype=dtype if cache_dtype == "auto" else cache_dtype,
    )


def usable_blocks(vllm_config: Any) -> int:
    """KV blocks that can hold tokens: vLLM keeps one block of the pool as a null block."""
    return max(int(vllm_config.cache_config.num_gpu_blocks or 0) - 1, 0)


def engine_info(engine: Any, name: str, model_path: str, start_seconds: float) -> EngineInfo:
    vc = engine.vllm_config
    return EngineInfo(model_name=name, model_path=model_path, max_model_len=vc.model_config.max_model_len,
                      geometry=geometry_from_vllm(vc), num_blocks=usable_blocks(vc),
                      started_at=time.time(), start_seconds=start_seconds)


@contextlib.asynccontextmanager
async def build_engine(settings: Settings, args: argparse.Namespace,
                       stat_loggers: list[Any] | None = None) -> AsyncIterator[Any]:
    """Start one AsyncLLM the way ``vllm serve`` does, and always shut it down."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    apply_process_env(settings, args)
    if args.num_gpu_blocks_override is None and fractional_cpu_budget(settings):
        args.num_gpu_blocks_override = cpu_budget_blocks(settings, args)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    propagate_flash_late_interaction(args, engine_args)
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    engine = AsyncLLM.from_vllm_config(
        vllm_config=vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
        enable_log_requests=engine_args.enable_log_requests,
        aggregate_engine_logging=engine_args.aggregate_engine_logging,
        disable_log_stats=False, stat_loggers=stat_loggers)
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
