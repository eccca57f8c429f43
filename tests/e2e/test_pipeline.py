"""The whole pipeline on this machine with the real stages, run exactly as `make demo` runs it
(the commands are read from the Makefile), on a tiny dataset: every stage finishes, the
model learns, the report is written, a second run does no work, and a run interrupted
during preprocessing resumes and finishes."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from trajflow.storage import done_shards, open_storage
from trajflow.testing import tool_path

REPO = Path(__file__).resolve().parents[2]
TINY_VALUES = Path(__file__).with_name("tiny.yaml")
# appended to the Makefile's demo-data command (argparse: the last occurrence wins)
TINY_DATA = ["--episodes", "12", "--rates", "30,100,333", "--min-seconds", "3", "--max-seconds", "5"]

pytestmark = pytest.mark.slow


def trajflow_executable() -> str:
    beside = Path(sys.executable).with_name("trajflow")
    return str(beside) if beside.is_file() else shutil.which("trajflow") or "trajflow"


def demo_commands() -> list[list[str]]:
    """The recipe of `make demo`, with $(VENV)/bin/trajflow as this environment's trajflow."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^demo\s*:", line))
    commands = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        argv = shlex.split(line.strip())
        if argv and argv[0].endswith("/bin/trajflow"):
            commands.append([trajflow_executable(), *argv[1:]])
    assert [c[1] for c in commands] == ["demo-data", "run"], f"unexpected demo recipe: {commands}"
    return commands


class Workspace:
    """A directory laid out like the repository root for `make demo` (values/ beside .trajflow/)."""

    def __init__(self, root: Path):
        self.root = root
        (root / "values").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "values" / "local.yaml", root / "values" / "local.yaml")
        self.tag = uuid.uuid4().hex  # marks every process this workspace starts
        self.env = {**os.environ, "TRAJFLOW_E2E_TAG": self.tag, "TRAJFLOW_LOG_LEVEL": "INFO"}
        self.env.pop("TRAJFLOW_CONFIG", None)

    def command(self, which: str, *extra: str) -> list[str]:
        demo_data, run = demo_commands()
        if which == "demo-data":
            return [*demo_data, *TINY_DATA, *extra]
        return [*run, "-f", str(TINY_VALUES), *extra]

    def run(self, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command("run", *extra), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def storage(self, run_id: str = "tiny"):  # type: ignore[no-untyped-def]
        return open_storage(str(self.root / ".trajflow" / "data" / run_id))

    def summary(self, run_id: str = "tiny") -> dict[str, Any]:
        return json.loads((self.root / ".trajflow" / "runs" / run_id / "summary.json").read_text())

    def leftover_processes(self) -> list[int]:
        """Processes still carrying this workspace's tag in their environment."""
        needle = f"TRAJFLOW_E2E_TAG={self.tag}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("demo"))
    proc = subprocess.run(ws.command("demo-data"), cwd=ws.root, env=ws.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ws


@pytest.fixture(scope="module")
def first_run(workspace: Workspace, request: pytest.FixtureRequest) -> tuple[subprocess.CompletedProcess[str], Any]:
    """The first full run; with a Pushgateway installed, its metrics go there too."""
    gateway = None
    extra: list[str] = []
    if tool_path("prometheus-pushgateway") or tool_path("pushgateway"):
        gateway = request.getfixturevalue("pushgateway_server")
        gateway.wipe()
        extra = ["--set", f"global.metrics.pushgatewayUrl={gateway.url}"]
    proc = workspace.run(*extra)
    groups = gateway.groups() if gateway is not None else None
    return proc, groups


def test_the_demo_commands_run_every_stage_and_the_model_learns(workspace: Workspace, first_run: Any) -> None:
    proc, _ = first_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    storage = workspace.storage()
    assert done_shards(storage, "download") == {0, 1}
    assert done_shards(storage, "preprocess") == {0, 1}
    summary = workspace.summary()
    assert summary["exitCode"] == 0
    for stage in ("download", "preprocess", "train"):
        assert summary["stages"][stage]["ran"] == summary["stages"][stage]["shards"], stage
    # every demo episode made it through download and preprocessing
    assert summary["stages"]["preprocess"]["trajectories"] == 12
    assert summary["stages"]["download"]["bytes"] > 0
    train = summary["stages"]["train"]
    assert train["status"] == "completed"
    assert train["final_val_loss"] < 0.5 * train["initial_val_loss"], train
    # the report, then the model and the checkpoints: paths printed last, PNG written, HTML carrying the PNG
    report = Path(summary["report"])
    assert report.is_absolute() and report.is_file()
    data = workspace.root / ".trajflow" / "data" / "tiny"
    assert proc.stdout.strip().splitlines()[-3:] == [
        f"report: {report}",
        f"model: {data}/train/artifacts/model.safetensors (metrics, loss curve and config beside it)",
        f"checkpoints: {data}/train/checkpoints/",
    ]
    assert (data / "train" / "artifacts" / "model.safetensors").is_file() and any((data / "train" / "checkpoints").iterdir())
    assert report.with_suffix(".png").stat().st_size > 20_000
    assert "data:image/png;base64," in report.read_text()
    assert workspace.leftover_processes() == []


def test_stage_metrics_reach_the_pushgateway(first_run: Any) -> None:
    _, groups = first_run
    if groups is None:
        pytest.skip("prometheus-pushgateway not installed; run `bash ci/scripts/install-test-tools.sh` as root")
    pushed = {(g["labels"].get("stage"), g["labels"].get("shard")) for g in groups if g["labels"].get("run") == "tiny"}
    assert {("download", "0"), ("download", "1"), ("preprocess", "0"), ("preprocess", "1")} <= pushed
    assert any(stage == "train" for stage, _ in pushed)


def test_a_second_run_does_no_work(workspace: Workspace, first_run: Any) -> None:
    assert first_run[0].returncode == 0
    data = workspace.root / ".trajflow" / "data" / "tiny"
    lock = data / ".trajflow-run.lock"  # notes the pid of the run holding it
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file() and p != lock}
    proc = workspace.run()
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = workspace.summary()
    assert {t["state"] for t in summary["tasks"]} == {"skipped"}
    after = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file() and p != lock}
    assert after == before  # nothing written, nothing removed
    # the summary still carries what the first run learned
    assert summary["stages"]["train"]["final_val_loss"] < 0.5 * summary["stages"]["train"]["initial_val_loss"]


def test_a_run_interrupted_during_preprocessing_resumes(workspace: Workspace) -> None:
    # one preprocessing shard at a time, so the second is at work when the first is done
    # (which one is first depends on which download shard finishes first)
    sets = ["--set", "global.runId=resume", "--set", "preprocessing.parallelism=1"]
    proc = subprocess.Popen(workspace.command("run", *sets), cwd=workspace.root, env=workspace.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    first: int | None = None
    assert proc.stdout is not None
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        seen.append(line)
        done = re.search(r"preprocess\[(\d)\]: done", line)
        if done and first is None:
            first = int(done.group(1))
        if first is not None and f"preprocess[{1 - first}]: started" in line:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does to the runner
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        pytest.fail("the run ended before the second preprocessing shard started:\n" + "".join(seen))
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert workspace.leftover_processes() == [], output
    storage = workspace.storage("resume")
    assert done_shards(storage, "download") == {0, 1}
    assert done_shards(storage, "preprocess") == {first}
    assert not storage.exists("train/artifacts/metrics.json")
    assert workspace.summary("resume")["interruptedBy"] == int(signal.SIGINT)

    again = workspace.run(*sets)
    assert again.returncode == 0, again.stdout[-4000:]
    states = {t["task"]: t["state"] for t in workspace.summary("resume")["tasks"]}
    assert states == {
        "download/00000": "skipped", "download/00001": "skipped",
        f"preprocess/0000{first}": "skipped", f"preprocess/0000{1 - first}": "done", "train/00000": "done",
    }
    assert done_shards(storage, "preprocess") == {0, 1}
    train = workspace.summary("resume")["stages"]["train"]
    assert train["final_val_loss"] < 0.5 * train["initial_val_loss"]


def test_a_worker_error_keeps_its_exit_code(workspace: Workspace, first_run: Any) -> None:
    """The training launcher exits with its worker's own code (3: the input can never
    succeed; plain torchrun would say 1); the runner does not retry it and shows the error."""
    assert first_run[0].returncode == 0
    # with preprocessing in the run, the plan refuses the stream; without, training finds it missing
    proc = workspace.run("--set", "preprocessing.enabled=false", "--set", "training.config.observation=no.such.stream")
    assert proc.returncode == 3, proc.stdout[-3000:]
    assert "exit code 3 (PERMANENT)" in proc.stdout and "not retried" in proc.stdout
    assert "no stream 'no.such.stream'" in proc.stdout
    train = next(t for t in workspace.summary()["tasks"] if t["task"] == "train/00000")
    assert train["state"] == "failed" and train["attempts"] == 1
    # the earlier, successful training is still what the run root holds and what counts
    again = workspace.run()
    assert again.returncode == 0
    assert {t["state"] for t in workspace.summary()["tasks"]} == {"skipped"}


def test_a_rerun_with_changed_settings_says_what_it_kept(workspace: Workspace, first_run: Any) -> None:
    """A finished run rerun with another targetRateHz and learningRate keeps its shards and
    its model, as documented: the summary counts them kept and says so after the table."""
    assert first_run[0].returncode == 0
    data = workspace.root / ".trajflow" / "data"
    # a copy of the finished run, so the other tests' run keeps its state
    shutil.copytree(data / "tiny", data / "changed", ignore=shutil.ignore_patterns(".trajflow-run.lock"))
    (workspace.root / "lr.yaml").write_text("training:\n  config:\n    learningRate: 0.01\n")
    proc = workspace.run("-f", "lr.yaml", "--set", "global.runId=changed",
                         "--set", "preprocessing.config.targetRateHz=30")
    assert proc.returncode == 0, proc.stdout[-4000:]
    stages = workspace.summary("changed")["stages"]
    assert (stages["preprocess"]["ran"], stages["preprocess"]["kept"]) == (0, 2)
    assert stages["preprocess"]["stale_settings"] == ["targetRateHz 50.0 -> 30.0"]
    assert (stages["train"]["ran"], stages["train"]["kept"]) == (0, 1)
    out = proc.stdout
    assert "preprocess: 2 of 2 shards were kept as made with earlier settings" in out
    assert re.search(r"^training had already finished at epoch 4 of 4 \(checkpoint train/checkpoints/ckpt-\d+\.pt, "
                     r"step \d+\): settings changed since are not applied", out, re.M)


def test_a_rerun_needs_no_source_once_every_download_is_done(workspace: Workspace, first_run: Any) -> None:
    """The stored plan and manifests stand for the source: a rerun after it was moved away
    (an unmounted volume, the demo data deleted) skips the downloads and goes on."""
    assert first_run[0].returncode == 0
    source = workspace.root / ".trajflow" / "demo-source"
    away = source.with_name("demo-source-away")
    source.rename(away)
    try:
        proc = workspace.run()
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "'.trajflow/demo-source' does not exist on this machine" in proc.stderr
        assert "every download shard is done, so the run goes on without it" in proc.stderr
        assert {t["state"] for t in workspace.summary()["tasks"]} == {"skipped"}
    finally:
        away.rename(source)
