"""The plan (pure): each variant's share of the KV byte budget and its predicted running batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from loadtest.kvheads.spec import BudgetSpec, KvHeadsSpec, _Strict
from service.kv import planner
from service.kv.geometry import blocks_for_tokens, geometry_from_model_dir, kv_tokens_held

ROOT = Path(__file__).resolve().parents[2]


class VariantPlan(_Strict):
    """One variant's share of the budget and the predicted running batch.

    ``num_blocks``: usable blocks (budget // bytes per block, or what a target reports
    minus the reserved blocks); ``engine_blocks``: what the engine is given (+ reserved).
    ``kv_tokens_per_seq``: P + G - 1; ``blocks_per_seq`` at the end of a sequence and
    ``admission_blocks_per_seq`` at its admission (prompt only).
    ``predicted_max_seqs``: the planner's figure (blocks / blocks per sequence);
    ``predicted_running``: its floor, the whole sequences that fit at once.
    """

    name: str
    model: str
    kind: str | None = None
    kv_heads: int | None = None
    query_heads: int | None = None
    layers: int | None = None
    head_size: int | None = None
    dtype_bytes: int | None = None
    block_size: int
    kv_bytes_per_token: int | None = None
    kv_bytes_per_block: int | None = None
    budget_bytes: int | None = None
    num_blocks: int | None = None
    engine_blocks: int | None = None
    reserved_blocks: int = 0
    kv_tokens_per_seq: int
    blocks_per_seq: int
    admission_blocks_per_seq: int
    predicted_max_seqs: float | None = None
    predicted_running: int | None = None

    @property
    def grows_after_admission(self) -> bool:
        return self.blocks_per_seq > self.admission_blocks_per_seq


def kv_tokens_per_sequence(input_tokens: int, output_tokens: int) -> int:
    """KV tokens a finished sequence holds: P + G - 1 (the last sampled token is never fed back)."""
    return kv_tokens_held(input_tokens, output_tokens)


def budget_bytes_for(budget: BudgetSpec, geometries: Iterable[Any]) -> int:
    """The budget in bytes: given, or N blocks of the largest-KV variant."""
    if budget.bytes is not None:
        return budget.bytes
    assert budget.blocks_of_largest is not None
    largest = max(g.kv_bytes_per_block for g in geometries)
    return budget.blocks_of_largest * largest


def plan_variant(
    name: str,
    model: str,
    geometry: Any,
    budget_bytes: int,
    input_tokens: int,
    output_tokens: int,
    max_model_len: int,
    reserved_blocks: int = 1,
) -> VariantPlan:
    """Blocks and predicted running batch of one variant (``service.kv.planner.plan``)."""
    tokens = kv_tokens_per_sequence(input_tokens, output_tokens)
    # budget_bytes is the usable part here; the null block is added to the engine's count below
    row = planner.plan(geometry, budget_bytes, tokens, max_model_len, kv_heads=[geometry.kv_heads],
                       reserved_blocks=0)[0]
    per_seq = blocks_for_tokens(tokens, geometry.block_size)
    return VariantPlan(
        name=name,
        model=model,
        kind=row.kind,
        kv_heads=geometry.kv_heads,
        query_heads=geometry.query_heads,
        layers=geometry.layers,
        head_size=geometry.head_size,
        dtype_bytes=geometry.dtype_bytes,
        block_size=geometry.block_size,
        kv_bytes_per_token=geometry.kv_bytes_per_token,
        kv_bytes_per_block=geometry.kv_bytes_per_block,
        budget_bytes=budget_bytes,
        num_blocks=row.num_blocks,
        engine_blocks=row.num_blocks + reserved_blocks,
        reserved_blocks=reserved_blocks,
        kv_tokens_per_seq=tokens,
        blocks_per_seq=per_seq,
        admission_blocks_per_seq=blocks_for_tokens(input_tokens, geometry.block_size),
        predicted_max_seqs=row.max_seqs,
        predicted_running=row.num_blocks // per_seq,
    )


def plan_variants(spec: KvHeadsSpec, root: Path = ROOT) -> tuple[int, list[VariantPlan]]:
    """(budget bytes, one plan per variant) from the variants' config.json files."""
    geometries = []
    for variant in spec.variants:
        folder = resolve(variant.model, root)
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"variant {variant.name}: no config.json in {folder} "
                "(make it with `python -m service kv-variant --kv-heads N`)"
            )
        geometries.append(
            geometry_from_model_dir(folder, block_size=spec.engine.block_size, dtype=spec.engine.dtype)
        )
    budget = budget_bytes_for(spec.budget, geometries)
    plans = [
        plan_variant(
            v.name, str(v.model), g, budget, spec.workload.input_tokens, spec.workload.output_tokens,
            spec.engine.max_model_len, spec.engine.reserved_blocks,
        )
        for v, g in zip(spec.variants, geometries, strict=True)
    ]  # fmt: skip
    return budget, plans


def check_plan(spec: KvHeadsSpec, plans: Sequence[VariantPlan]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a managed run's plan: limits that would hide or break the effect."""
    errors: list[str] = []
    warnings: list[str] = []
    w, e = spec.workload, spec.engine
    if w.input_tokens + w.output_tokens > e.max_model_len:
        errors.append(f"max_model_len {e.max_model_len} < prompt + output {w.input_tokens + w.output_tokens}")
    for p in plans:
        if not p.num_blocks:
            errors.append(f"{p.name}: the budget holds no block of {p.kv_bytes_per_block:,} bytes")
            continue
        if p.num_blocks * p.block_size < e.max_model_len:
            errors.append(
                f"{p.name}: max_model_len {e.max_model_len} does not fit in its {p.num_blocks} usable blocks "
                f"({p.num_blocks * p.block_size} tokens)"
            )
        if p.budget_bytes and p.kv_bytes_per_block and p.budget_bytes % p.kv_bytes_per_block:
            warnings.append(
                f"{p.name}: the budget is not a whole number of its blocks; "
                f"{p.budget_bytes % p.kv_bytes_per_block:,} bytes unused"
            )
        if p.predicted_running is not None and p.predicted_running >= e.max_num_seqs:
            warnings.append(
                f"{p.name}: predicted {p.predicted_running} running >= max_num_seqs {e.max_num_seqs}: "
                "max_num_seqs binds first and hides the KV-head effect"
            )
        if p.predicted_running is not None and p.predicted_running >= max(spec.load.concurrency):
            warnings.append(
                f"{p.name}: the sweep's largest concurrency {max(spec.load.concurrency)} does not exceed the "
                f"predicted capacity {p.predicted_running}: its capacity will not be measured"
            )
        if p.grows_after_admission:
            warnings.append(
                f"{p.name}: a sequence is admitted with {p.admission_blocks_per_seq} block(s) and grows to "
                f"{p.blocks_per_seq}: expect over-admission and preemptions (vLLM admits by prompt blocks)"
            )
    tokens = w.input_tokens + w.output_tokens
    if plans and -(-tokens // e.block_size) != plans[0].blocks_per_seq:
        warnings.append(
            f"P + G = {tokens} and P + G - 1 = {tokens - 1} need different block counts: "
            "the prediction depends on the last token; choose lengths away from a block boundary"
        )
    return errors, warnings



def plan_from_server(
    name: str, model: str, check: dict[str, Any], spec: KvHeadsSpec, reserved_blocks: int
) -> VariantPlan:
    """Targets mode: the plan from what a running server reports (None where it does not)."""
    info = check.get("info") or {}
    block = int(info.get("block_size") or spec.engine.block_size)
    P, G = spec.workload.input_tokens, spec.workload.output_tokens
    tokens = kv_tokens_per_sequence(P, G)
    per_seq = blocks_for_tokens(tokens, block)
    engine_blocks = int(check["kv_blocks"]) if check.get("kv_blocks") is not None else None
    usable = max(engine_blocks - reserved_blocks, 0) if engine_blocks is not None else None
    kvb = int(check["kv_bytes_per_token"]) if check.get("kv_bytes_per_token") else None
    q = int(info["query_heads"]) if info.get("query_heads") else None
    kv = int(info["kv_heads"]) if info.get("kv_heads") else None
    return VariantPlan(
        name=name,
        model=model,
        kind=planner.kind(q, kv) if q and kv else None,
        kv_heads=kv,
        query_heads=q,
        layers=int(info["layers"]) if info.get("layers") else None,
        head_size=int(info["head_size"]) if info.get("head_size") else None,
        block_size=block,
        kv_bytes_per_token=kvb,
        kv_bytes_per_block=kvb * block if kvb else None,
        budget_bytes=usable * kvb * block if usable is not None and kvb else None,
        num_blocks=usable,
        engine_blocks=engine_blocks,
        reserved_blocks=reserved_blocks,
        kv_tokens_per_seq=tokens,
        blocks_per_seq=per_seq,
        admission_blocks_per_seq=blocks_for_tokens(P, block),
        predicted_max_seqs=usable / per_seq if usable is not None else None,
        predicted_running=usable // per_seq if usable is not None else None,
    )



def resolve(path: Path, root: Path = ROOT) -> Path:
    """A relative path: as given if it exists from the current folder, else under the project root."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (root / path).exists():
        return path.resolve() if path.exists() else path
    return (root / path).resolve()

