"""Publish compiled pipeline templates to an Artifact Registry Kubeflow Pipelines repository, so a person can
start a run from the Vertex AI console form and a schedule can follow the `latest` tag."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.components.config import ConfigError
from vlp.pipelines.compile import IMAGE_SUFFIX

_TAG_RE = re.compile(r"[^a-z0-9-]")


@dataclass
class Published:
    """One uploaded template: the package (the pipeline's name), its version (sha256:...) and tags."""

    file: str
    package: str
    version: str
    tags: list[str]
    host: str

    def template_uri(self, tag: str | None = None) -> str:
        """The URI the console, `PipelineJob(template_path=...)` and `vlp schedule create --template-uri` take."""
        return f"{self.host}/{self.package}/{tag or self.tags[0]}"


def registry_host(project: str, region: str, repository: str) -> str:
    """The Kubeflow Pipelines host of an Artifact Registry repository (format kfp)."""
    missing = [n for n, v in (("--project", project), ("--region", region), ("--repository", repository)) if not v]
    if missing:
        raise ConfigError(f"publish needs {', '.join(missing)} (or --host https://REGION-kfp.pkg.dev/PROJECT/REPO)")
    return f"https://{region}-kfp.pkg.dev/{project}/{repository}"


def project_version() -> str:
    """The installed distribution's version, the tag a template is published under by default."""
    import importlib.metadata

    return importlib.metadata.version("vertex-llm-pipelines")


def normalize_tag(tag: str) -> str:
    """A tag Artifact Registry accepts: lowercase letters, digits and dashes, starting with a letter
    (git tags like v0.1.0 become v0-1-0; a bare version 0.1.0 becomes v0-1-0 too)."""
    cleaned = _TAG_RE.sub("-", tag.strip().lower()).strip("-")
    if not cleaned:
        raise ConfigError(f"tag {tag!r} has no letters or digits")
    if not cleaned[0].isalpha():
        cleaned = f"v{cleaned}"
    if cleaned.startswith("sha256"):
        raise ConfigError(f"tag {tag!r}: tags may not start with sha256 (that is how versions are named)")
    return cleaned[:128]


def template_files(compiled_dir: Path | None = None) -> list[Path]:
    """The compiled specs `vlp publish` uploads by default: every template in compiled/ (the generic one and
    one per preset; with --image variants, those too)."""
    from vlp.pipelines.compile import COMPILED_DIR

    directory = compiled_dir or COMPILED_DIR
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise ConfigError(f"no compiled templates in {directory}: run `vlp compile` first")
    return files


def tags_for(file: Path, tags: list[str]) -> list[str]:
    """Tags for one file: the prebuilt-image variant shares the pipeline's name (so its package) and gets
    its own tags, latest-image and so on, so it never replaces the default template's `latest`."""
    suffix = "-image" if file.name.endswith(IMAGE_SUFFIX) else ""
    return [f"{t}{suffix}" for t in tags]


def publish_templates(
    host: str,
    files: list[Path],
    tags: list[str],
    auth: Any = None,
) -> list[Published]:
    """Upload each compiled template with the tags (each file once; AR moves a tag that already exists).
    `auth` is a requests AuthBase or google credentials; None means Application Default Credentials for
    an Artifact Registry host."""
    import google.auth.exceptions
    import requests
    from kfp.registry import RegistryClient

    clean = list(dict.fromkeys(normalize_tag(t) for t in tags))
    if not clean:
        raise ConfigError("give at least one tag")
    try:
        client = RegistryClient(host=host, auth=auth)
    except google.auth.exceptions.DefaultCredentialsError:
        raise ConfigError(
            f"no Google credentials to publish to {host}: run `gcloud auth application-default login`, "
            "or in CI authenticate first (google-github-actions/auth)"
        ) from None
    published = []
    for file in files:
        if not file.is_file():
            raise ConfigError(f"{file} not found: run `vlp compile` first")
        file_tags = tags_for(file, clean)
        try:
            package, version = client.upload_pipeline(file_name=str(file), tags=file_tags)
        except requests.HTTPError as exc:
            raise RuntimeError(_upload_failure(host, file, exc)) from None
        except requests.ConnectionError:
            raise RuntimeError(f"could not reach {host} to upload {file}: check --host / the region") from None
        published.append(Published(str(file), package, version, file_tags, host.rstrip("/")))
    return published


def _upload_failure(host: str, file: Path, exc: Any) -> str:
    status = exc.response.status_code if exc.response is not None else 0
    base = f"uploading {file} to {host} failed (HTTP {status})"
    if status == 403:
        return (
            f"{base}: the caller may not write to the repository. Grant it roles/artifactregistry.writer on the "
            "repository (docs/iam.md)."
        )
    if status == 404:
        m = re.match(r"https://(?P<region>[\w-]+)-kfp\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)", host)
        create = (
            f"gcloud artifacts repositories create {m['repo']} --repository-format=kfp --location={m['region']} "
            f"--project={m['project']}"
            if m
            else "create a Kubeflow Pipelines (format kfp) repository"
        )
        return f"{base}: the repository does not exist. Create it once: {create}"
    detail = exc.response.text[:300] if exc.response is not None else str(exc)
    return f"{base}: {detail}"
