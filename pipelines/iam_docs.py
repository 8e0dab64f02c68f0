"""The policy of components/iam/policy.py for people: the tables docs/iam.md shows between its `policy` markers
(tests/test_iam.py keeps the two equal). Kept out of components/ so the steps do not carry it: kfp passes a step's
code as one command-line argument, which Linux caps at 128 KiB."""

from __future__ import annotations

import json
from pathlib import Path

from vlp.components.iam.policy import APIS, RULES

# The identities, in the user's words.
IDENTITIES = {
    "pipeline": "pipeline SA: the account the pipeline runs as (`placement.service_account`); every step of a "
    "Vertex AI pipeline runs as it, and so does a Vertex endpoint's model server (vlp deploys it as this account)",
    "runtime": "Cloud Run runtime SA: the account a revision runs as (`cloud_run.service_account`, else the "
    "pipeline SA)",
    "vertex_agent": "Vertex AI Service Agent (`service-PROJECT_NUMBER@gcp-sa-aiplatform.iam.gserviceaccount.com`)",
    "custom_code_agent": "Vertex AI Custom Code Service Agent "
    "(`service-PROJECT_NUMBER@gcp-sa-aiplatform-cc.iam.gserviceaccount.com`)",
    "submitter": "submitter: whoever starts runs or creates schedules (a person, CI, Cloud Build)",
    "publisher": "publisher: whoever runs `vlp publish` (usually CI)",
}
# What Google grants the service agents on the project when the Vertex AI API is enabled
# (vertex-ai/docs/general/access-control, "Service agents"): the policy adds only what these lack.
AUTOMATIC = {
    "vertex_agent": "`roles/aiplatform.serviceAgent` on the project, granted by Google: it holds the bucket reads "
    "a Model's `artifactUri` upload needs (`storage.objects.get/list`)",
    "custom_code_agent": "`roles/aiplatform.customCodeServiceAgent` on the project, granted by Google: it holds "
    "object read and write in the project's buckets and reads its Artifact Registry repositories",
}
# Where a role is granted.
SCOPES = {
    "project": "the project",
    "bucket": "the bucket",
    "secret": "the Hub token secret",
    "pipeline_sa": "the pipeline SA",
    "runtime_sa": "the runtime SA",
    "kfp_repository": "the KFP template repository (Artifact Registry)",
    "image_repository": "the component image's Docker repository",
    "serving_repository": "the Docker Hub remote repository `vlp-docker-hub` (each multi-region `vlp setup` creates)",
}
# When a rule applies (empty: always).
CONDITIONS = {
    "": "always",
    "vertex": "`target: vertex`",
    "cloud_run": "`target: cloud_run`",
    "gated": "`model.hf_token_secret` is set",
    "runtime_separate": "`cloud_run.service_account` is another account",
    "templates": "runs from a template tag (console, `--template-uri` schedules)",
    "image": "steps compiled with `--image`",
    "cloud_run_docker_hub": "`target: cloud_run` and the serving image is on Docker Hub (vLLM's own)",
}


def markdown() -> str:
    """The policy as the tables docs/iam.md shows between its `policy` markers (tests keep the two equal)."""
    lines: list[str] = []
    for who, title in IDENTITIES.items():
        rules = [r for r in RULES if r.who == who]
        lines += [f"### {title[0].upper()}{title[1:]}", ""]
        if who in AUTOMATIC:
            lines += [f"Already holds {AUTOMATIC[who]}." + ("" if rules else " vlp grants it nothing more."), ""]
        if not rules:
            continue
        lines += ["| Role | On | When | Steps | Why |", "|---|---|---|---|---|"]
        for r in rules:
            lines.append(f"| `{r.role}` | {SCOPES[r.on]} | {CONDITIONS[r.when]} | {r.steps} | {r.why} |")
        lines.append("")
    lines += ["### APIs `vlp setup` enables", "", "| Target | APIs |", "|---|---|"]
    lines += [f"| `{target}` | {', '.join(f'`{a}`' for a in apis)} |" for target, apis in APIS.items()]
    return "\n".join(lines).rstrip() + "\n"


def fix_for(permission: str, who: str = "submitter") -> str:
    """The role of the policy that holds `permission` (for `who` first, then any identity), said for people."""
    roles = json.loads(
        (Path(__file__).resolve().parent.parent / "components" / "contract" / "gcp-iam.json").read_text()
    )
    held = [r for r in RULES if permission in roles["roles"].get(r.role, [])]
    held.sort(key=lambda r: r.who != who)
    if not held:
        return ""
    rule = held[0]
    return (
        f"grant {rule.role} on {SCOPES[rule.on]} to the {IDENTITIES[rule.who].split(':')[0]} (docs/iam.md; "
        "`vlp setup --dry-run` prints the gcloud lines)"
    )
