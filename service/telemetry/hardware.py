"""The roofline's hardware for the engine the stat logger is attached to, chosen once when
vLLM builds the stat loggers (``AsyncLLM.__init__``, after the engine core is up and before
the server serves: the CPU probe delays the start by about a second, never a request).

- ``KV_GATEWAY_HARDWARE`` set: the override (service/kv/hardware.py), ``none`` included.
- vLLM's platform is CUDA: the GPU's name through NVML, which vLLM's ``NvmlCudaPlatform``
  reads without creating a CUDA context in this process (vLLM 0.32,
  ``vllm/platforms/cuda.py``; its ``NonNvmlCudaPlatform``, e.g. on Jetson, would initialise
  CUDA, so there the override is needed). Device 0 of the visible devices; with tensor
  parallelism every rank is assumed to be the same GPU and the figures are per GPU.
- the CPU: the cached probe, with as many threads as vLLM gives each CPU worker
  (``OMPProcessManager``: the cores it binds, one per physical core of the NUMA node less
  the reserved ones; ``OMP_NUM_THREADS`` or 1 when it does not bind).
- any other platform: no prediction.
One log line says what was chosen; ``export`` publishes it as ``gateway_roofline_hardware_info``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from service.kv import hardware as kvhw
from service.kv.hardware import Choice

log = logging.getLogger(__name__)


def detect(vllm_config: Any, platform: Any = None) -> Choice:
    """The hardware of this engine (see the module docstring); logs one line."""
    choice = kvhw.from_setting(os.environ.get(kvhw.HARDWARE_ENV))
    if choice is None:
        if platform is None:
            from vllm.platforms import current_platform as platform
        if platform.is_cpu():
            choice = cpu_choice(vllm_config)
        elif platform.is_cuda():
            choice = gpu_choice(platform)
        else:
            choice = Choice(None, "unknown", f"no published figures for the {platform.device_name!r} platform; "
                            f"set {kvhw.HARDWARE_ENV}")
    (log.info if choice.hardware is not None or choice.origin == "off" else log.warning)(
        "kv-gateway roofline hardware: %s", choice.describe())
    return choice


def cpu_choice(vllm_config: Any) -> Choice:
    try:
        return kvhw.cpu_hardware(engine_cpu_threads(vllm_config))
    except Exception as e:  # a failed probe costs the prediction, never the engine
        log.exception("kv-gateway: the CPU probe failed")
        return Choice(None, "unknown", f"the CPU probe failed ({e}); set {kvhw.HARDWARE_ENV}")


def gpu_choice(platform: Any, device: int = 0) -> Choice:
    if not any(c.__name__ == "NvmlCudaPlatform" for c in type(platform).__mro__):
        return Choice(None, "unknown", "NVML is not available to read the GPU's name without initialising "
                      f"CUDA in the API server; set {kvhw.HARDWARE_ENV}")
    name = str(platform.get_device_name(device))
    hw = kvhw.gpu_by_name(name)
    if hw is None:
        return Choice(None, "unknown", f"no published figures for the GPU {name!r}; set {kvhw.HARDWARE_ENV} "
                      "to a GPU of service.kv.roofline.GPUS or a hwprobe JSON")
    return Choice(hw, "datasheet", f"GPU {name!r}")


def engine_cpu_threads(vllm_config: Any) -> int:
    """Threads of each CPU worker of this engine, as vLLM 0.32 sets them."""
    omp_log = logging.getLogger("vllm.utils.ompmultiprocessing")  # it logs the binding the engine logged
    level = omp_log.level
    omp_log.setLevel(logging.WARNING)
    try:
        from vllm.utils.ompmultiprocessing import OMPProcessManager

        manager = OMPProcessManager(vllm_config)
        if not manager.skip_setup and manager.cpu_lists and manager.cpu_lists[0]:
            return len(manager.cpu_lists[0])
    except Exception as e:  # not a real VllmConfig, or vLLM changed: fall back to its serving default
        log.debug("kv-gateway: CPU worker threads not read from vLLM: %s", e)
    finally:
        omp_log.setLevel(level)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else 1


def export(info: Any, choice: Choice) -> None:
    """Set the info metric (a child of ``EngineMetrics.roofline_hardware``) when there is a hardware."""
    hw = choice.hardware
    if hw is None:
        return
    info.info({"name": hw.name, "source": hw.source, "origin": choice.origin,
               "bandwidth_bytes_per_second": f"{hw.bandwidth:.6g}",
               "flops": "" if hw.peak_flops is None else f"{hw.peak_flops:.6g}"})
