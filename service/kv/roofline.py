"""Roofline model of one decode step: pure arithmetic, no engine, no I/O.

A decode step of a batch of B sequences with contexts c_1..c_B (tokens already in the KV
cache) produces one token per sequence. It must at least

- read every weight once:            W = parameters x bytes per parameter
- read each sequence's K and V once: K = kv_bytes_per_token x sum_i c_i
- do its FLOPs:                      F = B x 2 x matmul parameters
                                         + 4 x L x Hq x d x sum_i c_i

so it takes at least  t = max((W + K) / memory bandwidth, F / peak compute),
and that is the predicted time per output token (TPOT) of every sequence in the batch.

Conventions (the unit tests reproduce a hand-worked example with them):

- bytes are decimal: GB = 1e9, TB/s = 1e12 bytes/s (as in the GPU datasheets);
- W counts every parameter, embeddings and an untied LM head included (the published
  parameter count x dtype bytes). A step reads only B rows of the input embedding, so W
  slightly overstates the weights read; the datasheet-style convention is kept because it
  is the one the published figures use;
- matmul parameters = all parameters less the input embedding table when it is not tied
  to the LM head (a lookup does no FLOPs) and less learned position embeddings;
- attention FLOPs: QK^T and AV, 2 x c x d each per query head per layer (geometry.py);
  softmax, norms and activations are not counted;
- a KV-head variant (MHA / GQA / MQA sibling) keeps the published model's weight bytes
  unless ``resized_kv_weights`` is used: only its KV cache changes. With the K/V
  projections resized too, W changes by 2 x L x hidden x d x (Hkv' - Hkv) x dtype bytes;
- tensor parallelism over N GPUs: each GPU reads W / N and its KV shard
  (geometry.sharded) and does F / N, in parallel; communication is not modelled;
- nothing else: no kernel launch overheads, no prefill interleaved with the step, no
  sampling. The result is a floor, a prediction on paper, not a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.kv.geometry import KVGeometry

GB = 1e9
TB = 1e12


@dataclass(frozen=True)
class Hardware:
    """Memory bandwidth (bytes/s), peak dense compute (FLOP/s), memory size (bytes), source."""

    name: str
    bandwidth: float
    peak_flops: float | None
    memory_bytes: int | None
    source: str

    def __post_init__(self) -> None:
        if self.bandwidth <= 0:
            raise ValueError("memory bandwidth must be > 0")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError("peak compute must be > 0")


# Published figures, per GPU: memory bandwidth and the dense BF16 Tensor Core peak. NVIDIA's
# datasheets print the BF16 peak "with sparsity" (marked *); dense is half of it. Each entry
# names its source. Memory sizes as the datasheets print them, read as GiB, the way vLLM
# sizes its pool from the memory the driver reports (an H100 80GB reports 81,559 MiB).
# Not here on purpose: GPUs without an NVIDIA datasheet of their own (the A10G of AWS's
# G5 instances has none), so detection warns for them instead of guessing a figure.
def _gpu(name: str, tb_s: float, bf16_sparse_tflops: float, gib: int, source: str, column: str,
         dense_tflops: float | None = None) -> Hardware:
    """``dense_tflops`` when the datasheet prints the dense figure itself (not exactly half)."""
    dense = dense_tflops or bf16_sparse_tflops / 2
    how = f"{dense:,} dense as printed" if dense_tflops else f"{dense:,} dense"
    return Hardware(name, tb_s * TB, dense * TB, gib * 2**30,
                    f"{source} ({column}): {tb_s * 1000:,.0f} GB/s, BF16 Tensor Core "
                    f"{bf16_sparse_tflops:,} TFLOPS with sparsity, {how}")


_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet"
GPUS: dict[str, Hardware] = {g.name: g for g in (
    _gpu("H100-SXM", 3.35, 1979, 80, _H100, "H100 SXM, 80 GB HBM3"),
    _gpu("H100-PCIe", 2.0, 1513, 80, _H100, "H100 PCIe, 80 GB HBM2e"),
    _gpu("H100-NVL", 3.9, 1671, 94, _H100, "H100 NVL, 94 GB HBM3"),
    _gpu("H200", 4.8, 1979, 141, _H200, "H200 SXM, 141 GB HBM3e"),
    _gpu("H200-NVL", 4.8, 1671, 141, _H200, "H200 NVL, 141 GB HBM3e"),
    _gpu("A100-SXM4-80GB", 2.039, 624, 80, _A100, "A100 80GB SXM, HBM2e"),
    _gpu("A100-SXM4-40GB", 1.555, 624, 40, _A100, "A100 40GB SXM, HBM2"),
    _gpu("A100-PCIe-80GB", 1.935, 624, 80, _A100, "A100 80GB PCIe, HBM2e"),
    _gpu("A100-PCIe-40GB", 1.555, 624, 40, _A100, "A100 40GB PCIe, HBM2"),
    _gpu("L40S", 0.864, 733, 48, "NVIDIA L40S GPU datasheet", "48 GB GDDR6", dense_tflops=362.05),
    _gpu("L4", 0.3, 242, 24, "NVIDIA L4 Tensor Core GPU datasheet", "24 GB GDDR6"),
    _gpu("A10", 0.6, 250, 24, "NVIDIA A10 Tensor Core GPU datasheet", "24 GB GDDR6"),
    # GeForce: the architecture whitepaper's table, BF16 with FP32 accumulate (what vLLM runs)
    _gpu("RTX-4090", 1.008, 330.4, 24, "NVIDIA Ada GPU Architecture whitepaper",
         "GeForce RTX 4090, 24 GB GDDR6X, BF16 with FP32 accumulate"),
)}

# The names NVML reports (``nvmlDeviceGetName``, what vLLM's ``get_device_name`` returns),
# to the table's keys. Matched whole, case and a leading "NVIDIA " ignored: "NVIDIA A10G"
# is not an A10.
NVML_NAMES: dict[str, str] = {
    "H100 80GB HBM3": "H100-SXM", "H100 PCIe": "H100-PCIe", "H100 NVL": "H100-NVL",
    "H200": "H200", "H200 NVL": "H200-NVL",
    "A100-SXM4-80GB": "A100-SXM4-80GB", "A100-SXM4-40GB": "A100-SXM4-40GB",
    "A100 80GB PCIe": "A100-PCIe-80GB", "A100-PCIE-40GB": "A100-PCIe-40GB",
    "L40S": "L40S", "L4": "L4", "A10": "A10", "GeForce RTX 4090": "RTX-4090",
}


# ---- model arithmetic
def _cfg(config: Mapping[str, Any]) -> dict[str, Any]:
    return dict(config.get("text_config") or config)


def parameter_count(config: Mapping[str, Any]) -> int:
    """The published parameter count (``num_parameters``); refuses to guess without it."""
    c = _cfg(config)
    if not c.get("num_parameters"):
        raise ValueError("the shape has no num_parameters: the weight bytes cannot be computed exactly")
    return int(c["num_parameters"])


def matmul_parameters(config: Mapping[str, Any]) -> int:
    """Parameters that take part in a matmul per token (module docstring)."""
    c = _cfg(config)
    hidden = int(c.get("hidden_size") or c["n_embd"])
    vocab = int(c["vocab_size"])
    params = parameter_count(c)
    tied = bool(c.get("tie_word_embeddings", False))
    positions = int(c.get("n_positions") or 0)  # learned positions (GPT-2); rotary models have none
    return params - (0 if tied else vocab * hidden) - positions * hidden


def weights_bytes(config: Mapping[str, Any], dtype_bytes: int) -> int:
    return parameter_count(config) * dtype_bytes


def resized_kv_weights(config: Mapping[str, Any], geometry: KVGeometry, kv_heads: int, dtype_bytes: int) -> int:
    """Weight bytes of the sibling whose K/V projections have ``kv_heads`` heads."""
    c = _cfg(config)
    hidden = int(c.get("hidden_size") or c["n_embd"])
    delta = 2 * geometry.layers * hidden * geometry.head_size * (kv_heads - geometry.kv_heads)
    return (parameter_count(c) + delta) * dtype_bytes


# ---- one decode step
@dataclass(frozen=True)
class StepCost:
    batch: int
    context_tokens: int  # sum over the batch of each sequence's context
    weight_bytes: float  # per GPU
    kv_bytes: float  # per GPU
    flops: float  # per GPU
    memory_s: float
    compute_s: float | None

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def tpot_s(self) -> float:
        """Predicted time per output token: the larger of the two floors."""
        return max(self.memory_s, self.compute_s or 0.0)

    @property
    def bound(self) -> str:
        return "compute" if (self.compute_s or 0.0) > self.memory_s else "memory"

    def as_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "context_tokens": self.context_tokens, "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "bytes": self.bytes, "flops": self.flops, "memory_s": self.memory_s,
                "compute_s": self.compute_s, "tpot_s": self.tpot_s, "bound": self.bound}


def decode_step(
    geometry: KVGeometry, weight_bytes: int, matmul_params: int, contexts: Sequence[int], hw: Hardware,
    tensor_parallel_size: int = 1,
) -> StepCost:
    """The roofline of one decode step over sequences with these context lengths."""
    if not contexts or any(c < 0 for c in contexts):
        raise ValueError("a decode step needs at least one sequence with a context >= 0")
    tp = tensor_parallel_size
    shard = geometry.sharded(tp)
    total_ctx = sum(contexts)
    batch = len(contexts)
    w = weight_bytes / tp
    kv = shard.kv_bytes_per_token * total_ctx
    flops = (batch * 2 * matmul_params + geometry.attention_flops_per_context_token * total_ctx) / tp
    return StepCost(
        batch=batch, context_tokens=total_ctx, weight_bytes=w, kv_bytes=kv, flops=flops,
        memory_s=(w + kv) / hw.bandwidth,
        compute_s=None if hw.peak_flops is None else flops / hw.peak_flops,
    )


def uniform_step(geometry: KVGeometry, weight_bytes: int, matmul_params: int, batch: int, context: int,
                 hw: Hardware, tensor_parallel_size: int = 1) -> StepCost:
    """A batch of ``batch`` sequences that all have ``context`` tokens of KV."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    return decode_step(geometry, weight_bytes, matmul_params, [context] * batch, hw, tensor_parallel_size)


def crossover_context(geometry: KVGeometry, weight_bytes: int, batch: int, tensor_parallel_size: int = 1) -> float:
    """Context (tokens per sequence) at which the step reads as many KV bytes as weight bytes."""
    shard = geometry.sharded(tensor_parallel_size)
    return weight_bytes / tensor_parallel_size / (batch * shard.kv_bytes_per_token)


def hardware_from_dict(data: dict[str, Any]) -> Hardware:
    """A Hardware from JSON (``python -m loadtest hwprobe`` writes one for this machine)."""
    try:
        return Hardware(name=str(data["name"]), bandwidth=float(data["bandwidth"]),
                        peak_flops=None if data.get("peak_flops") is None else float(data["peak_flops"]),
                        memory_bytes=None if data.get("memory_bytes") is None else int(data["memory_bytes"]),
                        source=str(data.get("source", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a hardware description (name, bandwidth, peak_flops, memory_bytes): {e}") from None
