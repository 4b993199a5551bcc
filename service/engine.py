"""The in-process vLLM engine: built from settings, started and always shut down in the
app's lifespan, reached through ``app.state`` (see service/api/deps.py)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol

from service.kv.geometry import KVGeometry, kv_cache_dtype_bytes
from service.settings import Settings

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the gateway needs from an engine (vLLM's AsyncLLM; a fake in unit tests)."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[Any]: ...
    async def abort(self, request_id: str) -> None: ...
    async def check_health(self) -> None: ...
    def get_tokenizer(self) -> Any: ...
    @property
    def errored(self) -> bool: ...
    def shutdown(self) -> None: ...


@dataclass
class EngineHandle:
    """The engine plus what the API layer needs to know about the model it serves."""

    engine: EngineLike
    model_name: str
    model_path: str
    max_model_len: int
    geometry: KVGeometry
    num_blocks: int  # usable KV blocks (vLLM's pool less its null block)
    tokenizer: Any
    started_at: float
    start_seconds: float

    @property
    def alive(self) -> bool:
        return not self.engine.errored

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.geometry.block_size


def engine_args(settings: Settings) -> Any:
    """Translate gateway settings into vLLM ``AsyncEngineArgs`` (same code on CPU and GPU)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kw: dict[str, Any] = dict(
        model=settings.model,
        served_model_name=[settings.model_name],
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        kv_cache_dtype=settings.kv_cache_dtype,
        max_num_seqs=settings.max_num_seqs,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        enable_prefix_caching=settings.enable_prefix_caching,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        trust_remote_code=settings.trust_remote_code,
        disable_log_stats=False,  # per-request stats and the step stat loggers need it
        gpu_memory_utilization=settings.gpu_memory_utilization,
    )
    for name in ("block_size", "num_gpu_blocks_override", "max_num_batched_tokens"):
        value = getattr(settings, name)
        if value is not None:
            kw[name] = value
    if "num_gpu_blocks_override" not in kw and fractional_cpu_budget(settings):
        kw["num_gpu_blocks_override"] = cpu_budget_blocks(settings)
    return AsyncEngineArgs(**kw)


def fractional_cpu_budget(settings: Settings) -> bool:
    gib = settings.kv_cache_gib
    return settings.device == "cpu" and gib is not None and gib != int(gib)


def cpu_budget_blocks(settings: Settings) -> int:
    """vLLM's CPU budget is whole GiB; a fractional one becomes an exact block count."""
    from service.kv.geometry import geometry_from_model_dir

    if not os.path.isdir(settings.model):
        raise ValueError("a fractional kv_cache_gib needs a local model folder; use whole GiB")
    g = geometry_from_model_dir(settings.model, block_size=settings.block_size or 128,
                                kv_cache_dtype=settings.kv_cache_dtype,
                                dtype=None if settings.dtype == "auto" else settings.dtype)
    return max(1, int(settings.kv_cache_gib * 2**30) // g.kv_bytes_per_block)


def apply_process_env(settings: Settings) -> None:
    """Environment the engine reads at start (must be set before it is created)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if settings.device == "cpu":
        # Always set the CPU KV space: without it vLLM asks for most of the NUMA node.
        # vLLM reads whole GiB here; a fractional budget is enforced by a block count.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(settings.kv_cache_gib or 1))
    local = os.path.isdir(settings.model)
    if local:
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


@contextlib.asynccontextmanager
async def build_engine(settings: Settings, stat_loggers: list[Any] | None = None) -> AsyncIterator[EngineHandle]:
    """Start one AsyncLLM and always shut it down."""
    from vllm.v1.engine.async_llm import AsyncLLM

    apply_process_env(settings)
    t0 = time.monotonic()
    engine = AsyncLLM.from_engine_args(engine_args(settings), stat_loggers=stat_loggers)
    try:
        vc = engine.vllm_config
        handle = EngineHandle(
            engine=engine,
            model_name=settings.model_name,
            model_path=settings.model,
            max_model_len=vc.model_config.max_model_len,
            geometry=geometry_from_vllm(vc),
            num_blocks=usable_blocks(vc),
            tokenizer=engine.get_tokenizer(),
            started_at=time.time(),
            start_seconds=time.monotonic() - t0,
        )
        log.info(
            "engine ready in %.1f s: %s, %d blocks x %d tokens, %d B/token KV",
            handle.start_seconds, handle.model_name, handle.num_blocks,
            handle.geometry.block_size, handle.geometry.kv_bytes_per_token,
        )
        yield handle
    finally:
        engine.shutdown()
