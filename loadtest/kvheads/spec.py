"""The KV-heads experiment's spec (YAML): variants or targets, budget, engine, workload, load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loadtest.core.config import Endpoint, resolve_config_path
from loadtest.server.saturation import SATURATION_FRACTION
from service.resources import config_file

DEFAULT_CONFIG = config_file("loadtest", "kv-heads-cpu.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantSpec(_Strict):
    """One model folder to serve; its KV-head count is read from its config.json."""

    name: str
    model: Path


class TargetSpec(_Strict):
    """An already running OpenAI-compatible server (targets mode)."""

    name: str
    base_url: str
    model: str | None = None  # served model name; default: the first of GET /v1/models


class BudgetSpec(_Strict):
    """The KV byte budget every variant gets: ``bytes``, or ``blocks_of_largest`` blocks
    of the variant with the most KV bytes per block (the MHA one)."""

    blocks_of_largest: int | None = Field(default=None, ge=1)
    bytes: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> BudgetSpec:
        if (self.blocks_of_largest is None) == (self.bytes is None):
            raise ValueError("set exactly one of budget.blocks_of_largest and budget.bytes")
        return self


class EngineSpec(_Strict):
    """Engine limits, the same for every variant (gateway settings of the same names)."""

    block_size: int = Field(default=128, ge=1)
    max_model_len: int = Field(default=256, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = False
    enforce_eager: bool = True
    dtype: str = "bfloat16"
    kv_cache_gib: float = Field(default=1.0, gt=0)
    reserved_blocks: int = Field(default=1, ge=0, description="blocks vLLM keeps out of the pool (null block)")
    start_timeout_s: float = Field(default=600.0, gt=0)
    stop_timeout_s: float = Field(default=60.0, gt=0)
    extra_args: list[str] = Field(default_factory=list, description="more `service serve` flags")


class WorkloadSpec(_Strict):
    endpoint: Endpoint = "completions"
    input_tokens: int = Field(default=32, ge=1)
    output_tokens: int = Field(default=64, ge=1)
    tokenizer: Path | None = None  # default: the first variant's folder


class LoadSpec(_Strict):
    """Closed loop, one step per concurrency C; each step sends
    clamp(ceil(waves x C), min_requests, max_requests) requests and starts none after
    ``max_step_seconds`` (requests in flight then finish)."""

    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 8, 16, 32, 48])
    waves: float = Field(default=3.0, gt=0)
    min_requests: int = Field(default=8, ge=1)
    max_requests: int | None = Field(default=None, ge=1)
    max_step_seconds: float | None = Field(default=60.0, gt=0)
    warmup_requests: int = Field(default=2, ge=0)
    seed: int = 0
    scrape_interval_s: float = Field(default=0.25, gt=0)
    request_timeout_s: float = Field(default=900.0, gt=0)

    @model_validator(mode="after")
    def _positive(self) -> LoadSpec:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError("load.concurrency needs values >= 1")
        return self

    def requests_for(self, concurrency: int) -> int:
        n = max(self.min_requests, math.ceil(self.waves * concurrency))
        return min(n, self.max_requests) if self.max_requests else n


class CriteriaSpec(_Strict):
    tolerance: float = Field(default=0.10, ge=0)
    saturation_fraction: float = Field(default=SATURATION_FRACTION, gt=0, le=1)


class OutputSpec(_Strict):
    dir: Path = Path("loadtest-results/kv-heads")
    log_dir: Path | None = None  # raw gateway logs; default: <dir>/logs
    keep_itl: bool = False  # per-request inter-token gaps in the JSON (large)


class KvHeadsSpec(_Strict):
    kind: Literal["kv-heads"] = "kv-heads"  # tells this spec from a `loadtest run` one
    variants: list[VariantSpec] = Field(default_factory=list)
    targets: list[TargetSpec] = Field(default_factory=list)
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec(blocks_of_largest=4))
    engine: EngineSpec = Field(default_factory=EngineSpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    load: LoadSpec = Field(default_factory=LoadSpec)
    criteria: CriteriaSpec = Field(default_factory=CriteriaSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @property
    def mode(self) -> Literal["managed", "targets"]:
        return "targets" if self.targets else "managed"



def load_spec(path: Path | None) -> KvHeadsSpec:
    if path is None:
        return KvHeadsSpec()
    path = resolve_config_path(path)
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the kv-heads spec must be a YAML mapping")
    return KvHeadsSpec.model_validate(data)


def select_variants(variants: list, csv: str) -> list:
    """The variants a comma-separated list of names picks, in spec order; unknown names fail."""
    names = [n.strip() for n in csv.split(",") if n.strip()]
    unknown = set(names) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; the spec has {[v.name for v in variants]}")
    return [v for v in variants if v.name in names]


def parse_targets(text: str) -> list[TargetSpec]:
    """``name=url[,name=url...]``; a url may end in ``#model`` to name the served model."""
    targets = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ValueError(f"a target must look like name=http://host:port, got {item!r}")
        url, _, model = url.partition("#")
        targets.append(TargetSpec(name=name.strip(), base_url=url.strip(), model=model.strip() or None))
    return targets

