"""Load benchmark: a short closed-loop load per concurrency level (TTFT, inter-token latency, tokens/s, errors)."""

from __future__ import annotations

import html
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

SUMMARY_KEYS = ("concurrency", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "output_tokens_per_s", "errors")


@dataclass
class RequestRecord:
    """One streamed request: when its first token came, how many tokens, what it said, or why it failed."""

    concurrency: int
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    itl_s: float = 0.0
    text: str = ""
    error: str = ""


@dataclass
class BenchmarkResult:
    """Per-level summaries, the recommended concurrency and every request's record."""

    target: str
    model: str
    prompt: str
    max_tokens: int
    ttft_target_s: float
    levels: list[dict[str, Any]] = field(default_factory=list)
    recommended_concurrency: int | None = None
    records: list[RequestRecord] = field(default_factory=list)
    warmup_s: float = 0.0  # the unmeasured first request, outside every level's figures
    price_per_hour_usd: float | None = None  # what the serving shape costs, when known (add_costs)
    price_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (records without the answers' text)."""
        data = asdict(self)
        for record in data["records"]:
            record.pop("text", None)
        return data


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class ChatTarget:
    """Where the load goes: an OpenAI chat-completions URL, the session that calls it, and the model name to send."""

    url: str
    session: Any
    model: str


def url_target(
    target: str, model: str | None, api_endpoint: str = "", headers: dict[str, str] | None = None
) -> ChatTarget:
    """An OpenAI-compatible base URL as a target (a Vertex endpoint is resolved by its target's own module:
    vlp.components.vertex.prediction.chat_target, which takes the same arguments)."""
    import requests

    if not target.startswith(("http://", "https://")):
        raise ValueError(
            f"{target!r} is neither an OpenAI-compatible base URL (http://HOST:PORT) nor a Vertex endpoint "
            "(projects/P/locations/L/endpoints/E)"
        )
    base = target.rstrip("/")
    base = base[: -len("/v1")] if base.endswith("/v1") else base
    session = requests.Session()
    session.headers.update(headers or {})  # e.g. a Cloud Run service's ID token
    if model is None:
        # The server names its model; when it cannot, requests go without one and single-model servers use theirs.
        try:
            listed = session.get(f"{base}/v1/models", timeout=10).json().get("data") or []
            model = str(listed[0]["id"]) if listed else ""
        except (requests.RequestException, ValueError, KeyError, IndexError):
            model = ""
    return ChatTarget(f"{base}/v1/chat/completions", session, model)


def _stream_one(target: ChatTarget, prompt: str, max_tokens: int, concurrency: int, timeout_s: float) -> RequestRecord:
    """Sends one streaming chat request and times the first and the following tokens."""
    import requests

    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.model:
        body["model"] = target.model  # left out when unknown: single-model servers then use theirs
    start = time.perf_counter()
    first = last = 0.0
    chunks = 0
    usage_tokens: int | None = None
    parts: list[str] = []
    try:
        with target.session.post(target.url, json=body, stream=True, timeout=timeout_s) as resp:
            if resp.status_code != 200:
                return RequestRecord(concurrency, False, error=f"HTTP {resp.status_code}: {resp.text[:300]}")
            for raw in resp.iter_lines():
                line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"].get("completion_tokens") or 0) or usage_tokens
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if content:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
                        parts.append(content)
    except (requests.RequestException, ValueError) as exc:
        return RequestRecord(concurrency, False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    end = time.perf_counter()
    if not chunks:
        return RequestRecord(concurrency, False, latency_s=end - start, error="the stream carried no tokens")
    # Servers may merge several tokens into one chunk; the usage block (when sent) has the true count.
    tokens = usage_tokens or chunks
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return RequestRecord(
        concurrency,
        True,
        ttft_s=first - start,
        latency_s=end - start,
        output_tokens=tokens,
        itl_s=itl,
        text="".join(parts),
    )


def _run_level(
    target: ChatTarget, concurrency: int, requests_per_level: int, max_tokens: int, prompt: str, timeout_s: float
) -> tuple[list[RequestRecord], float]:
    """Closed loop: `concurrency` workers each send the next request as soon as their last one ends."""
    records: list[RequestRecord] = []
    lock = threading.Lock()
    issued = [0]

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= requests_per_level:
                    return
                issued[0] += 1
            record = _stream_one(target, prompt, max_tokens, concurrency, timeout_s)
            with lock:
                records.append(record)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, requests_per_level))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


def summarize(concurrency: int, records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    """One level's summary: the six figures, plus request count and wall time."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in ok]
    itls = [r.itl_s for r in ok if r.output_tokens > 1]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "ttft_p50_s": round(percentile(ttfts, 50), 4),
        "ttft_p95_s": round(percentile(ttfts, 95), 4),
        "itl_p50_s": round(percentile(itls, 50), 5),
        "output_tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else 0.0,
        "errors": len(records) - len(ok),
        "requests": len(records),
        "output_tokens": tokens,
        "wall_s": round(wall_s, 4),
    }


def recommend(levels: list[dict[str, Any]], ttft_target_s: float) -> int | None:
    """The highest concurrency without errors whose p95 TTFT stays under the target; None if none does."""
    good = [lv["concurrency"] for lv in levels if lv["errors"] == 0 and lv["ttft_p95_s"] <= ttft_target_s]
    return max(good) if good else None


def run_benchmark(
    target: str,
    *,
    concurrency: list[int],
    requests_per_level: int,
    max_tokens: int,
    prompt: str,
    model: str | None = None,
    api_endpoint: str = "",
    ttft_target_s: float = 2.0,
    timeout_s: float = 300.0,
    headers: dict[str, str] | None = None,
    resolve: Callable[..., ChatTarget] | None = None,
) -> BenchmarkResult:
    """Runs the closed-loop load at each concurrency level against `target`: an OpenAI base URL, or what
    `resolve(target, model, api_endpoint, headers)` makes of it (a Vertex endpoint:
    vlp.components.vertex.prediction.chat_target)."""
    if not concurrency or any(c < 1 for c in concurrency):
        raise ValueError(f"concurrency levels must be positive integers, got {concurrency}")
    if requests_per_level < 1:
        raise ValueError("requests_per_level must be at least 1")
    resolved = (resolve or url_target)(target, model, api_endpoint, headers)
    result = BenchmarkResult(target, resolved.model, prompt, max_tokens, ttft_target_s)
    # One unmeasured request first, as vLLM's benchmark_serving does: the first call pays for lazy loading and
    # kernel warm-up, which would otherwise land in the lowest concurrency level's figures.
    warmup_started = time.perf_counter()
    _stream_one(resolved, prompt, 1, 0, timeout_s)
    result.warmup_s = time.perf_counter() - warmup_started
    for level in concurrency:
        records, wall = _run_level(resolved, level, requests_per_level, max_tokens, prompt, timeout_s)
        result.records.extend(records)
        result.levels.append(summarize(level, records, wall))
    result.recommended_concurrency = recommend(result.levels, ttft_target_s)
    return result


def prompt_tokens_estimate(prompt: str) -> int:
    """Prompt tokens for the estimate: ~4 characters a token (English, BPE tokenizers) plus ~10 for the chat
    template's role headers. The estimate needs only the order of magnitude."""
    return max(1, round(len(prompt) / 4)) + 10


def add_costs(
    result: BenchmarkResult,
    price_per_hour: float,
    *,
    price_source: str = "",
    throughput_model: dict[str, Any] | None = None,
) -> None:
    """Each level's USD per 1M output tokens from what it measured at `price_per_hour`, and, given the plan's
    throughput model (Plan.throughput_model), the estimate for the same load beside it."""
    from vlp.components.planning.throughput import Workload, cost_per_million_output_tokens, estimate_from

    result.price_per_hour_usd = price_per_hour
    result.price_source = price_source
    for lv in result.levels:
        lv["cost_per_million_output_tokens_usd"] = cost_per_million_output_tokens(
            price_per_hour, lv["output_tokens_per_s"]
        )
        if throughput_model:
            answered = lv["requests"] - lv["errors"]
            out = round(lv["output_tokens"] / answered) if answered else result.max_tokens
            load = Workload(prompt_tokens_estimate(result.prompt), max(1, out), lv["concurrency"])
            est = estimate_from(throughput_model, load)
            lv["estimated_output_tokens_per_s"] = est.output_tokens_per_s
            lv["estimated_cost_per_million_output_tokens_usd"] = cost_per_million_output_tokens(
                price_per_hour, est.output_tokens_per_s
            )


def every_request_failed(result: BenchmarkResult) -> str:
    """The first error when no request of the run got an answer (a dead or unreachable target), else ""."""
    if result.records and not any(r.ok for r in result.records):
        return next((r.error for r in result.records if r.error), "no answer")[:300]
    return ""


def render_table(result: BenchmarkResult) -> str:
    """A fixed-width text table of the levels and the recommendation."""
    header = ["concurrency", "requests", "errors", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "output_tok/s", "wall_s"]
    costed = result.price_per_hour_usd is not None
    estimated = any("estimated_output_tokens_per_s" in lv for lv in result.levels)
    header += ["$/1M out"] if costed else []
    header += ["est tok/s", "est $/1M"] if estimated else []
    rows = []
    for lv in result.levels:
        row = [
            str(lv["concurrency"]),
            str(lv["requests"]),
            str(lv["errors"]),
            f"{lv['ttft_p50_s']:.3f}",
            f"{lv['ttft_p95_s']:.3f}",
            f"{lv['itl_p50_s'] * 1000:.1f}ms",
            f"{lv['output_tokens_per_s']:.1f}",
            f"{lv['wall_s']:.2f}",
        ]
        if costed:
            row.append(_usd(lv.get("cost_per_million_output_tokens_usd")))
        if estimated:
            row += [
                f"{lv.get('estimated_output_tokens_per_s', 0):.1f}",
                _usd(lv.get("estimated_cost_per_million_output_tokens_usd")),
            ]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if costed:
        lines.append(f"priced at ${result.price_per_hour_usd:.2f}/h ({result.price_source or 'given'})")
    failed = every_request_failed(result)
    if failed:
        lines.append(f"every request failed: {failed}. Nothing was measured: check the target is up and reachable")
    elif result.recommended_concurrency is None:
        lines.append(
            f"no level kept p95 TTFT under {result.ttft_target_s:g} s without errors: "
            "serve on more or bigger GPUs, or lower max_model_len / max_tokens"
        )
    else:
        lines.append(
            f"recommended concurrency: {result.recommended_concurrency} "
            f"(p95 TTFT <= {result.ttft_target_s:g} s, no errors)"
        )
    return "\n".join(lines)


def _usd(value: Any) -> str:
    return "" if value is None else ("inf" if value == math.inf else f"${value:,.2f}")


def _svg_axes(width: int, height: int, pad: int, x_label: str, y_label: str) -> list[str]:
    """An SVG's opening tag, its two axes and their labels: what every plot in the report starts with."""
    return [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
        "font-size='11'>",
        f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#444'/>",
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}' stroke='#444'/>",
        f"<text x='{width / 2}' y='{height - 16}' text-anchor='middle'>{x_label}</text>",
        f"<text x='16' y='{height / 2}' transform='rotate(-90 16 {height / 2})' text-anchor='middle'>{y_label}</text>",
    ]


def _svg_cost_plot(result: BenchmarkResult) -> str:
    """USD per 1M output tokens against concurrency: measured (blue) and the plan's estimate (grey)."""
    levels = [lv for lv in result.levels if lv.get("cost_per_million_output_tokens_usd") not in (None, math.inf)]
    if not levels:
        return ""
    width, height, pad = 560, 280, 56
    series = [("measured", "cost_per_million_output_tokens_usd", "#1a73e8")]
    if any("estimated_cost_per_million_output_tokens_usd" in lv for lv in levels):
        series.append(("estimated", "estimated_cost_per_million_output_tokens_usd", "#888"))
    ys = [lv[key] for _, key, _ in series for lv in levels if lv.get(key) not in (None, math.inf)]
    y_max = max(ys) * 1.15 or 1.0
    n = len(levels)

    def sx(i: int) -> float:
        return pad + (width - 2 * pad) * (i + 0.5) / n

    def sy(v: float) -> float:
        return height - pad - (height - 2 * pad) * v / y_max

    parts = _svg_axes(width, height, pad, "concurrency", "USD per 1M output tokens")
    for i in range(5):
        yv = y_max * i / 4
        parts.append(f"<text x='{pad - 6}' y='{sy(yv) + 4:.1f}' text-anchor='end'>{yv:,.2f}</text>")
    for i, lv in enumerate(levels):
        parts.append(f"<text x='{sx(i):.1f}' y='{height - pad + 14}' text-anchor='middle'>{lv['concurrency']}</text>")
    for k, (name, key, colour) in enumerate(series):
        points = [(sx(i), sy(lv[key])) for i, lv in enumerate(levels) if lv.get(key) not in (None, math.inf)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f"<polyline points='{path}' fill='none' stroke='{colour}'/>")
        for x, y in points:
            parts.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='4' fill='{colour}'/>")
        parts.append(f"<text x='{width - pad}' y='{pad + 14 * k}' text-anchor='end' fill='{colour}'>{name}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _svg_plot(result: BenchmarkResult) -> str:
    """Latency (p95 TTFT) against throughput (output tokens/s), one labelled point per concurrency level."""
    width, height, pad = 560, 320, 56
    levels = result.levels
    xs = [lv["output_tokens_per_s"] for lv in levels] or [0.0]
    ys = [lv["ttft_p95_s"] for lv in levels] + [result.ttft_target_s]
    x_max = max(xs) * 1.15 or 1.0
    y_max = max(ys) * 1.15 or 1.0

    def sx(v: float) -> float:
        return pad + (width - 2 * pad) * v / x_max

    def sy(v: float) -> float:
        return height - pad - (height - 2 * pad) * v / y_max

    parts = _svg_axes(width, height, pad, "output tokens/s", "p95 time to first token (s)")
    for i in range(5):
        xv, yv = x_max * i / 4, y_max * i / 4
        parts.append(f"<text x='{sx(xv):.1f}' y='{height - pad + 14}' text-anchor='middle'>{xv:.1f}</text>")
        parts.append(f"<text x='{pad - 6}' y='{sy(yv) + 4:.1f}' text-anchor='end'>{yv:.2f}</text>")
    ty = sy(result.ttft_target_s)
    parts.append(
        f"<line x1='{pad}' y1='{ty:.1f}' x2='{width - pad}' y2='{ty:.1f}' stroke='#d93025' stroke-dasharray='5,4'/>"
    )
    parts.append(
        f"<text x='{width - pad}' y='{ty - 4:.1f}' text-anchor='end' fill='#d93025'>"
        f"target {result.ttft_target_s:g} s</text>"
    )
    points = [(sx(lv["output_tokens_per_s"]), sy(lv["ttft_p95_s"]), lv) for lv in levels]
    if len(points) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        parts.append(f"<polyline points='{path}' fill='none' stroke='#1a73e8'/>")
    for x, y, lv in points:
        colour = "#1e8e3e" if lv["concurrency"] == result.recommended_concurrency else "#1a73e8"
        parts.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='4' fill='{colour}'/>")
        parts.append(f"<text x='{x + 6:.1f}' y='{y - 6:.1f}'>c={lv['concurrency']}</text>")
    parts.append("</svg>")
    return "".join(parts)


def render_html(result: BenchmarkResult, fragment: bool = False) -> str:
    """The report: the plot (inline SVG), the table and the recommendation; `fragment` omits <html>."""
    cols = [*SUMMARY_KEYS, "requests", "wall_s"]
    cols += [
        c
        for c in (
            "cost_per_million_output_tokens_usd",
            "estimated_output_tokens_per_s",
            "estimated_cost_per_million_output_tokens_usd",
        )
        if any(c in lv for lv in result.levels)
    ]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:right'>{html.escape(str(lv.get(c, '')))}</td>" for c in cols) + "</tr>"
        for lv in result.levels
    )
    if result.recommended_concurrency is None:
        verdict = f"No level kept p95 TTFT under {result.ttft_target_s:g} s without errors."
    else:
        verdict = (
            f"Recommended concurrency: <b>{result.recommended_concurrency}</b> "
            f"(p95 TTFT &le; {result.ttft_target_s:g} s, no errors)."
        )
    errors = [r.error for r in result.records if not r.ok][:5]
    error_html = "".join(f"<li><code>{html.escape(e)}</code></li>" for e in errors)
    section = (
        "<h2>Load benchmark</h2>"
        f"<p>Target <code>{html.escape(result.target)}</code>, model <code>{html.escape(result.model)}</code>, "
        f"{result.max_tokens} max tokens per answer, closed loop.</p>"
        f"{_svg_plot(result)}"
        + (
            f"<p>Cost per token at ${result.price_per_hour_usd:.2f}/h ({html.escape(result.price_source)}): "
            "measured, and the plan's estimate for the same load.</p>" + _svg_cost_plot(result)
            if result.price_per_hour_usd is not None
            else ""
        )
        + f"<table border='1' cellspacing='0' cellpadding='4'><tr>{head}</tr>{body}</table><p>{verdict}</p>"
        + (f"<p>First errors:</p><ul>{error_html}</ul>" if error_html else "")
    )
    if fragment:
        return section
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Load benchmark</title></head>"
        f"<body style='font-family:sans-serif'>{section}</body></html>"
    )


def log_benchmark_metrics(result: BenchmarkResult, metrics: Any) -> None:
    """Writes each level's figures to a KFP Metrics artifact as bench_c<N>_<figure>."""
    for lv in result.levels:
        for key in SUMMARY_KEYS[1:]:
            metrics.log_metric(f"bench_c{lv['concurrency']}_{key}", float(lv[key]))
        for key in ("cost_per_million_output_tokens_usd", "estimated_cost_per_million_output_tokens_usd"):
            if key in lv and lv[key] != math.inf:
                metrics.log_metric(f"bench_c{lv['concurrency']}_{key}", float(lv[key]))
    if result.recommended_concurrency is not None:
        metrics.log_metric("bench_recommended_concurrency", result.recommended_concurrency)
