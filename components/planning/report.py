"""Renders a preflight plan for people: a text table for `vlp plan` and Markdown for the pipeline's report artifact."""

from __future__ import annotations

from typing import Any

GB = 1_000_000_000
THROUGHPUT_NOTE = (
    "a roofline estimate (components/planning/throughput.py) calibrated on published TensorRT-LLM rows, within 0.7-1.4x of "
    "them; vLLM and TGI usually run below TensorRT-LLM. `vlp bench` measures the real figure."
)


def _d(plan: Any) -> dict[str, Any]:
    return plan if isinstance(plan, dict) else plan.to_dict()


def _seconds(value: float) -> str:
    """A latency a person reads: milliseconds below a tenth of a second (a tiny model's TTFT is not 0.00 s)."""
    return f"{value * 1000:.0f} ms" if value < 0.1 else f"{value:.2f} s"


def _queued(t: dict[str, Any], w: dict[str, Any]) -> str:
    """Why some requests in flight wait: the KV cache or max_num_seqs caps the batch."""
    asked, batch = w.get("concurrency"), t["concurrency"]
    if t.get("bound") == "max_num_seqs":
        return f"; serving.max_num_seqs caps the batch at {batch} of the {asked} in flight: the rest queue"
    return f"; the KV cache holds only {batch} of the {asked} sequences in flight: the rest queue"


def _dtypes(p: dict[str, Any]) -> str:
    """The checkpoint's dtype as stored: its config's torch_dtype, and the weights' own dtypes by share when they
    differ (an FP8 checkpoint's config says bfloat16, the compute dtype, while most of its bytes are F8_E4M3)."""
    declared = p.get("dtype") or "?"
    stored = {k: v for k, v in (p.get("weight_dtypes") or {}).items() if v}
    total = sum(stored.values())
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    if not total or set(stored) <= {k for k, v in names.items() if v == declared}:
        return declared
    shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(stored.items(), key=lambda kv: -kv[1]))
    return f"{declared} (weights stored as {shares})"


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _num(n: int) -> str:
    return f"{n:,}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def _model_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    rev = p.get("revision") or ""
    sha = p.get("revision_sha") or ""
    where = f"{p['model']}" + (f" @ {rev}" if rev else "") + (f" ({sha[:12]})" if sha and sha != rev else "")
    quant = p.get("quantization") or "none"
    if p.get("quant_detail") and p.get("quant_detail") != quant:
        quant = f"{quant} ({p['quant_detail']})"
    arch = p.get("architecture") or p.get("model_type") or "?"
    extras = []
    if p.get("moe_experts"):
        extras.append(f"{p['moe_experts']} experts")
    if p.get("vision"):
        extras.append("vision tower")
    return [
        ("model", where),
        ("architecture", arch + (f" ({', '.join(extras)})" if extras else "")),
        (
            "weights",
            f"{_gb(p['weights_bytes'])} ({p.get('weights_source', '')}), {_params(p['params'])} params, "
            f"dtype {_dtypes(p)}, quantization {quant}",
        ),
        (
            "layout",
            f"{p['layers']} layers, {p['kv_heads']} KV heads x {p['head_dim']} head dim, "
            f"context {_num(p['context_length'])} tokens",
        ),
        ("chat template", "yes" if p.get("has_chat_template") else "NO"),
        ("gated", ("yes" if p.get("gated") else "no") + (f", access {p['access']}" if p.get("access") != "ok" else "")),
    ]


def _memory_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    m = p.get("memory") or {}
    if not m:
        return []
    rows = [
        ("GPU memory", f"{_gb(m['gpu_memory'])} x {m['utilization']} = {_gb(m['budget'])} for the engine"),
        ("weights", _gb(m["weights"])),
        ("activations", _gb(m["activations"])),
        ("CUDA graphs", _gb(m["cuda_graphs"])),
        ("runtime", _gb(m["non_torch"])),
    ]
    if m.get("vision_encoder"):
        rows.append(("vision encoder", f"{_gb(m['vision_encoder'])} (profiling, scales with max_num_seqs)"))
    rows.append(
        (
            "KV cache",
            f"{_gb(max(0, m['kv_cache']))} = {_num(m['kv_tokens'])} tokens at {_num(m['kv_bytes_per_token'])} B/token",
        )
    )
    return rows


def _shape_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    if not p.get("machine_type"):
        return [("shape", "none fits")]
    price = f"${p['price_per_hour_usd']:.2f}/h" + (" (estimate)" if p.get("price_estimated") else "")
    lim = p.get("limits") or {}
    return [
        (
            "shape",
            f"{p['machine_type']}: {p['accelerator_count']} x {p['accelerator_type']}"
            f" ({p.get('accelerator_memory_gb', 0):g} GB each), {p['node_count']} node(s), "
            f"replicas {p['replica_count']}-{p['max_replica_count']}" + (", spot" if p.get("spot") else ""),
        ),
        ("parallelism", f"tensor {p['tensor_parallel_size']} x pipeline {p['pipeline_parallel_size']}"),
        ("max_model_len", f"{_num(p['max_model_len'])} (largest that fits: {_num(lim.get('max_model_len', 0))})"),
        (
            "max_num_seqs",
            f"{p['max_num_seqs']} (largest that fits: {lim.get('max_num_seqs', 0)}); "
            f"{lim.get('concurrent_sequences', 0)} full-length sequences fit in the KV cache at once",
        ),
        ("price", price),
        *_throughput_rows(p),
        ("why", p.get("reason", "")),
        ("fits", "yes" if p.get("fits") else "NO"),
    ]


def _throughput_rows(p: dict[str, Any]) -> list[tuple[str, str]]:
    t = p.get("throughput") or {}
    if not t:
        return []
    w = p.get("workload") or {}
    flight = "as many as the KV cache holds" if w.get("concurrency") == "max" else f"{w.get('concurrency')} in flight"
    return [
        ("workload", f"{_num(t['input_tokens'])} tokens in, {_num(t['output_tokens'])} out, {flight}"),
        (
            "estimate",
            f"~{t['output_tokens_per_s']:,.0f} output tokens/s at {t['concurrency']} sequences, "
            f"TTFT {_seconds(t['ttft_s'])}, {t['itl_s'] * 1000:.0f} ms/token ({t['bound']}-bound)"
            + ("" if t.get("holds_workload", True) else _queued(t, w)),
        ),
        ("cost", f"${p.get('cost_per_million_output_tokens_usd', 0):.2f} per 1M output tokens"),
    ]


_ALT_HEADERS = ["shape", "parallel", "price", "tokens/s", "ms/token", "$/1M out", "max len", "KV tokens"]


def _alt_rows(p: dict[str, Any]) -> list[list[str]]:
    rows = []
    for a in p.get("alternatives") or []:
        t = a.get("throughput") or {}
        cost = a.get("cost_per_million_output_tokens_usd")
        rows.append(
            [
                a["shape"],
                f"TP {a['tensor_parallel_size']} x PP {a['pipeline_parallel_size']}",
                f"${a['price_per_hour_usd']:.2f}/h",
                f"{t['output_tokens_per_s']:,.0f}" if t else "",
                f"{t['itl_s'] * 1000:.0f}" if t else "",
                f"${cost:.2f}" if cost is not None else "",
                _num(a["max_model_len_limit"]),
                _num(a["kv_cache_tokens"]),
            ]
        )
    return rows


def _quota_rows(p: dict[str, Any]) -> list[list[str]]:
    rows = []
    for region, q in (p.get("quota") or {}).items():
        mark = "ok" if q.get("ok") else ("?" if q.get("ok") is None else "SHORT")
        limit = "unknown" if q.get("limit") is None else str(q["limit"])
        rows.append(
            [
                region,
                q.get("quota_id", ""),
                limit,
                str(q.get("usage", 0)),
                str(q.get("need", 0)),
                mark,
                q.get("note", ""),
            ]
        )
        for c in q.get("companions") or []:
            climit = "unknown" if c.get("limit") is None else str(c["limit"])
            cmark = "ok" if c.get("ok") else ("?" if c.get("ok") is None else "SHORT")
            rows.append(["", c["quota_id"], climit, str(c.get("usage", 0)), str(c.get("need", 0)), cmark, ""])
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def _kv(rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def render_table(plan: Any) -> str:
    """The plan as plain text for a terminal: model, memory per GPU, shape, alternatives, quota, warnings."""
    p = _d(plan)
    if p.get("errors") and not (p.get("weights_bytes") or p.get("params")):
        # Nothing was read about the model (no access, no such directory): only what went wrong, not a table of
        # zeros and "access denied" above it.
        return "\n".join([f"Cannot plan {p.get('model')}:"] + [f"  - {e}" for e in p["errors"]])
    parts = ["Model", _kv(_model_rows(p))]
    mem = _memory_rows(p)
    if mem:
        parts += ["", "Memory per GPU", _kv(mem)]
    engine = f"engine {p.get('engine')} {p.get('engine_version') or ''}".rstrip()
    parts += ["", f"Shape ({p.get('hardware_mode', 'auto')}, {engine})", _kv(_shape_rows(p))]
    if p.get("serving_image"):
        parts.append(f"  image  {p['serving_image']}")
    alts = _alt_rows(p)
    if alts:
        parts += ["", "Alternatives that fit", _table(_ALT_HEADERS, alts)]
    if p.get("rejected"):
        parts += ["", "Too small"] + [f"  {r['shape']}: {r['reason']}" for r in p["rejected"]]
    quota = _quota_rows(p)
    if quota:
        title = f"Quota (chosen region: {p.get('region') or 'none'})"
        parts += ["", title, _table(["region", "quota", "limit", "in use", "need", "", "note"], quota)]
    if p.get("warnings"):
        parts += ["", "Warnings"] + [f"  - {w}" for w in p["warnings"]]
    if p.get("errors"):
        parts += ["", "Errors"] + [f"  - {e}" for e in p["errors"]]
    parts += ["", f"Prices: {p.get('prices_note', '')}", f"Throughput: {THROUGHPUT_NOTE}"]
    return "\n".join(parts) + "\n"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(
        ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in esc]
    )


def render_markdown(plan: Any) -> str:
    """The plan as Markdown for the pipeline's report artifact (dsl.Markdown)."""
    p = _d(plan)
    verdict = "fits" if p.get("fits") and not p.get("errors") else "does NOT fit"
    parts = [
        f"# Preflight plan: {p['model']}",
        "",
        f"**{verdict}**" + (f" on `{p['machine_type']}`" if p.get("machine_type") else ""),
    ]
    if p.get("errors"):
        parts += ["", "## Errors", ""] + [f"- {e}" for e in p["errors"]]
    parts += ["", "## Model", "", _md_table(["", ""], [[k, v] for k, v in _model_rows(p)])]
    mem = _memory_rows(p)
    if mem:
        parts += ["", "## Memory per GPU", "", _md_table(["", ""], [[k, v] for k, v in mem])]
    parts += ["", "## Shape", "", _md_table(["", ""], [[k, v] for k, v in _shape_rows(p)])]
    alts = _alt_rows(p)
    if alts:
        parts += [
            "",
            "## Alternatives that fit",
            "",
            _md_table(_ALT_HEADERS, alts),
        ]
    if p.get("rejected"):
        parts += ["", "## Too small", ""] + [f"- {r['shape']}: {r['reason']}" for r in p["rejected"]]
    quota = _quota_rows(p)
    if quota:
        parts += [
            "",
            f"## Quota (chosen region: {p.get('region') or 'none'})",
            "",
            _md_table(["region", "quota", "limit", "in use", "need", "", "note"], quota),
        ]
    if p.get("warnings"):
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in p["warnings"]]
    parts += ["", f"_Prices: {p.get('prices_note', '')}_", "", f"_Throughput: {THROUGHPUT_NOTE}_", ""]
    return "\n".join(parts)


def render_cloud_run(plan: Any) -> str:
    """The Cloud Run part of a plan: the instance, its prices (per second and hour, dated) and the quota per region."""
    p = _d(plan)
    run = p.get("cloud_run") or {}
    if not run:
        return ""
    lines = [
        "",
        "Cloud Run",
        f"  instance: 1 x {run['gpu_type']}, {run['cpu']} CPU, {run['memory']}, "
        f"{'with' if run['zonal_redundancy'] else 'without'} zonal redundancy; weights: {run['weights']}",
        f"  instances: {run['min_instances']}..{run['max_instances']}, {run['concurrency']} requests each",
        f"  price: ${run['price_per_second_usd']:.7f}/s = ${run['price_per_hour_usd']:.2f}/h per instance; "
        f"${run['idle_price_per_hour_usd']:.2f}/h idle, ${run['max_price_per_hour_usd']:.2f}/h at max instances",
        f"  prices: {run['prices_note']}",
        f"  regions offering {run['gpu_type']}: {', '.join(run['regions_offering_gpu'])}",
    ]
    for region, q in (p.get("quota") or {}).items():
        for c in [q, *q.get("companions", [])]:
            state = "ok" if c.get("ok") else ("unknown" if c.get("ok") is None else "SHORT")
            limit = "unknown" if c.get("limit") is None else c["limit"]
            lines.append(
                f"  quota {region}: {c['quota_id']} limit {limit}, in use {c['usage']}, need {c['need']} -> {state}"
            )
    return "\n".join(lines) + "\n"
