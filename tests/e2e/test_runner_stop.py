"""The runner's stop path says what happened, and a bad --work-dir is a one-line config error."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trajflow.errors import ConfigError, TransientError
from trajflow.local.pipeline import build_plan
from trajflow.local.progress import PlainView
from trajflow.local.runner import RUNNING, Runner

ROOT = Path(__file__).resolve().parents[2]


def plan_for(tmp_path: Path):  # type: ignore[no-untyped-def]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "global": {"runId": "fake", "storage": {"type": "filesystem", "filesystem": {"path": str(tmp_path / "data")}}},
        "downloader": {"shards": 1, "parallelism": 1,
                       "config": {"sources": [{"type": "file", "name": "raw", "path": str(tmp_path / "raw")}]}},
        "preprocessing": {"enabled": False},
        "training": {"enabled": False},
    }))
    return build_plan([values])


def stubborn_task(runner: Runner):  # type: ignore[no-untyped-def]
    """A running task whose process ignores SIGTERM, as a hung stage does."""
    task = runner.tasks[0]
    task.proc = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                               "print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    assert task.proc.stdout is not None and task.proc.stdout.readline() == b"ready\n"
    task.state = RUNNING
    return task


@pytest.mark.parametrize("second_interrupt", [True, False])
def test_kill_message_says_why(tmp_path: Path, second_interrupt: bool) -> None:
    out = io.StringIO()
    runner = Runner(plan_for(tmp_path), tmp_path / "work", PlainView(stream=out), grace_seconds=1.0)
    task = stubborn_task(runner)
    runner._kill_now = second_interrupt
    runner._stop_children(15)
    assert task.proc is None and task.exit_code == -9
    text = out.getvalue()
    if second_interrupt:
        assert re.search(r"download\[0\]: a second interrupt after 0\.\ds of the 1s grace period; killing it", text), text
        assert "still running after 1s" not in text
    else:
        assert "download[0]: still running after 1s (1s grace period); killing it" in text, text


def test_work_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match=r"--work-dir .*afile exists and is not a directory"):
        Runner(plan_for(tmp_path), afile, PlainView(stream=io.StringIO()))
    with pytest.raises(ConfigError, match=r"afile exists and is not a directory"):
        Runner(plan_for(tmp_path), afile / "sub", PlainView(stream=io.StringIO()))
    exe = Path(sys.executable).with_name("trajflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trajflow.cli"]
    result = subprocess.run([*cmd, "run", "-f", "values/local.yaml", "--dry-run", "--work-dir", str(afile)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"--work-dir {afile} exists and is not a directory" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_killed_runner_s_stages_hold_the_run_until_they_exit(tmp_path: Path) -> None:
    """`kill -9` of the runner leaves its stages stopping on their SIGTERM (training writes a
    checkpoint): a rerun must not start the same shards beside them."""
    from trajflow.local import procs

    plan = plan_for(tmp_path)
    first = Runner(plan, tmp_path / "work", PlainView(stream=io.StringIO()))
    first._lock = first._lock_work_dir()
    stage = procs.spawn([sys.executable, "-c", "import time; time.sleep(60)"], {},
                        keep_fds=(first._lock.fileno(),))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "work" / "run.lock").write_text(f"{gone.pid}\n")  # the runner's pid, dead
    first._lock.close()  # the runner is gone; its stage still runs
    try:
        second = Runner(plan, tmp_path / "work", PlainView(stream=io.StringIO()))
        with pytest.raises(TransientError, match=rf"earlier `trajflow run` \(pid {gone.pid}, gone\) are still stopping") as info:
            second._lock_work_dir()
        assert f"holding the lock: {stage.pid} (" in str(info.value)  # which process to wait for, or kill
    finally:
        stage.kill()
        stage.wait()
    second._lock_work_dir().close()  # free once the last stage exited
