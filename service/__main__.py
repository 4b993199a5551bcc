"""Command line: ``python -m service serve|prepare-model``."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from pathlib import Path

from pydantic import ValidationError


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    from service.settings import Settings

    for name, f in Settings.model_fields.items():
        if name == "vllm_args":
            continue
        flag = "--" + name.replace("_", "-")
        if f.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f.description)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                           help=f.description or f"(env GATEWAY_{name.upper()})")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace, vllm_flags: list[str]) -> int:
    """Our flags are parsed here; every other flag (before or after ``--``) is vLLM's."""
    from service.settings import Settings
    from service.vllm_args import VllmArgsError, build_vllm_args

    overrides = {k: v for k, v in vars(args).items() if k not in ("cmd", "func") and v is not None}
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as e:
        print(f"invalid settings: {e}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    try:
        vllm_args = build_vllm_args(settings, vllm_flags)
    except (VllmArgsError, ValueError, KeyError) as e:
        print(f"invalid vLLM flags: {e}", file=sys.stderr)
        return 2
    from service.server import run

    return run(settings, vllm_args)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from service.model_prep import PrepareError, prepare_default_model

    _setup_logging("info")
    try:
        result = prepare_default_model(Path(args.output), force=args.force)
    except PrepareError as e:
        print(f"prepare-model: {e}", file=sys.stderr)
        return 1
    print(f"{'prepared' if result.created else 'already prepared'}: {result.path}")
    return 0


def cmd_kv_variant(args: argparse.Namespace) -> int:
    from service.variants import VariantError, default_variant_dir, make_variant

    _setup_logging("info")
    out = Path(args.output) if args.output else default_variant_dir(args.model, args.kv_heads)
    try:
        path = make_variant(args.model, out, args.kv_heads, force=args.force)
    except (VariantError, FileNotFoundError) as e:
        print(f"kv-variant: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _hardware(names: list[str]) -> list:
    """Published GPUs by name (service.kv.roofline.GPUS) or JSON files (`python -m loadtest hwprobe`)."""
    from service.kv.hardware import resolve

    return [resolve(name) for name in names]


def cmd_kv_plan_roofline(args: argparse.Namespace, model: str | None) -> int:
    """`kv-plan --seed-models` and `kv-plan --roofline`: predictions on paper, not measurements."""
    import json

    from service.kv import seeds

    try:
        hardware = _hardware(args.hardware or ["H100-SXM", "H200"])
        tp = args.tensor_parallel_size or 1
        if args.seed_models:
            tables = seeds.seed_tables(hardware, tensor_parallel_size=tp,
                                       tpot_context=(args.context or [seeds.TPOT_CONTEXT])[0])
            print(json.dumps(tables, indent=1) if args.json else seeds.render_seed_tables(tables))
            return 0
        if model is None:
            raise ValueError("--roofline needs --model or --profile")
        batches, contexts = args.batch or list(seeds.BATCHES), args.context or [seeds.TPOT_CONTEXT]
        rows = [r for hw in hardware for r in seeds.roofline_rows(
            model, hw, batches, contexts, args.kv_heads, tp, resize_kv_weights=args.resize_kv_weights)]
    except ValueError as e:
        print(f"kv-plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"label": seeds.LABEL, "model": model, "hardware": [vars(h) for h in hardware],
                          "rows": rows}, indent=1))
    else:
        print(f"{model}: decode-step roofline ({seeds.LABEL})\n")
        print(seeds.render_roofline(rows))
    return 0


def cmd_kv_plan(args: argparse.Namespace) -> int:
    from service.kv import planner
    from service.kv.geometry import dtype_bytes
    from service.settings import DEFAULT_PROFILE, load_profile, resolve_model_path

    if args.seed_models:
        return cmd_kv_plan_roofline(args, None)
    profile = args.profile or (None if args.model else DEFAULT_PROFILE)
    prof = load_profile(profile) if profile else {}
    model = args.model or prof["model"]
    model = resolve_model_path(model)
    if args.roofline:
        return cmd_kv_plan_roofline(args, model)
    tp = args.tensor_parallel_size or prof.get("tensor_parallel_size", 1)
    block = args.block_size or prof.get("block_size") or (16 if args.gpu_memory_gib else 128)
    kv_dtype = args.kv_cache_dtype or prof.get("kv_cache_dtype", "auto")
    dtype = prof.get("dtype", "bfloat16")
    try:
        geometry, cfg = planner.geometry_for(model, block, kv_dtype, dtype, tp)
        weights = planner.weights_bytes(cfg, dtype_bytes(dtype if dtype != "auto" else "bfloat16"))
        budget = planner.budget_bytes(
            kv_cache_gib=args.kv_cache_gib or prof.get("kv_cache_gib"), gpu_memory_gib=args.gpu_memory_gib,
            gpu_memory_utilization=args.gpu_memory_utilization or prof.get("gpu_memory_utilization", 0.9),
            weights=weights, tensor_parallel_size=tp, overhead_gib=args.overhead_gib)
    except ValueError as e:
        print(f"kv-plan: {e}", file=sys.stderr)
        return 2
    max_len = args.max_model_len or prof.get("max_model_len") or cfg.get("max_position_embeddings", 2048)
    rows = planner.plan(geometry, budget, args.seq_len, max_len, args.kv_heads, tp)
    if args.json:
        import dataclasses
        import json

        print(json.dumps({"model": model, "geometry": geometry.as_dict(), "budget_bytes": budget,
                          "weights_bytes": weights, "seq_len": args.seq_len, "max_model_len": max_len,
                          "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return 0
    print(f"model {model}: {geometry.layers} layers, {geometry.query_heads} query heads, "
          f"{geometry.kv_heads} KV heads, head size {geometry.head_size}, KV dtype {geometry.dtype} "
          f"({geometry.dtype_bytes} B), block {geometry.block_size} tokens"
          + (f"; bytes and blocks per GPU of TP={tp}" if tp > 1 else ""))
    where = (f"{args.gpu_memory_gib} GiB GPU x {args.gpu_memory_utilization or prof.get('gpu_memory_utilization', 0.9)}"
             f" - weights {weights / 2**30:.1f} GiB" + (f" / {tp}" if tp > 1 else "")
             + (f" - overhead {args.overhead_gib} GiB" if args.overhead_gib else "")) if args.gpu_memory_gib else "CPU KV budget"
    print(f"KV budget: {budget / 2**30:.2f} GiB ({where})\n")
    print(planner.render_table(rows, args.seq_len, max_len, geometry.kv_heads))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser(
        "serve", allow_abbrev=False,
        help="run the gateway: its own flags, then any vLLM flag (`vllm serve --help`), optionally after --",
        description="Gateway flags are also GATEWAY_* env vars and profile keys. Every other flag is "
                    "vLLM's own and goes to vLLM's parser unchanged, e.g. "
                    "`serve --port 9000 -- --max-num-seqs 32 --tool-call-parser hermes`.")
    _add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    prep = sub.add_parser("prepare-model", help="build the default model folder from the shipped GGUF")
    prep.add_argument("--output", default="models/SmolLM2-135M-Instruct")
    prep.add_argument("--force", action="store_true", help="rebuild even if it is already prepared")
    prep.set_defaults(func=cmd_prepare_model)

    var = sub.add_parser("kv-variant", help="rewrite a Llama-family checkpoint to N KV heads")
    var.add_argument("--kv-heads", type=int, required=True)
    var.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="source HF folder")
    var.add_argument("--output", help="default: <model>-kv<N> beside the source")
    var.add_argument("--force", action="store_true")
    var.set_defaults(func=cmd_kv_variant)

    pl = sub.add_parser("kv-plan", help="KV capacity of a model and its MHA/GQA/MQA siblings")
    pl.add_argument("--profile", help="model profile YAML (configs/models/...)")
    pl.add_argument("--model", help="local HF folder or a model id in configs/model-shapes.yaml")
    pl.add_argument("--kv-cache-gib", type=float, help="CPU: KV budget in GiB")
    pl.add_argument("--gpu-memory-gib", type=float, help="GPU: memory per GPU in GiB (e.g. 80)")
    pl.add_argument("--gpu-memory-utilization", type=float)
    pl.add_argument("--overhead-gib", type=float, default=0.0,
                    help="GPU: activation/CUDA-graph memory to set aside (vLLM profiles it at start)")
    pl.add_argument("--tensor-parallel-size", type=int)
    pl.add_argument("--block-size", type=int)
    pl.add_argument("--kv-cache-dtype")
    pl.add_argument("--max-model-len", type=int)
    pl.add_argument("--seq-len", type=int, default=1024, help="prompt + output tokens per sequence")
    pl.add_argument("--kv-heads", type=int, nargs="*", help="KV-head counts to show (default: all divisors)")
    pl.add_argument("--json", action="store_true")
    rf = pl.add_argument_group("roofline: predicted time per output token (predictions on paper)")
    rf.add_argument("--roofline", action="store_true",
                    help="decode-step roofline of the model's MHA/GQA/MQA siblings for --batch x --context")
    rf.add_argument("--seed-models", action="store_true",
                    help="published seed models x siblings on each --hardware: max concurrency at 2k/8k/32k, "
                         "TPOT at batch 1/16/64 (context: the first --context, default 4096)")
    rf.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 16 64)")
    rf.add_argument("--context", type=int, nargs="+", help="context tokens per sequence (default 4096)")
    rf.add_argument("--hardware", nargs="+",
                    help="a GPU of service.kv.roofline.GPUS (H100-SXM, H200, A100-SXM4-80GB, L4, ...; or its NVML name) "
                         "or a JSON file of `python -m loadtest hwprobe` "
                         "(default: H100-SXM H200)")
    rf.add_argument("--resize-kv-weights", action="store_true",
                    help="siblings' K/V projection weights change with their KV heads (default: same weights)")
    pl.set_defaults(func=cmd_kv_plan)
    return parser


def main(argv: typing.Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "serve":
        tail: list[str] = []
        if "--" in argv:
            i = argv.index("--")
            argv, tail = argv[:i], argv[i + 1:]
        args, rest = parser.parse_known_args(argv)
        return cmd_serve(args, [*rest, *tail])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
