"""Fixes for kfp 2.17's local runner, applied only by `vlp run --local`; Vertex AI Pipelines needs none.

kfp.local resolves a dsl.If condition operand such as `pipelinechannel--preflight-op-action` only when
the upstream task has a single output named `Output`; for a named output of a multi-output task it looks
for a parent input of that name, finds none, and evaluates the condition on None, so the branch never
runs. The compiled spec is right (Vertex runs it); the fix teaches the local resolver the task-output form.
"""

from __future__ import annotations

from typing import Any

_applied = False


def apply() -> None:
    """Patch kfp.local's condition resolver once per process."""
    global _applied
    if _applied:
        return
    from kfp.local.orchestrator import enhanced_dag_orchestrator as eo

    original = eo.ConditionEvaluator._resolve_pipeline_channel

    def resolve(channel_ref: str, io_store: Any) -> Any:
        ref = channel_ref.replace("pipelinechannel--", "")
        if "-Output" not in ref and "--" not in ref:
            for key in (ref, channel_ref):
                try:
                    return io_store.get_parent_input(key)
                except (ValueError, KeyError):
                    pass
            # "<task-name>-<output_name>": try each dash from the right as the split point.
            for i in range(len(ref) - 1, 0, -1):
                if ref[i] != "-":
                    continue
                try:
                    return io_store.get_task_output(ref[:i], ref[i + 1 :])
                except (ValueError, KeyError):
                    continue
        return original(channel_ref, io_store)

    eo.ConditionEvaluator._resolve_pipeline_channel = staticmethod(resolve)

    # kfp.local turns a step's exit status into SUCCESS/FAILURE and drops it; the run summary says how a step
    # died (a signal, an exit code): add it to the step's record, and print it where the step's output ends.
    import os

    from kfp.local import subprocess_task_handler as sth

    from vlp.pipelines.local import interrupts, step_records

    def run_and_report(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        # kfp.local's own call, in a session of its own so that SIGINT/SIGTERM reach the runner first
        # (pipelines/local/interrupts.py).
        env = {**os.environ, **env_vars} if env_vars else None
        code = interrupts.run_step(full_command, env, step_records.op_of(full_command))
        if code:
            print(f"[vlp] step process exited with code {code}", flush=True)
            step_records.add_exit_code(os.environ.get(step_records.ENV_DIR, ""), full_command, code)
        return code

    sth.run_local_subprocess = run_and_report

    # The big-model mirror is GCPC's custom-job launcher, a container component kfp.local does not run. Two steps make
    # it run locally as on Vertex: (1) the placeholder Vertex resolves inside the job's worker pool spec,
    # `{{$.json_escape[1]}}` (the task's executor input as JSON, escaped once to sit inside the payload's JSON string:
    # google_cloud_pipeline_components v1/custom_job/utils.py _replace_executor_placeholder), which kfp.local leaves
    # as text; (2) the launcher's module becomes vlp's stand-in for its image (pipelines/local/gcpc_launcher.py),
    # which runs GCPC's own launcher code against the local stack.
    import json

    from kfp.local import placeholder_utils

    from vlp.pipelines.local.gcpc_launcher import GCPC_LAUNCHER

    replace_placeholders = placeholder_utils.replace_placeholders
    json_escape_1 = "{{$.json_escape[1]}}"

    def replace(full_command: list[str], executor_input_dict: dict[str, Any], *args: Any, **kwargs: Any) -> list[str]:
        if GCPC_LAUNCHER in full_command[:4]:
            # GCPC's default for the job's persistent_resource_id is the PipelineJob's own, which Vertex resolves
            # (empty for a job that names none, as every local run is); kfp.local fails on the placeholder.
            values = executor_input_dict.get("inputs", {}).get("parameterValues", {})
            for key, value in values.items():
                if value == "{{$.pipeline_persistent_resource_id}}":
                    values[key] = ""
                elif isinstance(value, list | dict):
                    # A list or struct parameter holds protobuf Values, whose numbers are doubles; Vertex writes a
                    # whole one into the payload as `100` (proto3 JSON), kfp.local as `100.0`, which the job's int64
                    # fields (replica_count, boot_disk_size_gb) refuse.
                    values[key] = _whole_numbers_as_ints(value)
        command = replace_placeholders(full_command, executor_input_dict, *args, **kwargs)
        if GCPC_LAUNCHER not in command[:4]:
            return command
        escaped = json.dumps(json.dumps(executor_input_dict))[1:-1]
        command = [part.replace(json_escape_1, escaped) for part in command]
        return [("vlp.pipelines.local.gcpc_launcher" if part == GCPC_LAUNCHER else part) for part in command]

    placeholder_utils.replace_placeholders = replace

    # kfp parses the compiled spec with PyYAML's pure-Python loader: ~1 s of CPU for every local run, a tenth of a
    # no-op run. libyaml's loader of the same (safe) schema gives the same documents, where PyYAML has it.
    import yaml
    from kfp.dsl import structures

    if getattr(yaml, "__with_libyaml__", False):

        def load_documents(component_yaml: str) -> tuple[dict, dict]:
            documents = list(yaml.load_all(component_yaml, Loader=yaml.CSafeLoader))
            if len(documents) not in (1, 2):
                raise ValueError(f"Expected one or two YAML documents in the IR YAML file. Got: {len(documents)}.")
            return documents[0], (documents[1] if len(documents) == 2 else {})

        structures.load_documents_from_yaml = load_documents
    _applied = True


def _whole_numbers_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_numbers_as_ints(v) for k, v in value.items()}
    return value
