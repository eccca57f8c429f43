"""Images and CI files, checked without a Docker engine or a cluster."""
from __future__ import annotations

import re
import subprocess
import sys
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


def _requirements(names: list[str]) -> set[str]:
    """The distributions `names` need, transitively and without extras, as this
    environment's metadata declares them (what pip would install, offline)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def test_downloader_install_does_not_pull_torch(wheel: Path) -> None:
    """The downloader image installs the wheel without extras: nothing it requires, however
    indirectly, is torch or triton, and every command's --help works without them."""
    import zipfile

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        [meta] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(meta).decode().splitlines()
    direct = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    base = [r.name for r in direct if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert base and len(base) < len(direct), lines  # the ML libraries sit behind an extra
    needed = _requirements(base)
    assert not {n for n in needed if n == "torch" or n.startswith(("torch-", "triton", "nvidia-"))}, sorted(needed)
    blocked = "import sys; sys.modules['torch'] = sys.modules['triton'] = None; from trajflow.cli import main; "
    top = subprocess.run([sys.executable, "-c", blocked + "sys.exit(main(['--help']))"], capture_output=True, text=True)
    assert top.returncode == 0, top.stderr
    for command in ("download", "preprocess", "train", "wait", "run", "schema", "bench", "demo-data"):
        assert command in top.stdout, f"`trajflow --help` does not list {command}"
        sub = subprocess.run([sys.executable, "-c", blocked + f"sys.exit(main([{command!r}, '--help']))"],
                             capture_output=True, text=True)
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
