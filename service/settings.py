"""One typed settings object for the gateway's own options.

Precedence (highest first): CLI flags / init kwargs > ``GATEWAY_*`` env vars >
the model profile YAML (``GATEWAY_PROFILE``) > defaults below. Bad values fail at start.

vLLM's engine and server flags are not copied here. They reach vLLM's own parser
unchanged (see service/vllm_args.py), from, lowest first: the profile's other keys
(``max_num_seqs: 32``), ``GATEWAY_<FLAG>`` env vars (``GATEWAY_MAX_NUM_SEQS=32``), and
flags on the command line (``--max-num-seqs 32``). They are collected in ``vllm_args``
(profile and env) and checked against vLLM's parser when the server starts.
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

from service.admission.policy import check_tenants, parse_tenant_map, positive_weight
from service.telemetry.tenants import DEFAULT_TENANT, parse_api_keys

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = PROJECT_ROOT / "configs" / "models" / "smollm2-135m-cpu.yaml"
ENV_PREFIX = "GATEWAY_"
#: env vars with the prefix that are not settings (read by tests or tools, not the gateway)
ENV_NOT_SETTINGS = frozenset({"GATEWAY_TEST_START_TIMEOUT"})


def load_profile(path: str | Path) -> dict[str, Any]:
    """Read a model profile YAML (a flat mapping: gateway settings and vLLM flags)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"model profile not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"model profile {p} must be a mapping")
    return data


def resolve_model_path(v: Any) -> Any:
    """Relative model paths (in profiles) are relative to the project root when that exists."""
    if not isinstance(v, str):
        return v
    p = Path(v)
    if not p.is_absolute() and not p.exists() and (PROJECT_ROOT / p).exists():
        return str(PROJECT_ROOT / p)
    return v


def _vllm_key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


class _ProfileSource(PydanticBaseSettingsSource):
    """The model profile: our fields by name, every other key into ``vllm_args``."""

    def __init__(self, settings_cls: type[BaseSettings], profile: str | None):
        super().__init__(settings_cls)
        self._profile = profile

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover - __call__ does the work

    def __call__(self) -> dict[str, Any]:
        if not self._profile:
            return {}
        data = load_profile(self._profile)
        ours = {k: v for k, v in data.items() if k in self.settings_cls.model_fields}
        rest = {_vllm_key(k): v for k, v in data.items() if k not in self.settings_cls.model_fields}
        if "vllm_args" in ours:
            raise ValueError(f"profile {self._profile}: write vLLM flags as top-level keys")
        return {**ours, "vllm_args": rest} if rest else ours


class _VllmEnvSource(PydanticBaseSettingsSource):
    """``GATEWAY_<NAME>`` variables that are not gateway settings: vLLM flags."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # pragma: no cover

    def __call__(self) -> dict[str, Any]:
        fields = {ENV_PREFIX + n.upper() for n in self.settings_cls.model_fields}
        out = {_vllm_key(k[len(ENV_PREFIX):]): v for k, v in os.environ.items()
               if k.upper().startswith(ENV_PREFIX) and k.upper() not in fields
               and k.upper() not in ENV_NOT_SETTINGS and len(k) > len(ENV_PREFIX)}
        return {"vllm_args": out} if out else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # --- where and how the HTTP server runs
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    profile: str | None = Field(str(DEFAULT_PROFILE), description="model profile YAML; its keys are defaults")

    # --- the engine's memory: translated for vLLM (which has no flag for the CPU budget)
    device: Literal["cpu", "cuda"] = "cpu"
    kv_cache_gib: float | None = Field(
        None, gt=0, description="CPU only: KV cache budget in GiB (VLLM_CPU_KVCACHE_SPACE; "
        "a fraction becomes an exact block count)")

    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish")
    warmup: bool = Field(True, description="run one tiny generation before reporting ready")

    # --- request limits vLLM does not enforce itself
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest request body (413 above)")
    max_n: int = Field(8, ge=1, description="largest accepted `n`")
    unknown_fields: Literal["reject", "ignore"] = Field(
        "reject", description="a body field vLLM's request model lacks: 400 (OpenAI's behaviour), or "
        "ignore it (vLLM's); harmless OpenAI hints such as `metadata` always pass")
    max_stop: int = Field(64, ge=0, description="most stop sequences and most stop_token_ids")

    # --- admission control (429 + Retry-After past these; 0 = no limit)
    max_in_flight: int = Field(256, ge=0, description="generation requests admitted at once")
    max_waiting: int = Field(0, ge=0, description="shed when the engine queue is this long")
    shed_kv_usage: float = Field(0.0, ge=0, le=1, description="shed when KV usage ratio reaches this")
    retry_after_seconds: int = Field(1, ge=1)

    # --- admission on predicted KV demand, fair queue per tenant (service/admission/)
    admission: bool = Field(True, description="admit generation requests on predicted KV demand; "
                            "the others wait in the gateway's queue")
    admission_kv_fraction: float = Field(
        0.95, gt=0, le=1, description="fraction of the usable KV blocks the admitted requests may reserve")
    admission_deadline_seconds: float = Field(
        30.0, gt=0, description="longest wait in the admission queue; 429 + Retry-After past it")
    admission_max_queue: int = Field(1024, ge=1, description="requests queued at once; 429 past it")
    tenant_weights: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict, description="`name=weight,...`: each tenant's share of the KV budget "
        "when several wait (default 1)")
    tenant_priorities: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="`name=priority,...`: higher is served first (default 0)")

    # --- security
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated `name:key` entries (a bare key is named "
        "key1, key2, ... by position); the name is the tenant label; empty = no authentication")
    protect_metrics: bool = Field(False, description="require an API key for /metrics")
    protect_health: bool = Field(False, description="require an API key for /health*")

    # --- telemetry
    kv_attribution: bool = Field(
        True, description="measure each request's fair share of KV blocks from the engine's block tables "
        "(adds the accounting KV connector to vLLM's --kv-transfer-config, beside any configured one)")
    ledger_size: int = Field(10_000, ge=1, description="requests whose figures /v1/requests/{id}/metrics keeps")

    # --- vLLM flags from the profile and GATEWAY_<FLAG> env vars (not a flag of its own)
    vllm_args: dict[str, Any] = Field(default_factory=dict, exclude=True)

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
        return (init_settings, env_settings, _VllmEnvSource(settings_cls), _ProfileSource(settings_cls, profile))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [k.strip() for k in v.split(",") if k.strip()]
        if isinstance(v, list):
            parse_api_keys([str(k) for k in v])  # fail fast on a bad name or a duplicate
        return v

    @field_validator("tenant_weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        return parse_tenant_map(v, "tenant_weights", positive_weight)

    @field_validator("tenant_priorities", mode="before")
    @classmethod
    def _priorities(cls, v: Any) -> Any:
        return parse_tenant_map(v, "tenant_priorities", int)

    @field_validator("vllm_args")
    @classmethod
    def _normalise_vllm_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        out = {_vllm_key(k): val for k, val in v.items()}
        if "model" in out:
            out["model"] = resolve_model_path(out["model"])
        return out

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        a = self.vllm_args
        tp = int(a.get("tensor_parallel_size", 1) or 1) * int(a.get("pipeline_parallel_size", 1) or 1)
        if self.device == "cpu" and tp > 1:
            raise ValueError("tensor/pipeline parallelism needs device=cuda")
        tenants = {name for name, _ in self.tenant_keys} or {DEFAULT_TENANT}
        check_tenants(self.tenant_weights, tenants, "tenant_weights")
        check_tenants(self.tenant_priorities, tenants, "tenant_priorities")
        return self

    def __repr_args__(self):  # never print keys
        for k, v in super().__repr_args__():
            yield k, ("***" if k == "api_keys" and v else v)

    @property
    def tenant_keys(self) -> list[tuple[str, str]]:
        """[(tenant name, key)] of the configured API keys."""
        return parse_api_keys(self.api_keys)

    @property
    def model(self) -> str | None:
        """The model vLLM will load (profile ``model``, ``GATEWAY_MODEL``), before CLI flags."""
        return self.vllm_args.get("model")

    @property
    def max_model_len(self) -> int | None:
        v = self.vllm_args.get("max_model_len")
        return int(v) if v is not None else None
