"""The run summary every run ends with: one dict, printed for people and written as JSON for CI."""

from __future__ import annotations

from typing import Any


def empty_summary() -> dict[str, Any]:
    """Every key the summary promises, with the values of a run that did nothing yet."""
    return {
        "status": "failed",
        "error": None,
        "steps": [],
        "model": {"resource_name": None, "version_id": None},
        "endpoint": None,
        "deployed_models": [],
        "smoke": {"passed": None, "answer": None, "latency_s": None},
        "created": [],
        "deleted": [],
        "left_running": [],
    }


def print_summary(summary: dict[str, Any]) -> None:
    """A readable end-of-run report."""
    status = summary["status"]
    print()
    print(f"== vlp run {status.upper()} ==")
    if summary.get("error"):
        print(f"error: {summary['error']}")
    failed = summary.get("failed_step")
    if failed:
        print(f"last lines of {failed['name']} (full log: {failed['log']}):")
        for line in failed["last_lines"]:
            print(f"  | {line.strip()[:200]}")
    if summary.get("removed_by_exit_handler"):
        print("the exit handler removed: " + ", ".join(summary["removed_by_exit_handler"]))
    for step in summary.get("steps", []):
        secs = step.get("seconds")
        print(f"  {step['name']:<20} {step['status']:<10} {'' if secs is None else f'{secs:6.1f}s'}")
    model = summary.get("model") or {}
    if model.get("resource_name"):
        print(f"model:    {model['resource_name']} (version {model.get('version_id')})")
    if summary.get("endpoint"):
        print(f"endpoint: {summary['endpoint']}")
    for dm in summary.get("deployed_models", []):
        print(f"  deployed model {dm['id']}: {dm['model']} at {dm['traffic_percent']}%")
    if summary.get("service"):
        print(f"service:  {summary['service']}")
        if summary.get("service_url"):
            print(f"  URL {summary['service_url']}")
    for rev in summary.get("revisions", []):
        print(
            f"  revision {rev['name']} at {rev['traffic_percent']}%"
            + (f" (tag {rev['tag']})" if rev.get("tag") else "")
        )
    smoke = summary.get("smoke") or {}
    if smoke.get("answer") is not None:
        verdict = "passed" if smoke.get("passed") else "failed"
        print(f"smoke test {verdict} in {smoke.get('latency_s')}s: {smoke['answer']!r}")
    for level in smoke.get("benchmark") or []:
        print(
            f"  benchmark c={level.get('concurrency')}: {level.get('output_tokens_per_s', 0):.1f} output tokens/s, "
            f"TTFT p50 {level.get('ttft_p50_s', 0):.2f} s, {level.get('errors', 0)} errors"
        )
    if smoke.get("benchmark_skipped"):
        print(f"benchmark skipped: {smoke['benchmark_skipped']}")
    if summary.get("report"):
        print(f"report:   {summary['report']}")
    for key in ("created", "deleted", "left_running"):
        if summary.get(key):
            print(f"{key.replace('_', ' ')}: " + ", ".join(summary[key]))
    if "api_calls" in summary:
        print(f"{len(summary['api_calls'])} Google API calls (see --summary-json for the list)")
    if summary.get("log_dir"):
        print(f"step logs: {summary['log_dir']}/STEP.log")
    if summary.get("stack"):
        print(summary["stack"])
