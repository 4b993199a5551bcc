"""The conversation section of the KV-heads report: predicted next to measured, and plots.

Measured per variant and step (C sessions in flight), from the run's records and their
joined server figures (``loadtest.output.turns``): the prefix-cache hit ratio by turn, TTFT
by turn, KV held by turn, and the engine's preemptions during the step (``/metrics``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.core.results import StepResult  # noqa: E402
from loadtest.kvheads.conversations_run import ConversationsResult  # noqa: E402
from loadtest.kvheads.prose import num, table  # noqa: E402
from loadtest.output.turns import TurnFigures, turn_figures  # noqa: E402


def _steps(result: ConversationsResult) -> dict[str, dict[int, StepResult]]:
    """variant -> C -> its step."""
    out: dict[str, dict[int, StepResult]] = {}
    for v in result.variants:
        if v.run is not None:
            out[v.plan.name] = {s.concurrency or 0: s for s in v.run.steps}
    return out


def _preemptions(step: StepResult) -> float | None:
    joined = [r.server.preemptions for r in step.requests if r.server is not None and r.server.preemptions is not None]
    if joined:
        return float(sum(joined))
    return step.server.preemptions if step.server is not None else None


def _held(step: StepResult) -> str:
    """Requests (one per session) running at once: median while others waited / peak, and the
    peak queue, from the step's /metrics scrapes."""
    v = step.server
    if v is None:
        return "-"
    return f"{num(v.running_median_while_waiting, 0)} / {num(v.running_peak, 0)}, queue {num(v.waiting_peak, 0)}"


def capacity_rows(result: ConversationsResult) -> list[list[str]]:
    steps = _steps(result)
    rows = []
    for pred in result.predictions:
        by_c = steps.get(pred.name, {})
        clean = [c for c, s in sorted(by_c.items()) if (_preemptions(s) or 0) == 0]
        rows.append([
            pred.name, f"{pred.kv_bytes_per_token:,}", str(pred.usable_blocks), str(pred.turns[-1].blocks),
            str(pred.sessions_fit), "; ".join(f"C={c}: {_held(s)}" for c, s in sorted(by_c.items())) or "-",
            str(max(clean)) if clean else "none",
            ", ".join(f"C={c}: {num(_preemptions(s), 0)}" for c, s in sorted(by_c.items())) or "-",
        ])  # fmt: skip
    return rows


def turn_rows(result: ConversationsResult) -> list[list[str]]:
    steps = _steps(result)
    rows = []
    for pred in result.predictions:
        for c, step in sorted(steps.get(pred.name, {}).items()):
            measured = {f.turn: f for f in turn_figures(step.requests)}
            for k, t in enumerate(pred.turns):
                m: TurnFigures | None = measured.get(t.turn)
                rows.append([
                    pred.name, str(c), str(t.turn), num(t.prompt_tokens, 0),
                    num(m.prompt_tokens_mean if m else None, 1), str(t.cached_full),
                    num(m.cached_tokens_mean if m else None, 1), num(pred.hit_ratio[c][k] if c in pred.hit_ratio else None, 2),
                    num(m.hit_ratio if m else None, 2), num(pred.kv_bytes[k] / 2**20, 3),
                    num(m.kv_used_bytes_mean / 2**20 if m and m.kv_used_bytes_mean else None, 3),
                    num(m.ttft_mean_s if m else None, 0, 1000.0),
                ])  # fmt: skip
    return rows


def plot(result: ConversationsResult, path: Path) -> Path:
    """Per step (a column per C): hit ratio by turn (predicted dashed, measured solid) and TTFT by turn."""
    steps = _steps(result)
    cs = list(result.spec.load.concurrency)
    fig, axes = plt.subplots(2, len(cs), figsize=(4.6 * len(cs), 7.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, c in enumerate(cs):
        for i, pred in enumerate(result.predictions):
            color = colors[i % len(colors)]
            turns = [t.turn for t in pred.turns]
            axes[0][j].plot(turns, pred.hit_ratio.get(c, []), "--", color=color, label=f"{pred.name} predicted")
            step = steps.get(pred.name, {}).get(c)
            if step is None:
                continue
            figures = turn_figures(step.requests)
            axes[0][j].plot([f.turn for f in figures], [f.hit_ratio if f.hit_ratio is not None else float("nan")
                            for f in figures], "-o", color=color, label=f"{pred.name} measured")  # fmt: skip
            axes[1][j].plot([f.turn for f in figures], [1000 * (f.ttft_mean_s or float("nan")) for f in figures],
                            "-o", color=color, label=pred.name)  # fmt: skip
        axes[0][j].set_title(f"{c} sessions in flight: prefix-cache hit ratio")
        axes[1][j].set_title(f"{c} sessions in flight: TTFT mean (ms)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks([t.turn for t in result.predictions[0].turns] if result.predictions else [])
            ax.set_xlabel("turn")
            ax.grid(True, alpha=0.3)
        axes[0][j].set_ylim(-0.05, 1.0)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def section(result: ConversationsResult, image: str | None, result_path: str, discussion: str = "") -> str:
    """The report's ``## Conversations`` section."""
    s, w, e = result.spec, result.spec.workload, result.spec.engine
    setup = (
        f"Command: `{result.command}` ({result.created_at}, {num((result.wall_s or 0) / 60, 1)} min; "
        f"result `{result_path}`). Same KV byte budget for every variant ({result.budget_bytes:,} B usable, "
        f"`num_gpu_blocks_override` from each variant's bytes per block), prefix caching **on**, engine settings "
        f"identical across variants: block size {e.block_size}, max_model_len {e.max_model_len}, max_num_seqs "
        f"{e.max_num_seqs}, dtype {e.dtype}, enforce_eager {e.enforce_eager}. Workload: closed loop, "
        f"{s.load.waves} x C sessions per step at C = {', '.join(map(str, s.load.concurrency))} sessions in flight; "
        f"each session {w.turns} turns of a {w.user_tokens}-token user message and an answer of exactly "
        f"{w.output_tokens} tokens (`ignore_eos`: the MQA variant, mean-pooled without uptraining, emits "
        f"degenerate text, so only fixed lengths make its figures comparable; its answers' quality is not), "
        f"{w.think_time_s:g} s think time, every turn sending the whole history with the answers the server "
        f"returned. The same sessions for every variant."
    )
    prompts = ", ".join(f"{p:.0f}" for p in result.prompt_tokens_by_turn)
    parts = [
        "## Conversations: sessions, prefix-cache hits and TTFT by turn", "", setup, "",
        "**Prediction from the shapes** (`loadtest/kvheads/conversations.py`): prompt tokens by turn P_k = "
        f"{prompts} (the chat template over the history with placeholder answers); a request ends holding "
        "H_k = P_k + G - 1 KV tokens in b_k = ceil(H_k / B) blocks; sessions that fit = floor(usable blocks / "
        "b_K); a turn's hits when its session's history is still cached = B x floor(min(H_{k-1}, P_k - 1) / B), "
        "and with C sessions in flight at most floor(usable / b_{k-1}) histories stay, so the predicted hit "
        "ratio is the full one x min(1, floor(usable / b_{k-1}) / C).", "",
        table(["variant", "KV B/token", "usable blocks", "blocks at last turn", "sessions fit (predicted)",
               "running while queued / peak, peak queue (measured)", "largest C without preemption (measured)",
               "preemptions per step (measured)"],
              capacity_rows(result)), "",  # fmt: skip
        table(["variant", "C", "turn", "prompt pred.", "prompt meas.", "cached pred. (history kept)",
               "cached meas.", "hit ratio pred.", "hit ratio meas.", "KV held pred. (MiB)", "KV held meas. (MiB)",
               "TTFT meas. (ms)"], turn_rows(result)),  # fmt: skip
    ]
    if image:
        parts += ["", f"![hit ratio and TTFT by turn]({image})"]
    if discussion:
        parts += ["", discussion]
    return "\n".join(parts)


def discussion_path(out_dir: Path) -> Path:
    """Hand-written reading of a measured run, kept beside its result (optional)."""
    return out_dir / "discussion.md"


def write(result: ConversationsResult, out_dir: Path, plots: bool = True) -> tuple[str, list[Path]]:
    """(the section for the main report, written files): PNG and a standalone Markdown in ``out_dir``."""
    written = [plot(result, out_dir / "conversations.png")] if plots else []
    notes = discussion_path(out_dir).read_text().strip() if discussion_path(out_dir).is_file() else ""
    standalone = section(result, "conversations.png" if plots else None, "result.json", notes)
    (out_dir / "summary.md").write_text(standalone + "\n")
    return section(result, f"{out_dir.parent.name}/{out_dir.name}/conversations.png" if plots else None,
                   f"{out_dir.parent.name}/{out_dir.name}/result.json", notes), [out_dir / "summary.md", *written]
