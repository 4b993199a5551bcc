"""One typed settings object for the gateway.

Precedence (highest first): CLI flags / init kwargs > ``GATEWAY_*`` env vars >
the model profile YAML (``GATEWAY_PROFILE``) > defaults below. Bad values fail at start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = PROJECT_ROOT / "configs" / "models" / "smollm2-135m-cpu.yaml"
ENV_PREFIX = "GATEWAY_"


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read a model profile YAML (a flat mapping of settings fields)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model profile not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"model profile {p} must be a mapping")
    return data


class _ProfileSource(PydanticBaseSettingsSource):
    """Settings source that reads the model profile named by ``profile``."""

    def __init__(self, settings_cls: type[BaseSettings], profile: str | None):
        super().__init__(settings_cls)
        self._profile = profile

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ does the work

    def __call__(self) -> dict[str, Any]:
        if not self._profile:
            return {}
        data = load_profile(self._profile)
        unknown = set(data) - set(self.settings_cls.model_fields)
        if unknown:
            raise ValueError(f"unknown keys in profile {self._profile}: {sorted(unknown)}")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True
    )

    # --- where and how the HTTP server runs
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    profile: str | None = Field(
        str(DEFAULT_PROFILE), description="model profile YAML; its keys are defaults"
    )

    # --- the model (usually from the profile)
    model: str = Field("models/SmolLM2-135M-Instruct", description="local HF folder or hub id")
    served_model_name: str | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_gib: float | None = Field(
        None, gt=0, description="CPU only: KV cache budget in GiB (VLLM_CPU_KVCACHE_SPACE)"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_dtype: str = "auto"
    block_size: int | None = Field(None, ge=1)
    num_gpu_blocks_override: int | None = Field(None, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0
    trust_remote_code: bool = False

    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    warmup: bool = Field(True, description="run one tiny generation before reporting ready")

    # --- request limits
    max_n: int = Field(8, ge=1, description="largest accepted `n`")
    max_stop_sequences: int = Field(16, ge=0)
    max_logprobs: int = Field(20, ge=0)
    max_messages: int = Field(512, ge=1, description="most chat messages in one request")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body (413 above)")

    # --- admission control (429 + Retry-After past these; 0 = no limit)
    max_in_flight: int = Field(256, ge=0, description="completion requests admitted at once")
    max_waiting: int = Field(0, ge=0, description="shed when the engine queue is this long")
    shed_kv_usage: float = Field(0.0, ge=0, le=1, description="shed when KV usage ratio reaches this")
    retry_after_seconds: int = Field(1, ge=1)

    # --- security
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys; empty = no authentication")
    protect_metrics: bool = Field(False, description="require an API key for /metrics")
    protect_health: bool = Field(False, description="require an API key for /health*")
    log_prompts: bool = Field(False, description="debug only: put prompts and completions in logs")

    # --- telemetry
    request_telemetry: bool = Field(True, description="per-request KV/attention accounting")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = init_settings()
        if "profile" in init_kwargs:
            profile = init_kwargs["profile"]
        else:
            profile = os.environ.get(ENV_PREFIX + "PROFILE", str(DEFAULT_PROFILE)) or None
        return (init_settings, env_settings, _ProfileSource(settings_cls, profile))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("model")
    @classmethod
    def _resolve_model(cls, v: str) -> str:
        # Relative paths in profiles are relative to the project root when that exists.
        p = Path(v)
        if not p.is_absolute() and not p.exists() and (PROJECT_ROOT / p).exists():
            return str(PROJECT_ROOT / p)
        return v

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.device == "cpu" and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError("tensor/pipeline parallelism needs device=cuda")
        return self

    def __repr_args__(self):  # never print keys
        for k, v in super().__repr_args__():
            yield k, ("***" if k == "api_keys" and v else v)

    @property
    def model_name(self) -> str:
        """The name clients use in the `model` field."""
        return self.served_model_name or Path(self.model).name or self.model
