"""Which hardware the roofline predicts on: a setting, a GPU by the name its driver reports,
or this CPU measured once and cached. No vLLM import (service/telemetry/hardware.py asks
vLLM which device the engine runs on and calls this).

- ``KV_GATEWAY_HARDWARE`` (the override): a key of ``roofline.GPUS`` or a name NVML
  reports (``H100-SXM``, ``NVIDIA H100 80GB HBM3``), the path of a hwprobe JSON
  (``python -m loadtest hwprobe``), or ``none`` (no prediction, no probe).
- A GPU: the published figures of ``roofline.GPUS`` by its NVML name; an unknown name gets
  no prediction (never a guessed figure).
- The CPU: ``hwprobe.quick_probe`` with the engine's thread count, cached as JSON in
  ``$KV_GATEWAY_CACHE_DIR`` (default ``$XDG_CACHE_HOME/kv-gateway``, else
  ``~/.cache/kv-gateway``), one file per CPU model, core count and thread count. Delete the
  file to measure again (a probe taken while the machine was busy stays low).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.kv import hwprobe, roofline

log = logging.getLogger(__name__)

HARDWARE_ENV = "KV_GATEWAY_HARDWARE"
CACHE_ENV = "KV_GATEWAY_CACHE_DIR"
OFF = "none"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Choice:
    """The roofline's hardware (None: no prediction), how it was chosen and a detail to log."""

    hardware: roofline.Hardware | None
    origin: str  # override, datasheet, probe, probe-cache, off, unknown
    detail: str

    def describe(self) -> str:
        hw = self.hardware
        if hw is None:
            return f"no decode-step prediction ({self.origin}): {self.detail}"
        flops = "no compute peak" if hw.peak_flops is None else f"{hw.peak_flops / 1e9:,.1f} GFLOP/s"
        return (f"{hw.name}: {hw.bandwidth / 1e9:,.2f} GB/s, {flops} ({self.origin}: {self.detail}; "
                f"source: {hw.source})")


def _normalise(name: str) -> str:
    name = " ".join(name.split()).lower()
    return name.removeprefix("nvidia ")


def gpu_by_name(name: str) -> roofline.Hardware | None:
    """Published figures for a table key or a name as NVML reports it; None when unknown."""
    wanted = _normalise(name)
    for key, hw in roofline.GPUS.items():
        if _normalise(key) == wanted:
            return hw
    for nvml, key in roofline.NVML_NAMES.items():
        if _normalise(nvml) == wanted:
            return roofline.GPUS[key]
    return None


def hardware_file(path: Path) -> roofline.Hardware:
    """The ``hardware`` of a hwprobe JSON (or a bare hardware object)."""
    data = json.loads(path.read_text())
    return roofline.hardware_from_dict(data.get("hardware", data))


def resolve(value: str) -> roofline.Hardware:
    """A GPU name or a hwprobe JSON path (``kv-plan --hardware`` and the override)."""
    hw = gpu_by_name(value)
    if hw is not None:
        return hw
    if Path(value).is_file():
        return hardware_file(Path(value))
    raise ValueError(f"unknown hardware {value!r}: neither a GPU of {sorted(roofline.GPUS)} "
                     "(or its NVML name) nor a hwprobe JSON file")


def from_setting(value: str | None) -> Choice | None:
    """The override's choice, or None when it is unset (detect the hardware)."""
    value = (value or "").strip()
    if not value:
        return None
    if value.lower() == OFF:
        return Choice(None, "off", f"{HARDWARE_ENV}={OFF}")
    try:
        return Choice(resolve(value), "override", f"{HARDWARE_ENV}={value}")
    except ValueError as e:
        raise ValueError(f"{HARDWARE_ENV}: {e}") from None


# ---- this CPU, measured once
def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kv-gateway"


def cpu_model_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cache_key(threads: int) -> dict[str, Any]:
    return {"cpu": cpu_model_name(), "cores": os.cpu_count() or 0, "threads": threads}


def cache_path(key: dict[str, Any]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{key['cpu']}-{key['cores']}cores-{key['threads']}threads".lower())
    return cache_dir() / f"hardware-{slug.strip('-')}.json"


def _read_cache(path: Path, key: dict[str, Any]) -> roofline.Hardware | None:
    try:
        data = json.loads(path.read_text())
        if data.get("version") != CACHE_VERSION or data.get("key") != key:
            return None
        return roofline.hardware_from_dict(data["probe"]["hardware"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("kv-gateway: ignoring the unreadable hardware cache %s: %s", path, e)
        return None


def _write_cache(path: Path, key: dict[str, Any], result: dict[str, Any]) -> str:
    """Write atomically; a cache that cannot be written only costs a probe next start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "key": key, "created_at": time.time(),
                                   "probe": result}, indent=1) + "\n")
        os.replace(tmp, path)
        return f"cached in {path}"
    except OSError as e:
        log.warning("kv-gateway: could not cache the hardware probe in %s: %s", path, e)
        return "not cached"


def cpu_hardware(threads: int, probe: Callable[..., dict[str, Any]] | None = None) -> Choice:
    """This CPU's figures: from the cache when it holds them for this key, else probed now
    (``probe``: ``hwprobe.quick_probe`` unless given)."""
    key = cache_key(threads)
    path = cache_path(key)
    hw = _read_cache(path, key)
    if hw is not None:
        return Choice(hw, "probe-cache", f"measured at an earlier start, read from {path}")
    result = (probe or hwprobe.quick_probe)(threads=threads)
    hw = roofline.hardware_from_dict(result["hardware"])
    where = _write_cache(path, key, result)
    return Choice(hw, "probe", f"measured now in {result.get('probe_seconds', 0):.2f} s, {where}")
