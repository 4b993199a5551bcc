"""End to end through the CLI entry point against the local fake server, plus the
result schema round trip and report re-rendering from JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from loadtest.core import results as results_io
from loadtest.__main__ import main
from loadtest.cli import build_parser, overrides_from_args, redact
from loadtest.core.config import load_config
from loadtest.local.fakeserver import FakeOpenAIServer
from loadtest.output.report import markdown, write_report

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "loadtest"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, word_tokenizer_dir: Path, serve) -> Path:
    """Two real runs through ``main``: a completions sweep with SLOs, a chat rate step."""
    out = tmp_path_factory.mktemp("run")
    with serve(FakeOpenAIServer(itl_s=0.002)) as url:
        status = main([
            "run", "--base-url", f"{url}/v1", "--model", "fake-model",
            "--tokenizer", str(word_tokenizer_dir), "--input-tokens", "12", "--output-tokens", "4:6",
            "--concurrency", "1,3", "--num-requests", "6", "--warmup", "1", "--seed", "3",
            "--slo", "ttft=10s", "--slo", "tpot:5000", "--scrape-interval", "0.05",
            "--api-key", "sk-secret", "--output-dir", str(out), "--label", "fake", "--no-progress",
        ])  # fmt: skip
        assert status == 0
        status = main([
            "run", "--base-url", url, "--model", "fake-model", "--endpoint", "chat",
            "--tokenizer", str(word_tokenizer_dir), "--input-tokens", "10", "--output-tokens", "3",
            "--rate", "50", "--arrival", "constant", "--num-requests", "4", "--no-scrape",
            "--output-dir", str(out / "chat"), "--label", "fake-chat", "--no-progress", "--no-plots",
        ])  # fmt: skip
        assert status == 0
    return out


def test_cli_run_writes_result_summary_and_plots(cli_run: Path) -> None:
    names = {p.name for p in cli_run.iterdir()}
    assert {
        "result.json",
        "summary.md",
        "latency_vs_concurrency.png",
        "throughput_vs_concurrency.png",
        "server_timeline_fake.png",
        "request_kv_fake.png",
    } <= names
    result = results_io.load(cli_run / "result.json")
    assert result.schema_version == 1 and result.label == "fake"
    assert result.request_metrics is not None and result.request_metrics.status == "joined"
    assert result.request_metrics.joined == 12  # the two steps' requests, not the warm-up
    assert "](request_kv_fake.png)" in (cli_run / "summary.md").read_text()
    assert [s.concurrency for s in result.steps] == [1, 3]
    assert result.warmup.requests == 1
    for step in result.steps:
        s = step.summary
        assert s.completed == 6 and s.failed == 0
        assert s.good_requests == 6 and s.goodput is not None
        assert s.token_checks.model_dump() == {
            "missing_usage": 0, "prompt_mismatches": 0, "output_mismatches": 0, "retokenization_mismatches": 0,
        }  # fmt: skip
        for r in step.requests:
            assert r.prompt_tokens == r.expected_prompt_tokens == 12
            assert 4 <= r.output_tokens == r.requested_output_tokens <= 6
            assert r.server is not None and r.server.generation_tokens == r.output_tokens
        assert step.server is not None and step.server.source == "gateway"
    assert "sk-secret" not in (cli_run / "result.json").read_text()
    assert "--api-key" in result.environment.argv


def test_cli_chat_run_reports_template_token_mismatch(cli_run: Path) -> None:
    result = results_io.load(cli_run / "chat" / "result.json")
    step = result.steps[0]
    assert step.shape == "rate" and step.summary.completed == 4 and step.server is None
    # the fake server counts only the words of the message; the tokenizer counts the template too
    assert step.summary.token_checks.prompt_mismatches == 4
    assert all(r.expected_prompt_tokens == 10 for r in step.requests)
    assert "prompt mismatches: 4" in (cli_run / "chat" / "summary.md").read_text()


def test_json_round_trip_is_lossless(cli_run: Path) -> None:
    result = results_io.load(cli_run / "result.json")
    copy = cli_run / "copy.json"
    results_io.save(result, copy)
    assert results_io.load(copy) == result
    assert json.loads(copy.read_text()) == json.loads((cli_run / "result.json").read_text())


def test_unknown_schema_version_is_refused(tmp_path: Path, cli_run: Path) -> None:
    data = json.loads((cli_run / "result.json").read_text())
    data["schema_version"] = 99
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema_version 99"):
        results_io.load(path)


def test_report_rerenders_and_compares_runs(cli_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    status = main(
        [
            "report",
            str(cli_run / "result.json"),
            str(cli_run / "result.json"),
            str(cli_run / "chat" / "result.json"),
            "--output-dir",
            str(out),
        ]
    )
    assert status == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "summary.md",
        "latency_vs_concurrency.png",
        "latency_vs_rate.png",
        "throughput_vs_rate.png",
        "server_timeline_fake.png",
        "server_timeline_fake_2.png",
    } <= names
    text = (out / "summary.md").read_text()
    assert "| fake | concurrency 1 |" in text and "| fake #2 | concurrency 3 |" in text
    assert "| fake-chat | rate 50/s |" in text
    assert "## Server side" in text
    # same inputs, same Markdown
    result = results_io.load(cli_run / "result.json")
    assert markdown([result]) == (cli_run / "summary.md").read_text()
    assert write_report([result], tmp_path / "noplots", plots=False) == [tmp_path / "noplots" / "summary.md"]


def test_config_files_validate_and_flags_override() -> None:
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if (yaml.safe_load(path.read_text()) or {}).get("kind") in ("kv-heads", "kv-heads-latency", "kv-heads-conversations"):
            continue  # the KV-heads experiment's own specs: tests/loadtest/test_kvheads*.py
        load_config(path)
    default = load_config(CONFIG_DIR / "default.yaml")
    assert (default.workload.input_tokens.low, default.workload.output_tokens.high) == (128, 64)
    assert default.load.concurrency == [16] and default.load.num_requests == 64
    args = build_parser().parse_args(["run", "--rate", "1,2", "--duration", "5", "--slo", "e2el=2s", "--no-scrape"])
    cfg = load_config(CONFIG_DIR / "default.yaml", overrides_from_args(args))
    assert cfg.target.request_metrics is True  # on unless --no-request-metrics
    assert cfg.load.rate == [1.0, 2.0] and cfg.load.concurrency == []
    assert cfg.load.duration_s == 5 and cfg.load.num_requests is None
    assert cfg.slo.e2el_ms == 2000 and cfg.target.scrape is False
    assert cfg.workload.input_tokens.low == 128  # untouched fields keep the file's values


def test_bad_input_exits_with_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--base-url", "http://127.0.0.1:9", "--model", "m", "--slo", "speed=1"]) == 2
    assert "SLO" in capsys.readouterr().err
    assert main(["run", "--base-url", "http://127.0.0.1:9", "--model", "m"]) == 2  # no tokenizer


def test_redact() -> None:
    assert redact(["--api-key", "k", "--api-key=k2", "--model", "m"]) == [
        "--api-key",
        "***",
        "--api-key=***",
        "--model",
        "m",
    ]


def test_run_flags_are_generated_from_the_config_model() -> None:
    from loadtest.cli import config_flags

    flags = {flag: (path, field) for path, field, flag, *_ in config_flags().values()}
    # the flags users know keep their names
    for flag in ("--base-url", "--model", "--endpoint", "--metrics-url", "--scrape-interval", "--request-timeout",
                 "--tokenizer", "--input-tokens", "--output-tokens", "--shared-prefix-tokens", "--arrival",
                 "--burstiness", "--max-concurrency", "--num-requests", "--duration", "--warmup", "--ramp-up",
                 "--seed", "--pool-size", "--output-dir", "--label", "--turns", "--user-tokens",
                 "--system-prompt-tokens", "--think-time", "--think-time-dist"):  # fmt: skip
        assert flag in flags, flag
    assert flags["--think-time"] == (("workload", "sessions"), "think_time_s")
    args = build_parser().parse_args(["run", "--scrape-interval", "0.2", "--turns", "2:5", "--warmup", "3",
                                      "--think-time-dist", "exponential", "--output-dir", "x"])  # fmt: skip
    overrides = overrides_from_args(args)
    assert overrides["target"] == {"scrape_interval_s": 0.2}
    assert overrides["workload"] == {"sessions": {"turns": "2:5", "think_time": "exponential"}}
    assert overrides["load"]["warmup_requests"] == 3 and overrides["output"] == {"dir": Path("x")}
    cfg = load_config(None, overrides)
    assert cfg.workload.sessions.turns.high == 5 and cfg.load.warmup_requests == 3
