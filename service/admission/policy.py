"""The admission policy: budget, queue bounds and the per-tenant weights and priorities,
parsed from the gateway settings (``GATEWAY_TENANT_WEIGHTS=name=weight,...``,
``GATEWAY_TENANT_PRIORITIES=name=priority,...``). Pure: no asyncio, no vLLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


def parse_tenant_map(value: Any, what: str, convert: Callable[[str], Any]) -> dict[str, Any]:
    """``"a=2,b=1"`` (or a mapping) -> {"a": 2, "b": 1}; ValueError naming the bad entry."""
    if isinstance(value, dict):
        items = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, str):
        items = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            name, sep, raw = entry.partition("=")
            if not sep or not name.strip() or not raw.strip():
                raise ValueError(f"{what}: {entry!r} is not name=value")
            items.append((name.strip(), raw.strip()))
    else:
        raise ValueError(f"{what}: expected 'name=value,...', not {value!r}")
    out: dict[str, Any] = {}
    for name, raw in items:
        if name in out:
            raise ValueError(f"{what}: tenant {name!r} is given twice")
        try:
            out[name] = convert(raw)
        except ValueError:
            raise ValueError(f"{what}: {name}={raw!r} is not a valid value") from None
    return out


def positive_weight(raw: str) -> float:
    w = float(raw)
    if not w > 0 or w == float("inf"):
        raise ValueError(raw)
    return w


def check_tenants(mapping: dict[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"{what}: unknown tenant(s) {', '.join(unknown)}; the tenants are the API key names "
                         f"({', '.join(sorted(known))})")


@dataclass(frozen=True)
class Policy:
    kv_fraction: float = 0.95  # of the usable KV blocks the admitted requests may reserve
    deadline_seconds: float = 30.0  # longest wait in the queue before 429
    max_queue: int = 1024  # requests queued at once (all tenants); 429 past it
    weights: dict[str, float] = field(default_factory=dict)  # tenant -> weight (default 1)
    priorities: dict[str, int] = field(default_factory=dict)  # tenant -> priority (default 0, higher first)

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def priority(self, tenant: str) -> int:
        return self.priorities.get(tenant, 0)

    @classmethod
    def from_settings(cls, s: Any) -> "Policy":
        return cls(kv_fraction=s.admission_kv_fraction, deadline_seconds=s.admission_deadline_seconds,
                   max_queue=s.admission_max_queue, weights=dict(s.tenant_weights),
                   priorities=dict(s.tenant_priorities))
