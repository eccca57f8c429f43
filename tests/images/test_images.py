"""Images and CI files, checked without a Docker engine or a cluster."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((REPO / "images").glob("*.Dockerfile"))


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in this environment")
    return str(path)


def test_dockerfiles_exist_for_each_image() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"downloader.Dockerfile", "gpu.Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    proc = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(dockerfile: Path) -> None:
    """Non-root numeric user, pinned base, writable HOME/TMPDIR, trajflow entrypoint, OCI labels."""
    text = dockerfile.read_text()
    assert re.search(r"^USER \d+:\d+$", text, re.M), "final stage must run as a numeric non-root UID"
    for arg in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M):
        assert ":" in arg and not arg.endswith(":latest"), f"base image {arg} is not pinned"
    assert "HOME=/tmp" in text and "TMPDIR=/tmp" in text
    assert 'ENTRYPOINT ["trajflow"]' in text
    assert "org.opencontainers.image.version" in text
    assert text.count("FROM ") >= 2, "multi-stage: build the wheel, install only the wheel"


def test_the_gpu_image_can_build_triton_launchers() -> None:
    """Triton compiles a C launcher before its first kernel runs: without a compiler in the
    image, every preprocessing pod on a GPU fails (runtime base images ship none)."""
    text = (REPO / "images/gpu.Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"apt-get install [^\n]*\bgcc\b", final) and "command -v gcc" in final


def test_bake_tags_follow_chart_app_version() -> None:
    import yaml

    chart = yaml.safe_load((REPO / "charts/trajflow/Chart.yaml").read_text())
    bake = (REPO / "images/docker-bake.hcl").read_text()
    default_version = re.search(r'variable "VERSION" \{\s*default = "([^"]+)"', bake).group(1)
    assert default_version == str(chart["appVersion"])
    for target in ("downloader", "gpu"):
        assert f'dockerfile = "images/{target}.Dockerfile"' in bake


def test_workflows_match_github_schema() -> None:
    workflows = sorted(str(p) for p in (REPO / ".github/workflows").glob("*.y*ml"))
    assert workflows
    proc = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *workflows],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO / "workloads")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list(out.glob("trajflow-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_downloader_install_does_not_pull_torch(wheel: Path, tmp_path: Path) -> None:
    """Install the wheel into a fresh venv as the downloader image does, then run the CLI."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, env=env)
    if proc.returncode != 0 and "Could not find a version" in proc.stderr:
        pytest.skip(f"the package index is unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True).stdout.lower()
    assert "torch" not in freeze and "triton" not in freeze, freeze
    trajflow = env_dir / "bin" / "trajflow"
    top = subprocess.run([str(trajflow), "--help"], capture_output=True, text=True)
    assert top.returncode == 0, top.stderr
    for command in ("download", "preprocess", "train", "wait", "run", "schema", "bench", "demo-data"):
        assert command in top.stdout, f"`trajflow --help` does not list {command}"
        sub = subprocess.run([str(trajflow), command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0, f"trajflow {command} --help failed without torch:\n{sub.stderr}"


def test_the_gpu_image_runs_the_torch_the_tests_run() -> None:
    """The kernels, the launcher and the checkpoints are tested with the Makefile's torch: the
    image installs that release (and its build checks it, with the elastic agent's shutdown
    timeout the training chart relies on)."""
    text = (REPO / "images/gpu.Dockerfile").read_text()
    image = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    tested = re.search(r"^TORCH := torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert image == tested
    final = text[text.rindex("\nFROM "):]
    assert '"torch==${TORCH_VERSION}"' in final and "shutdown_timeout" in final
