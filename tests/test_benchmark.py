"""Load benchmark against a real `transformers serve` process, checked against an independent count."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vlp.components.smoke.benchmark import (
    BenchmarkResult,
    percentile,
    recommend,
    render_html,
    render_table,
    run_benchmark,
    summarize,
)
from vlp.pipelines.local.peers import Peer, _spawn, _wait_http, free_port


@pytest.fixture(scope="module")
def smollm2_server(smollm2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`transformers serve` on SmolLM2 (real text, so a tokenizer recount of the answers is meaningful)."""
    port = free_port()
    log = tmp_path_factory.mktemp("bench") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    argv = [str(Path(sys.executable).parent / "transformers"), "serve", str(smollm2_model_dir), "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]  # fmt: skip
    process, offset = _spawn("transformers-serve", argv, log, env=env)
    peer = Peer("transformers-serve", f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_http(peer, f"{peer.url}/health", offset, timeout=120, accept=lambda s: s == 200)
        yield peer.url, smollm2_model_dir
    finally:
        peer.stop()


@pytest.mark.slow
def test_benchmark_figures_agree_with_an_independent_count(
    smollm2_server: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    url, model_dir = smollm2_server
    started = time.perf_counter()
    result = run_benchmark(
        url,
        concurrency=[1, 2],
        requests_per_level=2,
        max_tokens=12,
        prompt="Tell me one fact about Paris.",
        model=str(model_dir),
        ttft_target_s=60.0,
    )
    # Our clock, less the benchmark's unmeasured warm-up request (a cold server's first answer).
    wall = time.perf_counter() - started - result.warmup_s

    table = render_table(result)
    print(table)
    report = tmp_path / "bench.html"
    report.write_text(render_html(result))
    assert "concurrency" in capsys.readouterr().out
    assert "<svg" in report.read_text() and "c=2" in report.read_text()

    assert [
        set(lv) >= {"concurrency", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "output_tokens_per_s", "errors"}
        for lv in result.levels
    ] == [True, True]
    assert [lv["errors"] for lv in result.levels] == [0, 0]
    assert [lv["requests"] for lv in result.levels] == [2, 2]
    assert result.recommended_concurrency == 2

    # Independent figures: tokens of the streamed answers counted by the model's tokenizer, time by our clock.
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    counted = sum(len(tokenizer.encode(r.text, add_special_tokens=False)) for r in result.records)
    reported = sum(lv["output_tokens"] for lv in result.levels)
    assert abs(reported - counted) <= 0.10 * counted, (reported, counted)
    reported_wall = sum(lv["wall_s"] for lv in result.levels)
    assert abs(reported_wall - wall) <= 0.10 * wall, (reported_wall, wall)
    reported_rate = reported / reported_wall
    assert abs(reported_rate - counted / wall) <= 0.10 * (counted / wall)
    for lv in result.levels:
        assert 0 < lv["ttft_p50_s"] <= lv["ttft_p95_s"] < lv["wall_s"]
        assert lv["itl_p50_s"] > 0


def test_unreachable_target_counts_errors_not_crashes() -> None:
    port = free_port()
    result = run_benchmark(
        f"http://127.0.0.1:{port}",
        concurrency=[2],
        requests_per_level=3,
        max_tokens=4,
        prompt="hi",
        model="m",
        timeout_s=5,
    )
    assert result.levels[0]["errors"] == 3
    assert result.recommended_concurrency is None
    # Nothing measured is not a sizing verdict: the table says every request failed, not "bigger GPUs".
    table = render_table(result)
    assert "every request failed" in table and "bigger GPUs" not in table
    assert "ConnectionError" in render_html(result)


def test_vlp_bench_against_a_dead_server_fails_and_writes_its_report_where_it_says(tmp_path: Path) -> None:
    import subprocess
    import sys

    report = tmp_path / "reports" / "dead.html"
    done = subprocess.run(
        [sys.executable, "-m", "vlp.pipelines.cli", "bench", f"http://127.0.0.1:{free_port()}", "--concurrency", "1",
         "--requests", "2", "--max-tokens", "2", "--report", str(report)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "every request to http://127.0.0.1:" in done.stderr
    assert f"report: {report}" in done.stdout and report.is_file()
    assert not (tmp_path / "bench-report.html").exists()


def test_summary_statistics_and_recommendation() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([], 95) == 0.0
    levels = [
        {"concurrency": 1, "ttft_p95_s": 0.2, "errors": 0},
        {"concurrency": 4, "ttft_p95_s": 0.9, "errors": 0},
        {"concurrency": 16, "ttft_p95_s": 3.5, "errors": 0},
        {"concurrency": 32, "ttft_p95_s": 1.0, "errors": 2},
    ]
    assert recommend(levels, 2.0) == 4
    assert recommend(levels, 0.1) is None
    empty = summarize(8, [], 1.0)
    assert empty["output_tokens_per_s"] == 0.0 and empty["errors"] == 0
    assert render_html(BenchmarkResult("http://x", "m", "p", 8, 2.0)).startswith("<!doctype html>")


def test_rejects_a_target_that_is_neither_url_nor_endpoint() -> None:
    with pytest.raises(ValueError, match="neither"):
        run_benchmark("my-endpoint", concurrency=[1], requests_per_level=1, max_tokens=1, prompt="hi")
