"""Model profiles in configs/models: allowed keys only, and the published architecture
in each GPU profile's header adds up (KV bytes per token, attention kind, TP split)."""

from __future__ import annotations

import re

import pytest

from conftest import PROFILE_KEYS, PROFILES, load_profile

ALL = sorted(PROFILES.glob("*.yaml"))
GPU = [p for p in ALL if load_profile(p).get("device") == "cuda"]

#: published shapes (config.json of each model): layers, query heads, KV heads, head size
PUBLISHED = {
    "meta-llama/Llama-3.1-8B-Instruct": (32, 32, 8, 128, "GQA"),
    "mistralai/Mistral-7B-Instruct-v0.3": (32, 32, 8, 128, "GQA"),
    "Qwen/Qwen2.5-7B-Instruct": (28, 28, 4, 128, "GQA"),
    "meta-llama/Llama-2-7b-chat-hf": (32, 32, 32, 128, "MHA"),
    "tiiuae/falcon-7b-instruct": (32, 71, 1, 64, "MQA"),
    "meta-llama/Llama-3.1-70B-Instruct": (80, 64, 8, 128, "GQA"),
}
HEADER_LINE = re.compile(r"^#\s+([a-z_0-9]+):\s+(\S+)")


def header(path) -> dict[str, str]:
    """The `#   key: value` lines of a profile's leading comment block."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if m := HEADER_LINE.match(line):
            out[m.group(1)] = m.group(2)
    return out


def ids(paths):
    return [p.stem for p in paths]


def test_profiles_exist():
    assert (PROFILES / "smollm2-135m-cpu.yaml").is_file()
    assert {load_profile(p)["model"] for p in GPU} == set(PUBLISHED)


@pytest.mark.parametrize("path", ALL, ids=ids(ALL))
def test_profile_keys_allowed(path):
    data = load_profile(path)
    unknown = set(data) - PROFILE_KEYS
    assert not unknown, f"{path.name}: keys not allowed in a profile: {sorted(unknown)}"
    assert {"model", "device", "dtype"} <= set(data)


@pytest.mark.parametrize("path", ALL, ids=ids(ALL))
def test_profile_loads_through_the_gateway_settings(path, monkeypatch):
    settings = pytest.importorskip("service.settings",
                                   reason="the gateway's settings module is not importable")
    import os
    for k in list(os.environ):
        if k.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(k)
    s = settings.Settings(profile=str(path))
    data = load_profile(path)
    assert s.device == data["device"]
    assert s.max_model_len == data.get("max_model_len")


@pytest.mark.parametrize("path", GPU, ids=ids(GPU))
def test_gpu_profile_values(path):
    d = load_profile(path)
    assert "/" in d["model"] and not d["model"].startswith("/"), "a hub id"
    assert d["device"] == "cuda"
    assert d["dtype"] == "bfloat16"
    assert d["gpu_memory_utilization"] == 0.90
    assert d["block_size"] == 16
    assert d["max_num_seqs"] == 256
    assert d["enable_prefix_caching"] is True
    assert "kv_cache_gib" not in d, "the CPU KV budget has no meaning on a GPU"
    assert d["served_model_name"]


@pytest.mark.parametrize("path", GPU, ids=ids(GPU))
def test_gpu_profile_header_matches_published_architecture(path):
    d, h = load_profile(path), header(path)
    layers, q, kvh, head, kind = PUBLISHED[d["model"]]
    assert int(h["num_hidden_layers"]) == layers
    assert int(h["num_attention_heads"]) == q
    assert int(h["num_key_value_heads"]) == kvh
    assert int(h["head_dim"]) == head
    assert h["attention"] == kind
    assert kind == ("MHA" if kvh == q else "MQA" if kvh == 1 else "GQA")
    assert q % kvh == 0
    assert int(h["kv_bytes_per_token_bf16"]) == 2 * layers * kvh * head * 2
    assert d["max_model_len"] <= int(h["max_position_embeddings"])


@pytest.mark.parametrize("path", GPU, ids=ids(GPU))
def test_tensor_parallel_split_is_even(path):
    d, h = load_profile(path), header(path)
    tp = d.get("tensor_parallel_size", 1)
    assert int(h["num_attention_heads"]) % tp == 0
    assert int(h["num_key_value_heads"]) % tp == 0


def test_kv_heads_comparison():
    """The documented ordering: MQA < GQA-4 < GQA-8 < MHA in KV bytes per token."""
    by_model = {load_profile(p)["model"]: int(header(p)["kv_bytes_per_token_bf16"]) for p in GPU}
    assert (by_model["tiiuae/falcon-7b-instruct"]
            < by_model["Qwen/Qwen2.5-7B-Instruct"]
            < by_model["meta-llama/Llama-3.1-8B-Instruct"]
            < by_model["meta-llama/Llama-2-7b-chat-hf"])
    assert by_model["meta-llama/Llama-2-7b-chat-hf"] == 4 * by_model["meta-llama/Llama-3.1-8B-Instruct"]
