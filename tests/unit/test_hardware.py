"""Which hardware the live roofline predicts on: the GPU table by NVML name, unknown GPUs,
the override (``none`` included), the CPU probe's cache, and what the plugin exports.
No figure of a real probe is asserted (benchmarks are not tests)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.kv import hardware as kvhw
from service.kv import hwprobe, roofline
from service.telemetry import hardware
from service.telemetry.ledger import EngineState, Ledger
from service.telemetry.metrics import EngineMetrics
from service.telemetry.plugin import KVAccountingLogger
from tests.unit.fake_vllm import fake_vllm_config
from tests.unit.test_live import tiny_checkpoint

TB = 1e12


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test its own probe cache and no override."""
    monkeypatch.setenv(kvhw.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(kvhw.HARDWARE_ENV, raising=False)
    return tmp_path / "cache"


class Probe:
    """Counts probes and returns fixed figures."""

    def __init__(self, bandwidth: float = 2e10, flops: float = 7e10):
        self.calls: list[int] = []
        self.bandwidth, self.flops = bandwidth, flops

    def __call__(self, threads: int) -> dict:
        self.calls.append(threads)
        mm = {"best": self.flops, "size": 8, "how": "fake"}
        return {"kind": "hwprobe", "probe_seconds": 0.5,
                "hardware": hwprobe.hardware_entry(f"this CPU ({threads})", self.bandwidth, mm, trials=4)}


# ---- GPUs
@pytest.mark.parametrize("nvml_name, key, tb_s, dense_tflops", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM", 3.35, 989.5),
    ("NVIDIA H100 PCIe", "H100-PCIe", 2.0, 756.5),
    ("NVIDIA H100 NVL", "H100-NVL", 3.9, 835.5),
    ("NVIDIA H200", "H200", 4.8, 989.5),
    ("NVIDIA H200 NVL", "H200-NVL", 4.8, 835.5),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB", 2.039, 312),
    ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB", 1.555, 312),
    ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB", 1.935, 312),
    ("NVIDIA A100-PCIE-40GB", "A100-PCIe-40GB", 1.555, 312),
    ("NVIDIA L40S", "L40S", 0.864, 362.05),
    ("NVIDIA L4", "L4", 0.3, 121),
    ("NVIDIA A10", "A10", 0.6, 125),
    ("NVIDIA GeForce RTX 4090", "RTX-4090", 1.008, 165.2),
    ("A100-SXM4-80GB", "A100-SXM4-80GB", 2.039, 312),  # older drivers: no "NVIDIA " prefix
    ("h100-sxm", "H100-SXM", 3.35, 989.5),  # the table's own key, any case
])
def test_gpu_by_the_name_nvml_reports(nvml_name, key, tb_s, dense_tflops):
    hw = kvhw.gpu_by_name(nvml_name)
    assert hw is roofline.GPUS[key]
    assert hw.bandwidth == pytest.approx(tb_s * TB) and hw.peak_flops == pytest.approx(dense_tflops * TB)


def test_every_gpu_names_its_published_source():
    for hw in roofline.GPUS.values():
        assert "NVIDIA" in hw.source and ("datasheet" in hw.source or "whitepaper" in hw.source), hw
        assert "dense" in hw.source and hw.memory_bytes
    assert set(roofline.NVML_NAMES.values()) == set(roofline.GPUS)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA H800", "Tesla T4", "NVIDIA GH200 480GB", "NVIDIA H100", ""])
def test_an_unknown_gpu_has_no_figures(name):
    assert kvhw.gpu_by_name(name) is None


class NvmlCudaPlatform:
    """Stands for vLLM's NVML-backed CUDA platform (matched by class name)."""

    def __init__(self, name: str):
        self.name = name

    def is_cpu(self) -> bool:
        return False

    def is_cuda(self) -> bool:
        return True

    def get_device_name(self, device_id: int = 0) -> str:
        return self.name


def test_detect_a_gpu_by_its_nvml_name():
    choice = hardware.detect(None, NvmlCudaPlatform("NVIDIA H100 80GB HBM3"))
    assert choice.hardware is roofline.GPUS["H100-SXM"] and choice.origin == "datasheet"


def test_an_unknown_gpu_warns_and_predicts_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="service.telemetry.hardware"):
        choice = hardware.detect(None, NvmlCudaPlatform("NVIDIA A10G"))
    assert choice.hardware is None and choice.origin == "unknown"
    assert "NVIDIA A10G" in caplog.text and kvhw.HARDWARE_ENV in caplog.text


def test_without_nvml_the_gpu_is_not_asked_for_its_name():
    class NonNvmlCudaPlatform:
        is_cpu, is_cuda = NvmlCudaPlatform.is_cpu, NvmlCudaPlatform.is_cuda

        def get_device_name(self, device_id: int = 0) -> str:
            raise AssertionError("would initialise CUDA in the API server")

    assert hardware.detect(None, NonNvmlCudaPlatform()).hardware is None


# ---- the override
def test_the_override_wins_over_detection(monkeypatch, tmp_path):
    class NoPlatform:
        def __getattr__(self, name):
            raise AssertionError("detection must not run under an override")

    monkeypatch.setenv(kvhw.HARDWARE_ENV, "NVIDIA L4")
    assert hardware.detect(None, NoPlatform()).hardware is roofline.GPUS["L4"]
    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"hardware": {"name": "probed", "bandwidth": 1e10, "peak_flops": None,
                                             "memory_bytes": None, "source": "measured"}}))
    monkeypatch.setenv(kvhw.HARDWARE_ENV, str(path))
    choice = hardware.detect(None, NoPlatform())
    assert choice.hardware.name == "probed" and choice.origin == "override"
    monkeypatch.setenv(kvhw.HARDWARE_ENV, "none")
    choice = hardware.detect(None, NoPlatform())
    assert choice.hardware is None and choice.origin == "off"
    monkeypatch.setenv(kvhw.HARDWARE_ENV, "NVIDIA A10G")
    with pytest.raises(ValueError, match=kvhw.HARDWARE_ENV):
        hardware.detect(None, NoPlatform())


# ---- this CPU, probed once and cached
def test_the_second_start_reads_the_cache_and_does_not_probe(cache):
    probe = Probe()
    first = kvhw.cpu_hardware(1, probe)
    assert probe.calls == [1] and first.origin == "probe"
    assert first.hardware.bandwidth == 2e10 and first.hardware.peak_flops == 7e10
    (path,) = cache.glob("hardware-*.json")
    assert "1threads" in path.name
    second = kvhw.cpu_hardware(1, probe)
    assert probe.calls == [1] and second.origin == "probe-cache" and str(path) in second.detail
    assert second.hardware == first.hardware
    kvhw.cpu_hardware(2, probe)  # another thread count is another key
    assert probe.calls == [1, 2] and len(list(cache.glob("hardware-*.json"))) == 2


def test_a_broken_or_foreign_cache_is_probed_again(cache):
    probe = Probe()
    kvhw.cpu_hardware(1, probe)
    (path,) = cache.glob("hardware-*.json")
    path.write_text("{not json")
    assert kvhw.cpu_hardware(1, probe).origin == "probe" and len(probe.calls) == 2
    data = json.loads(path.read_text())
    data["key"]["cpu"] = "another CPU"
    path.write_text(json.dumps(data))
    assert kvhw.cpu_hardware(1, probe).origin == "probe" and len(probe.calls) == 3


def test_the_cache_lives_in_the_users_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(kvhw.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kvhw.cache_dir() == tmp_path / "xdg" / "kv-gateway"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kvhw.cache_dir() == tmp_path / "home" / ".cache" / "kv-gateway"


class CpuPlatform:
    def is_cpu(self) -> bool:
        return True


def test_detect_on_the_cpu_probes_once_and_logs_where_from(monkeypatch, caplog):
    probe = Probe()
    monkeypatch.setattr(hwprobe, "quick_probe", probe)
    with caplog.at_level(logging.INFO, logger="service.telemetry.hardware"):
        first = hardware.detect(None, CpuPlatform())
        second = hardware.detect(None, CpuPlatform())
    assert len(probe.calls) == 1 and (first.origin, second.origin) == ("probe", "probe-cache")
    lines = [r.getMessage() for r in caplog.records if "roofline hardware" in r.getMessage()]
    assert len(lines) == 2 and "20.00 GB/s" in lines[0] and "70.0 GFLOP/s" in lines[0]
    assert "measured now" in lines[0] and "read from" in lines[1]


def test_a_failing_probe_costs_the_prediction_not_the_engine(monkeypatch):
    def broken(threads: int) -> dict:
        raise MemoryError("no room for the arrays")

    monkeypatch.setattr(hwprobe, "quick_probe", broken)
    choice = hardware.detect(None, CpuPlatform())
    assert choice.hardware is None and "no room" in choice.detail


def test_quick_probe_feeds_the_roofline():
    result = hwprobe.quick_probe(threads=1, n=hwprobe.CHUNK * 4, trials=2, matmul_size=64)
    hw = roofline.hardware_from_dict(result["hardware"])
    assert hw.bandwidth == result["stream"]["kernels"]["triad"]["best"] and hw.peak_flops == result["matmul"]["best"]
    assert result["probe_seconds"] > 0 and "STREAM triad" in hw.source


def test_the_matmul_probe_restores_torchs_threads():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    hwprobe.matmul_flops(32, repeats=1, threads=before + 1)
    assert torch.get_num_threads() == before


# ---- what the plugin exports
def test_the_plugin_exports_which_hardware_the_roofline_uses(monkeypatch, tmp_path):
    tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setenv(kvhw.HARDWARE_ENV, "NVIDIA H100 80GB HBM3")
    reg = CollectorRegistry()
    plugin = KVAccountingLogger(fake_vllm_config(model=str(tmp_path / "ckpt")), 0, metrics=EngineMetrics(reg),
                                state=EngineState(), ledger=Ledger())
    plugin.log_engine_initialized()
    hw = roofline.GPUS["H100-SXM"]
    assert reg.get_sample_value("gateway_roofline_hardware_info", {
        "model": "SmolLM2-135M-Instruct", "kv_heads": "3", "name": "H100-SXM", "source": hw.source, "origin": "override",
        "bandwidth_bytes_per_second": "3.35e+12", "flops": "9.895e+14"}) == 1


def test_no_hardware_no_info_metric(monkeypatch):
    monkeypatch.setenv(kvhw.HARDWARE_ENV, "none")
    reg = CollectorRegistry()
    plugin = KVAccountingLogger(fake_vllm_config(), 0, metrics=EngineMetrics(reg), state=EngineState(),
                                ledger=Ledger())
    plugin.log_engine_initialized()
    assert not [s for m in reg.collect() if m.name == "gateway_roofline_hardware" for s in m.samples]


# ---- the vLLM 0.32 seams detection reads (the CUDA module cannot be imported on the CPU build)
def _vllm_source(relative: str) -> str:
    import importlib.util

    (root,) = importlib.util.find_spec("vllm").submodule_search_locations
    return (Path(root) / relative).read_text()


def test_vllm_reads_the_gpu_name_through_nvml_without_cuda():
    src = _vllm_source("platforms/cuda.py")
    nvml = src[src.index("class NvmlCudaPlatform"):src.index("class NonNvmlCudaPlatform")]
    body = nvml[nvml.index("def get_device_name"):]
    assert "_get_physical_device_name" in body[:400] and "pynvml.nvmlDeviceGetName(handle)" in nvml
    non_nvml = src[src.index("class NonNvmlCudaPlatform"):]
    assert "torch.cuda.get_device_name" in non_nvml  # why detection skips that platform


def test_vllm_cpu_worker_threads_come_from_its_omp_manager():
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    src = _vllm_source("utils/ompmultiprocessing.py")
    assert 'envs_dict["OMP_NUM_THREADS"] = str(len(cpu_list))' in src
    assert "self.cpu_lists" in src and "self.skip_setup" in src
    assert callable(OMPProcessManager)
    assert hardware.engine_cpu_threads(None) >= 1  # not a VllmConfig: vLLM's serving default


@pytest.mark.parametrize("bind, omp, threads", [("0,1", None, 2), ("0", "3", 1), ("nobind", "3", 3), ("nobind", None, 1)])
def test_the_probe_uses_as_many_threads_as_vllm_gives_a_cpu_worker(monkeypatch, bind, omp, threads):
    from vllm.config import VllmConfig

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert hardware.engine_cpu_threads(VllmConfig()) == threads
