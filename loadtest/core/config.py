"""Run configuration: built-in defaults < YAML file (``--config``) < command-line flags.

A YAML spec has the same sections as :class:`RunConfig` (``target``, ``workload``,
``load``, ``slo``, ``output``); see ``configs/loadtest/default.yaml``. The API key is
never part of the configuration, so it never lands in a result file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.resources import configs_dir

Endpoint = Literal["completions", "chat"]
Shape = Literal["concurrency", "rate", "speedup"]
Source = Literal["random", "jsonl", "sessions", "sharegpt", "azure", "mooncake"]
# sources whose unit is a conversation (one or more turns) rather than a single prompt
CONVERSATION_SOURCES = ("sessions", "sharegpt", "azure", "mooncake")
# sources that carry their own arrival times (replayed with load.speedup)
TRACE_SOURCES = ("azure", "mooncake")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenRange(_Strict):
    """An inclusive range of token counts; a fixed count has ``low == high``.

    Accepts ``64``, ``"32:128"`` or ``[32, 128]`` as input.
    """

    low: int = Field(ge=0)
    high: int = Field(ge=0)

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("a token count must be an integer, not a boolean")
        if isinstance(value, int):
            return {"low": value, "high": value}
        if isinstance(value, str):
            parts = value.split(":")
            if len(parts) == 1:
                return {"low": int(parts[0]), "high": int(parts[0])}
            if len(parts) == 2:
                return {"low": int(parts[0]), "high": int(parts[1])}
            raise ValueError(f"token range must look like 64 or 32:128, got {value!r}")
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return {"low": value[0], "high": value[1]}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> TokenRange:
        if self.low > self.high:
            raise ValueError(f"token range low {self.low} > high {self.high}")
        return self

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


class Target(_Strict):
    """The server under test."""

    base_url: str | None = Field(default=None, description="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    model: str | None = Field(default=None, description="served model name sent in every request")
    endpoint: Endpoint = Field(default="completions", description="API to call (completions is what vLLM bench uses)")
    stream: bool = True
    metrics_url: str | None = Field(default=None, description="Prometheus endpoint (default: BASE_URL root + /metrics)")
    scrape: bool = True
    scrape_interval_s: float = Field(default=0.5, gt=0, description="seconds between scrapes during a step")
    request_timeout_s: float = Field(default=600.0, gt=0, description="seconds a request may take in total")
    # after the run, read each request's figures from GET /v1/requests/{id}/metrics
    request_metrics: bool = True


class Sessions(_Strict):
    """Synthetic multi-turn conversations (``workload.source: sessions``).

    Each session has a number of turns drawn from ``turns``; every turn sends the whole
    history (optional shared system prompt, earlier user messages, the answers the server
    returned) plus a new user message of ``user_tokens`` tokens and asks for an answer of
    ``workload.output_tokens`` tokens. Before every turn but the first the session waits
    a think time: ``think_time_s`` fixed, or exponential with that mean.
    """

    turns: TokenRange = Field(default=TokenRange(low=4, high=4), description="turns per session, fixed N or a range A:B")
    user_tokens: TokenRange = Field(default=TokenRange(low=64, high=64),
                                    description="tokens of each user message, fixed N or a range A:B")
    system_prompt_tokens: int = Field(default=0, ge=0, description="tokens of the system prompt every session shares")
    think_time_s: float = Field(default=0.0, ge=0, description="seconds between an answer and the next turn")
    think_time: Literal["fixed", "exponential"] = Field(default="fixed", description="think time distribution")


class Workload(_Strict):
    """What each request asks for (or, for the conversation sources, each session)."""

    source: Source = Field(default="random", json_schema_extra={"flag": False})  # set by its own flags
    input_tokens: TokenRange = Field(default=TokenRange(low=128, high=128),
                                     description="prompt tokens, fixed N or a range A:B")
    output_tokens: TokenRange = Field(default=TokenRange(low=64, high=64),
                                      description="output tokens (max_tokens), fixed N or a range A:B")
    shared_prefix_tokens: int = Field(default=0, ge=0, description="tokens every prompt shares (prefix caching)")
    jsonl: Path | None = Field(default=None, json_schema_extra={"flag": False})  # --prompts-jsonl
    tokenizer: Path | None = Field(default=None, description="local HF tokenizer folder (needed for random prompts)")
    ignore_eos: bool = True
    extra_body: dict[str, Any] = Field(default_factory=dict)
    sessions: Sessions = Field(default_factory=Sessions)
    # ShareGPT JSON, Azure trace CSV or Mooncake JSONL (docs/loadtest.md, "Datasets and traces")
    dataset: Path | None = Field(default=None, json_schema_extra={"flag": False})  # --sharegpt, --azure-trace, ...
    # ShareGPT: answer lengths from the dataset's own answers (tokens, or words without a tokenizer)
    dataset_output_tokens: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Workload:
        if self.source == "jsonl" and self.jsonl is None:
            raise ValueError("workload.source 'jsonl' needs workload.jsonl (--prompts-jsonl)")
        if self.source in ("sharegpt", "azure", "mooncake") and self.dataset is None:
            raise ValueError(f"workload.source {self.source!r} needs workload.dataset (--dataset)")
        if self.source == "random" and self.shared_prefix_tokens >= max(self.input_tokens.low, 1):
            raise ValueError("shared_prefix_tokens must be smaller than the input length")
        return self


class Load(_Strict):
    """How requests are sent and when a step stops.

    Exactly one of ``concurrency`` (closed loop), ``rate`` (open loop, requests/s) and
    ``speedup`` (a trace's own arrival times divided by the factor) is non-empty; each list
    element is one step of a sweep. Each step is bounded by ``num_requests`` and/or
    ``duration_s`` (whichever comes first). With a conversation source, concurrency and
    rate count sessions (sessions in flight, session arrivals/s) and ``num_requests``
    counts sessions.
    """

    concurrency: list[int] = Field(default_factory=list)
    rate: list[float] = Field(default_factory=list)
    speedup: list[float] = Field(default_factory=list)
    arrival: Literal["poisson", "constant"] = Field(default="poisson", description="open-loop arrivals")
    burstiness: float = Field(default=1.0, gt=0, description="gamma shape k: 1 Poisson, <1 burstier")
    max_concurrency: int | None = Field(default=None, ge=1, description="cap on requests (sessions) in flight at a rate")
    num_requests: int | None = Field(default=None, ge=1, description="requests (sessions) per step (64 unless --duration is given)")
    duration_s: float | None = Field(default=None, gt=0, description="seconds per step; alone, it replaces --num-requests")
    warmup_requests: int = Field(default=0, ge=0, description="warm-up requests before the first step, excluded")
    ramp_up_s: float = Field(default=0.0, ge=0, description="seconds of linear ramp-up at the start of each step")
    seed: int = Field(default=0, description="seed of prompts and arrivals")
    pool_size: int = Field(default=256, ge=1, description="prompts per step when only --duration bounds it")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Concurrency 16 when no shape is given; 64 requests when no bound is given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if not data.get("concurrency") and not data.get("rate") and not data.get("speedup"):
            data["concurrency"] = [16]
        if "num_requests" not in data and data.get("duration_s") is None:
            data["num_requests"] = 64
        return data

    @model_validator(mode="after")
    def _one_shape(self) -> Load:
        if sum(map(bool, (self.concurrency, self.rate, self.speedup))) != 1:
            raise ValueError("set exactly one of load.concurrency, load.rate and load.speedup")
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in (*self.rate, *self.speedup)):
            raise ValueError("concurrencies must be >= 1, rates and speed-ups > 0")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("bound every step by num_requests and/or duration_s")
        return self

    @property
    def shape(self) -> Shape:
        return "rate" if self.rate else "speedup" if self.speedup else "concurrency"

    @property
    def steps(self) -> list[float]:
        """The swept values, in order: concurrencies, rates or speed-ups."""
        return [float(v) for v in (self.rate or self.speedup or self.concurrency)]

    @property
    def connection_limit(self) -> int:
        """Connections the client may open: the largest concurrency, 0 = unlimited."""
        if self.concurrency:
            return max(self.concurrency)
        return self.max_concurrency or 0


class Slo(_Strict):
    """Service-level objectives for goodput, in milliseconds (like vLLM's ``--goodput``)."""

    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    e2el_ms: float | None = Field(default=None, gt=0)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


class Output(_Strict):
    dir: Path | None = Field(default=None, description="default: loadtest-results/<time>-<label>")
    label: str | None = Field(default=None, description="name of this run in reports")
    plots: bool = True
    progress: bool = True


class RunConfig(_Strict):
    target: Target = Field(default_factory=Target)
    workload: Workload = Field(default_factory=Workload)
    load: Load = Field(default_factory=Load)
    slo: Slo = Field(default_factory=Slo)
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _shape_fits_source(self) -> RunConfig:
        trace = self.workload.source in TRACE_SOURCES
        if trace != (self.load.shape == "speedup"):
            raise ValueError("a trace (azure, mooncake) is replayed with load.speedup (--speedup), and only a trace")
        if self.workload.source in CONVERSATION_SOURCES and self.target.endpoint != "chat" and not trace:
            raise ValueError(f"workload.source {self.workload.source!r} sends message histories: use the chat endpoint")
        return self


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)?\s*$")
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, None: 1.0}


def parse_slo(text: str) -> tuple[str, float]:
    """Parse ``ttft=500ms``, ``e2el=2s`` or vLLM's ``tpot:50`` (bare numbers are ms)."""
    key, sep, value = text.replace(":", "=", 1).partition("=")
    key = key.strip().lower()
    if not sep or key not in ("ttft", "tpot", "e2el"):
        raise ValueError(f"SLO must look like ttft=500ms, tpot=50ms or e2el=2s, got {text!r}")
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"cannot read a duration from {value!r} (use e.g. 500ms or 2s)")
    return f"{key}_ms", float(match.group(1)) * _UNIT_MS[match.group(2)]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override``, merging nested dicts key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config_path(path: Path | str) -> Path:
    """A spec path as given when it exists; else the shipped one of that name: ``configs/...``
    or a bare file name of ``configs/loadtest/`` from the project's configs folder
    (``service.resources``: a checkout's or the installed wheel's)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    parts = path.parts
    shipped = configs_dir().joinpath(*parts[1:]) if parts[:1] == ("configs",) else configs_dir() / "loadtest" / path
    return shipped if shipped.is_file() else path


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any, see :func:`resolve_config_path`), then ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = yaml.safe_load(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a load-test spec must be a YAML mapping")
        data = loaded
    return RunConfig.model_validate(deep_merge(data, overrides or {}))
