"""KV-head variants of one Llama-family checkpoint, for the KV-heads experiment.

Every N that divides the query heads is possible. Each query head h of the original uses
KV head h // g (g = Hq / Hkv). We first give every query head its own copy of its KV
head (MHA, exact), then mean-pool groups of Hq / N consecutive heads into N heads:
- N a multiple of Hkv: the pooled heads are identical copies, so the variant is the
  same function as the original (greedy outputs match token for token);
- N dividing Hkv: the mean-pooling of each group used by the GQA paper (Ainslie et al.
  2023) to convert MHA checkpoints, which they follow with uptraining; without it the
  model's quality drops (report capacity and latency only, never quality).
Only the k_proj/v_proj weights (and biases) and `num_key_value_heads` change.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_KV = re.compile(r"\.self_attn\.(k_proj|v_proj)\.(weight|bias)$")


class VariantError(ValueError):
    pass


def regroup(t, old_kv: int, new_kv: int, query_heads: int):
    """Rows of a k/v projection (old_kv * d, ...) -> (new_kv * d, ...)."""
    import torch

    if query_heads % new_kv:
        raise VariantError(f"{new_kv} KV heads do not divide {query_heads} query heads")
    d = t.shape[0] // old_kv
    heads = t.reshape(old_kv, d, *t.shape[1:]).to(torch.float32)
    per_query = heads.repeat_interleave(query_heads // old_kv, dim=0)  # (Hq, d, ...)
    pooled = per_query.reshape(new_kv, query_heads // new_kv, d, *t.shape[1:]).mean(dim=1)
    return pooled.reshape(new_kv * d, *t.shape[1:]).to(t.dtype).contiguous()


def make_variant(src: str | Path, dst: str | Path, kv_heads: int, force: bool = False) -> Path:
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    q, old = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    if q % kv_heads:
        raise VariantError(f"{kv_heads} KV heads do not divide {q} query heads; "
                           f"possible: {[n for n in range(1, q + 1) if q % n == 0]}")
    if dst.exists():
        if not force and json.loads((dst / "config.json").read_text()).get("num_key_value_heads") == kv_heads:
            return dst
        shutil.rmtree(dst)
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise VariantError(f"no safetensors weights in {src}")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    changed = 0
    for shard in shards:
        tensors = load_file(shard)
        for name, t in tensors.items():
            if _KV.search(name):
                tensors[name] = regroup(t, old, kv_heads, q)
                changed += 1
        save_file(tensors, tmp / shard.name, metadata={"format": "pt"})
    if changed < 2 * cfg["num_hidden_layers"]:
        shutil.rmtree(tmp)
        raise VariantError(f"found {changed} k/v projections for {cfg['num_hidden_layers']} layers")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", ".prepared.json"):
            shutil.copy2(f, tmp / f.name)
    if (src / "model.safetensors.index.json").exists():
        shutil.copy2(src / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
    cfg["num_key_value_heads"] = kv_heads
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "variant.json").write_text(json.dumps({
        "source": src.name, "source_kv_heads": old, "kv_heads": kv_heads,
        "method": "repeat (exact)" if kv_heads % old == 0 else "mean-pool (GQA paper, no uptraining)",
    }, indent=2) + "\n")
    tmp.rename(dst)
    return dst


def default_variant_dir(src: str | Path, kv_heads: int) -> Path:
    src = Path(src)
    return src.parent / f"{src.name}-kv{kv_heads}"
