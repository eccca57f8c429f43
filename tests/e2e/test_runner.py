"""The local runner's scheduling, skipping, retries and signal handling, against a fake
stage program (tests/e2e/fake_stage.py) that keeps the stage contract without real work."""
from __future__ import annotations

import html
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from trajflow.config import load_values
from trajflow.errors import ConfigError, ExitCode, TransientError
from trajflow.local import procs
from trajflow.local.pipeline import build_plan, missing_stage_modules
from trajflow.local.progress import PlainView
from trajflow.local.report import write_report
from trajflow.local.runner import DONE, SKIPPED, STOPPED, Runner, RunResult
from trajflow.storage import done_shards, open_storage

FAKE = Path(__file__).with_name("fake_stage.py")


def write_values(tmp_path: Path, shards: int = 3, name: str = "values.yaml", **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "global": {"runId": "fake", "storage": {"type": "filesystem", "filesystem": {"path": str(tmp_path / "data")}}},
        "downloader": {"shards": shards, "parallelism": 2, "backoffLimitPerIndex": 0, "config": {
            "concurrency": 3, "sources": [{"type": "file", "name": "raw", "path": str(tmp_path / "raw")}]}},
        "preprocessing": {"shards": shards, "parallelism": 1, "backoffLimitPerIndex": 0, "config": {"targetRateHz": 25}},
        "training": {"inputShards": shards, "nprocPerNode": 1, "maxRestarts": 0, "backoffLimitPerIndex": 0},
    }
    for dotted, value in extra.items():
        node = doc
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


class Fake:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp_path = tmp_path
        self.state = tmp_path / "fake-state"
        monkeypatch.setenv("FAKE_STATE_DIR", str(self.state))
        monkeypatch.setenv("FAKE_SECONDS", "0.2")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where S3 run roots are locked
        self.out = io.StringIO()

    def run(self, values: Path, sets: tuple[str, ...] = (), force: bool = False) -> tuple[Runner, RunResult]:
        plan = build_plan([values], sets)
        runner = Runner(plan, self.tmp_path / "work", PlainView(stream=self.out), force=force, command=[sys.executable, str(FAKE)])
        return runner, runner.run()

    def records(self, name: str) -> list[dict[str, Any]]:
        path = self.state / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def starts(self, stage: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records("starts.jsonl") if stage is None or r["stage"] == stage]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    return Fake(tmp_path, monkeypatch)


def storage_of(tmp_path: Path, run_id: str = "fake"):  # type: ignore[no-untyped-def]
    return open_storage(str(tmp_path / "data" / run_id))


def test_runs_every_stage_pipelined_with_the_chart_config(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_AFTER_download_2", "preprocess:0")  # the last download shard outlasts preprocess 0's start
    runner, result = fake.run(write_values(tmp_path))
    assert result.exit_code == 0, fake.out.getvalue()
    assert all(t.state == DONE for t in result.tasks)
    storage = storage_of(tmp_path)
    assert done_shards(storage, "download") == {0, 1, 2}
    assert done_shards(storage, "preprocess") == {0, 1, 2}

    # each stage got exactly the chart's ConfigMap document and its shard count
    rendered = yaml.safe_load((tmp_path / "work" / "config" / "preprocessing.yaml").read_text())
    assert set(rendered) == {"global", "config"}
    merged = load_values([tmp_path / "values.yaml"]).merged
    in_configmap = {k: v for k, v in merged["global"].items() if k != "argocd"}
    in_configmap["storage"] = {k: v for k, v in merged["global"]["storage"].items() if k != "pvc"}
    assert rendered == {"global": in_configmap, "config": merged["preprocessing"]["config"]}
    assert rendered["config"]["targetRateHz"] == 25 and rendered["global"]["runId"] == "fake"
    assert {(s["shard"], s["shards"]) for s in fake.starts("download")} == {(0, 3), (1, 3), (2, 3)}

    starts = {(s["stage"], s["shard"]): s["t"] for s in fake.starts()}
    ends = {(s["stage"], s["shard"]): s["t"] for s in fake.records("ends.jsonl")}
    # pipelined: preprocessing shard 0 ran while download shard 2 was still busy
    assert starts[("preprocess", 0)] < ends[("download", 2)]
    # and shard i never before its download shard i finished
    for i in range(3):
        assert starts[("preprocess", i)] >= ends[("download", i)]
    # parallelism: never more than 2 downloads at once, preprocessing one at a time
    pre = sorted((starts[("preprocess", i)], ends[("preprocess", i)]) for i in range(3))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(pre, pre[1:]))
    downloads = [(starts[("download", i)], ends[("download", i)]) for i in range(3)]
    assert max(sum(1 for s, e in downloads if s <= t < e) for t, _ in downloads) <= 2
    # training waited for every preprocessed shard
    assert fake.starts("train")[0]["t"] >= max(ends[("preprocess", i)] for i in range(3))

    doc, _ = write_report(runner, result)
    assert doc["stages"]["train"]["final_val_loss"] == pytest.approx(0.4)
    assert doc["stages"]["train"]["initial_val_loss"] == pytest.approx(1.5)
    assert doc["stages"]["download"]["bytes"] == 100 + 101 + 102
    assert doc["stages"]["download"]["bytes_per_second"] > 0
    assert doc["stages"]["preprocess"]["trajectories_per_second"] > 0
    assert Path(doc["report"]).is_file() and Path(doc["report"]).with_suffix(".png").stat().st_size > 10_000


def test_live_view_draws_every_stage(fake: Fake, tmp_path: Path) -> None:
    from rich.console import Console

    from trajflow.local.progress import LiveView

    screen = io.StringIO()
    plan = build_plan([write_values(tmp_path, shards=2)], ["training.enabled=false"])
    view = LiveView(Console(file=screen, force_terminal=True, width=120, color_system=None))
    result = Runner(plan, tmp_path / "work", view, command=[sys.executable, str(FAKE)]).run()
    assert result.exit_code == 0
    final = screen.getvalue().rsplit("stage", 1)[-1]  # the last frame drawn
    assert re.search(r"✓\s+download\s+━+\s+2/2", final), final
    assert re.search(r"✓\s+preprocess\s+━+\s+2/2", final), final
    assert "preprocess[1]: done" in screen.getvalue()


def test_a_second_run_starts_nothing(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = write_values(tmp_path, shards=2)
    assert fake.run(values)[1].exit_code == 0
    before = len(fake.starts())
    runner, result = fake.run(values)
    assert result.exit_code == 0
    assert [t.state for t in result.tasks] == [SKIPPED] * 5
    assert len(fake.starts()) == before
    # the report still shows what the earlier run learned
    doc, _ = write_report(runner, result)
    assert doc["stages"]["train"]["final_val_loss"] == pytest.approx(0.4) and len(doc["history"]) == 3

    # training runs again when its result is gone, and only training
    (tmp_path / "data" / "fake" / "train" / "artifacts" / "metrics.json").unlink()
    _, result = fake.run(values)
    assert result.exit_code == 0
    assert [t.state for t in result.tasks] == [SKIPPED] * 4 + [DONE]

    # --force starts the processes again (the stages themselves skip verified work)
    monkeypatch.setenv("FAKE_RECEIVED", "0")
    runner, forced = fake.run(values, ("training.enabled=false",), force=True)
    assert forced.exit_code == 0 and len(fake.starts()) == before + 1 + 4
    # the data was all there: the download moved nothing, however much the shards hold
    doc, _ = write_report(runner, forced)
    assert doc["stages"]["download"]["bytes"] == 100 + 101 and doc["stages"]["download"]["bytes_per_second"] == 0
    assert "trajectories_per_second" not in doc["stages"]["preprocess"]  # every shard found done: no rate to show


def test_the_summary_counts_quarantined_trajectories_apart() -> None:
    from trajflow.local.report import StageSummary

    stage = StageSummary("preprocessing", "preprocess", 2, 2, 0, 0, 3.0,
                         {"trajectories": 160, "quarantined": 12, "frames": 65170, "rate_hz": 50.0})
    assert stage.throughput() == "148 trajectories (12 more quarantined) → 65,170 frames at 50 Hz"


def test_the_summary_shows_the_exported_model_s_validation_loss() -> None:
    from trajflow.local.report import StageSummary

    stopped_early = {"initial_val_loss": 2.0, "best_val_loss": 0.5, "best_epoch": 3, "final_val_loss": 0.6, "epochs": 6}
    stage = StageSummary("training", "train", 1, 1, 0, 0, 9.0, stopped_early)
    assert stage.throughput() == "val loss 2 → 0.5 (25.0% of initial) at epoch 4 (last epoch 0.6), 6 epochs"
    stage.figures.update(best_val_loss=0.6, best_epoch=5)
    assert stage.throughput() == "val loss 2 → 0.6 (30.0% of initial), 6 epochs"


def test_a_rerun_that_keeps_earlier_results_says_so_after_the_table(fake: Fake, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards kept though preprocessing.config changed, and a training that had already
    finished, count as kept, not ran, and a line after the table says what to do."""
    from rich.console import Console

    from trajflow.local.report import print_summary

    values = write_values(tmp_path, shards=2)
    assert fake.run(values)[1].exit_code == 0
    monkeypatch.setenv("FAKE_ALREADY_FINISHED", "1")
    runner, result = fake.run(values, ("preprocessing.config.targetRateHz=30", "training.config.learningRate=1"))
    assert result.exit_code == 0, fake.out.getvalue()
    doc, stages = write_report(runner, result)
    pre, train = doc["stages"]["preprocess"], doc["stages"]["train"]
    assert (pre["ran"], pre["kept"], pre["stale_shards"], pre["stale_settings"]) == (0, 2, 2, ["targetRateHz 25.0 -> 30.0"])
    assert (train["ran"], train["kept"]) == (0, 1) and train["already_finished"].startswith("training had already")
    console = Console(file=io.StringIO(), width=1000)
    print_summary(console, doc, stages)
    lines = console.file.getvalue().splitlines()
    assert re.search(r"^preprocess +0 ran, 2 kept of 2 ", lines[3]) and re.search(r"^train +0 ran, 1 kept of 1 ", lines[4])
    root = tmp_path / "data" / "fake"
    assert lines[5] == (
        "preprocess: 2 of 2 shards were kept as made with earlier settings, not remade with this preprocessing.config "
        "(kept -> configured: targetRateHz 25.0 -> 30.0); to remake them with it, use a new global.runId, or delete "
        f"{root}/resampled/ and {root}/train/checkpoints/ and run again")
    assert lines[6] == train["already_finished"]
    report = Path(doc["report"]).read_text()
    assert all(f'<p class="warn">{html.escape(line)}</p>' in report for line in lines[5:7])
    # the next run, with nothing for the runner to start, still shows what the shards hold
    monkeypatch.delenv("FAKE_ALREADY_FINISHED")
    runner, result = fake.run(values, ("preprocessing.config.targetRateHz=30", "training.config.learningRate=1"))
    doc, stages = write_report(runner, result)
    assert {t["state"] for t in doc["tasks"]} == {SKIPPED}
    assert doc["stages"]["preprocess"]["stale_settings"] == ["targetRateHz 25.0 -> 30.0"]
    assert "already_finished" not in doc["stages"]["train"]


def test_a_successful_run_prints_where_its_model_and_checkpoints_are() -> None:
    from rich.console import Console

    from trajflow.local.report import print_summary, results_of

    doc = {"exitCode": 0, "interruptedBy": None, "runId": "r", "seconds": 1.0, "root": "file:///data/my%20run",
           "report": "/work/report.html", "results": results_of("file:///data/my%20run", 0, ["preprocessing", "training"])}
    console = Console(file=io.StringIO(), width=200)
    print_summary(console, doc, [])
    assert console.file.getvalue().splitlines()[-3:] == [
        "report: /work/report.html",
        "model: /data/my run/train/artifacts/model.safetensors (metrics, loss curve and config beside it)",
        "checkpoints: /data/my run/train/checkpoints/",
    ]
    assert results_of("s3://bucket/runs/r", 0, ["training"]) == {
        "model": "s3://bucket/runs/r/train/artifacts/model.safetensors", "checkpoints": "s3://bucket/runs/r/train/checkpoints/"}
    # no model to point at: a failed run, or one without training
    assert results_of("s3://bucket/runs/r", 4, ["training"]) is None
    assert results_of("s3://bucket/runs/r", 0, ["downloader", "preprocessing"]) is None


def test_an_s3_run_root_works_the_same(fake: Fake, tmp_path: Path, s3_server: Any) -> None:
    bucket = s3_server.make_bucket()
    s3 = {"type": "s3", "s3": {"endpoint": s3_server.endpoint, "bucket": bucket, "prefix": "runs", "region": s3_server.region}}
    values = write_values(tmp_path, shards=2, global__storage=s3)
    sets = ("training.enabled=false",)
    runner, result = fake.run(values, sets)
    assert result.exit_code == 0, fake.out.getvalue()
    assert runner.plan.root == f"s3://{bucket}/runs/fake"
    assert done_shards(runner.storage, "preprocess") == {0, 1}
    before = len(fake.starts())
    _, again = fake.run(values, sets)
    assert again.exit_code == 0 and len(fake.starts()) == before


def test_without_a_cache_to_lock_an_s3_root_in_the_run_goes_on(fake: Fake, tmp_path: Path, s3_server: Any,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The lock of an S3 root is this machine's convenience, not the run's precondition."""
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    s3 = {"type": "s3", "s3": {"endpoint": s3_server.endpoint, "bucket": s3_server.make_bucket(), "prefix": "runs",
                               "region": s3_server.region}}
    with caplog.at_level(logging.WARNING, logger="trajflow.local"):
        _, result = fake.run(write_values(tmp_path, shards=1, global__storage=s3), ("training.enabled=false",))
    assert result.exit_code == 0, fake.out.getvalue()
    assert any("cannot hold a lock for the run root" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["filesystem", "s3"])
def test_a_second_run_of_the_same_work_dir_is_refused_while_the_first_runs(
        fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str,
        request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv("FAKE_SECONDS", "3")
    root = tmp_path / "data" / "fake"
    values = write_values(tmp_path, shards=1)
    if where == "s3":  # an object store has no file to lock: this machine locks it
        s3_server = request.getfixturevalue("s3_server")
        bucket = s3_server.make_bucket()
        values = write_values(tmp_path, shards=1, global__storage={"type": "s3", "s3": {
            "endpoint": s3_server.endpoint, "bucket": bucket, "prefix": "runs", "region": s3_server.region}})
        root = f"s3://{bucket}/runs/fake"
    first: list[RunResult] = []
    thread = threading.Thread(target=lambda: first.append(fake.run(values)[1]))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not fake.starts() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.starts(), fake.out.getvalue()
        with pytest.raises(TransientError, match=rf"another `trajflow run` \(pid {os.getpid()}\) is running in .*work"):
            fake.run(values)
        # another work dir (another directory, --work-dir) on the same run root: refused too
        other = Runner(build_plan([values]), tmp_path / "other-work", PlainView(stream=fake.out),
                       command=[sys.executable, str(FAKE)])
        with pytest.raises(TransientError, match=rf"another `trajflow run` \(pid {os.getpid()}\) is running on the "
                                                 rf"run root {root}"):
            other.run()
        if where == "s3":  # the same store however its endpoint is spelled
            spelled = s3_server.endpoint.replace("127.0.0.1", "LocalHost") + "/"
            other = Runner(build_plan([values], [f"global.storage.s3.endpoint={spelled}"]), tmp_path / "third-work",
                           PlainView(stream=fake.out), command=[sys.executable, str(FAKE)])
            with pytest.raises(TransientError, match=r"another `trajflow run` .* is running on the run root"):
                other.run()
            # another root of the same store is another run's to take
            elsewhere = Runner(build_plan([values], ["global.storage.s3.prefix=elsewhere"]), tmp_path / "fourth-work",
                               PlainView(stream=fake.out), command=[sys.executable, str(FAKE)])
            assert elsewhere.run().exit_code == 0, fake.out.getvalue()
    finally:
        thread.join(timeout=60)
    assert first[0].exit_code == 0, fake.out.getvalue()
    assert len(fake.starts("download")) == (2 if where == "s3" else 1)  # the first run's, and elsewhere's
    _, again = fake.run(values)  # the lock went with the first run
    assert again.exit_code == 0


def test_a_run_removes_what_writers_killed_mid_write_left_in_the_run_root(fake: Fake, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint's temporary is as large as the checkpoint: a run removes the temporaries
    of writers killed in earlier runs, but none a process still has open or wrote just now."""
    values = write_values(tmp_path, shards=1)
    root = tmp_path / "data" / "fake"
    abandoned = root / "train" / "checkpoints" / ".trajflow-tmp-0123abcd-ckpt-0000000075.pt"
    fresh = root / "resampled" / ".trajflow-tmp-89abcdef-00000.safetensors"
    held = root / "raw" / "_done" / ".trajflow-tmp-4567cdef-00000.json"
    for path in (abandoned, fresh, held):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    os.utime(held, (an_hour_ago, an_hour_ago))
    with open(held, "rb"), caplog.at_level(logging.INFO, logger="trajflow.local.runner"):  # a writer still at work
        _, result = fake.run(values)
    assert result.exit_code == 0
    assert not abandoned.exists() and fresh.exists() and held.exists()
    assert f"removed {abandoned}, left by a writer that was killed" in caplog.text


def test_changed_stage_config_reruns_that_stage_and_what_follows(fake: Fake, tmp_path: Path) -> None:
    values = write_values(tmp_path, shards=2)
    sets = ("training.enabled=false",)
    assert fake.run(values, sets)[1].exit_code == 0
    counted = {stage: len(fake.starts(stage)) for stage in ("download", "preprocess")}
    _, result = fake.run(values, (*sets, "preprocessing.config.targetRateHz=40"))
    assert result.exit_code == 0
    assert len(fake.starts("download")) == counted["download"]  # untouched
    assert len(fake.starts("preprocess")) == counted["preprocess"] + 2

    # training's inputs are every preprocessed manifest: a rewritten one changes them
    runner = Runner(build_plan([values]), tmp_path / "work", PlainView(stream=io.StringIO()), command=[sys.executable, str(FAKE)])
    train = next(t for t in runner.tasks if t.stage.stage == "training")
    before = runner._fingerprint(train)
    assert runner._fingerprint(train) == before
    manifest = tmp_path / "data" / "fake" / "resampled" / "_done" / "00001.json"
    manifest.write_text(manifest.read_text().replace('"trajectories": 2', '"trajectories": 3'))
    assert runner._fingerprint(train) != before


def test_a_retryable_failure_is_retried(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL", "download:1:4")  # TRANSIENT, first attempt only
    monkeypatch.setenv("FAKE_FAIL_TIMES", "1")
    values = write_values(tmp_path, shards=2, downloader__backoffLimitPerIndex=1)
    _, result = fake.run(values, ("training.enabled=false",))
    assert result.exit_code == 0, fake.out.getvalue()
    shard1 = next(t for t in result.tasks if t.key == "download/00001")
    assert shard1.attempts == 2 and shard1.state == DONE
    assert "exit code 4 (TRANSIENT); retrying in 1s (attempt 2 of 2)" in fake.out.getvalue()


@pytest.mark.parametrize("code", [2, 3])
def test_a_fatal_exit_code_stops_the_run_without_retrying(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setenv("FAKE_FAIL", f"preprocess:0:{code}")
    values = write_values(tmp_path, shards=2, preprocessing__backoffLimitPerIndex=3)
    _, result = fake.run(values)
    assert result.exit_code == code
    assert [s["shard"] for s in fake.starts("preprocess")].count(0) == 1  # no retry
    assert fake.starts("train") == []
    # the failure names the shard, its log, and shows the log's last lines
    assert "preprocess[0] failed" in result.failure and "preprocess-00000.log" in result.failure
    assert "failing on purpose" in result.failure


def test_the_live_view_shows_the_initial_loss_then_the_epochs() -> None:
    from trajflow.local.progress import training_detail

    assert training_detail({"initial_val_loss": 1.07}, 3) == ("initial val loss 1.07", None)
    assert training_detail({"initial_val_loss": 1.07, "epoch": 0, "train_loss": 0.5, "val_loss": 0.4}, 3) == (
        "epoch 1/3 · train loss 0.5 · val loss 0.4", 1)


def test_a_failed_training_reports_the_losses_its_log_gave(fake: Fake, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # no metrics.json: the report takes what this run's training logged, initial loss included
    monkeypatch.setenv("FAKE_FAIL", "train:0:3")
    runner, result = fake.run(write_values(tmp_path, shards=1))
    assert result.exit_code == 3
    doc, _ = write_report(runner, result)
    train = doc["stages"]["train"]
    assert train["initial_val_loss"] == pytest.approx(1.5) and train["final_val_loss"] == pytest.approx(0.4)


def test_retries_run_out(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_FAIL", "download:0:1")
    values = write_values(tmp_path, shards=1, downloader__backoffLimitPerIndex=1)
    _, result = fake.run(values, ("training.enabled=false",))
    assert result.exit_code == 1
    assert len(fake.starts("download")) == 2
    assert "after 2 attempts" in result.failure


def test_a_shard_killed_by_a_signal_fails_the_run_with_the_error_code(fake: Fake, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_KILL", "download:0")  # an OOM kill: the exit status is -9
    _, result = fake.run(write_values(tmp_path, shards=1), ("training.enabled=false",))
    assert result.exit_code == int(ExitCode.ERROR)
    assert "download[0] failed: killed by SIGKILL" in result.failure


def test_a_shard_that_exits_0_without_its_manifest_fails(fake: Fake, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NO_MANIFEST", "download:0")
    _, result = fake.run(write_values(tmp_path, shards=1), ("training.enabled=false",))
    assert result.exit_code == int(ExitCode.ERROR)
    assert "download[0] failed: exited 0 but wrote no manifest raw/_done/00000.json" in result.failure
    assert fake.starts("preprocess") == []


def test_interrupt_stops_children_and_a_rerun_resumes(fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SECONDS_preprocess_1", "30")  # would outlast the test
    monkeypatch.setenv("FAKE_IGNORE_SIGINT", "1")  # Ctrl-C reaches the children as SIGTERM
    # downloads end in shard order with time to spare, so preprocessing (one shard at a
    # time) takes them in order even on a loaded machine: shard 0 is done when shard 1
    # starts, and shard 2 waits behind shard 1
    monkeypatch.setenv("FAKE_SECONDS_download_1", "0.8")
    monkeypatch.setenv("FAKE_SECONDS_download_2", "1.5")
    values = write_values(tmp_path, shards=3)
    sets = ("training.enabled=false",)

    def interrupt_when_preprocess_1_runs() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = tmp_path / "work" / "state.json"  # what the runner has seen finish
            done = json.loads(state.read_text())["completed"] if state.exists() else {}
            downloaded = {k for k in done if k.startswith("download/")}
            if any(s["shard"] == 1 for s in fake.starts("preprocess")) and len(downloaded) == 3:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=interrupt_when_preprocess_1_runs, daemon=True)
    watcher.start()
    runner, result = fake.run(values, sets)
    watcher.join()
    assert result.exit_code == 130 and result.interrupted_by == signal.SIGINT
    # the 30 s shard was stopped, not waited for
    assert ("preprocess", 1) not in {(e["stage"], e["shard"]) for e in fake.records("ends.jsonl")}
    states = {t.key: t.state for t in result.tasks}
    assert states["preprocess/00001"] == STOPPED and states["preprocess/00002"] == STOPPED
    stopped = next(t for t in result.tasks if t.key == "preprocess/00001")
    assert stopped.exit_code == -signal.SIGTERM  # ended by the runner's signal, not killed after the grace period
    assert states["preprocess/00000"] == DONE
    for start in fake.starts():
        assert not procs.alive(start["pid"]), f"{start} still runs"
    assert done_shards(storage_of(tmp_path), "preprocess") == {0}

    monkeypatch.setenv("FAKE_SECONDS_preprocess_1", "0.2")
    before = {stage: len(fake.starts(stage)) for stage in ("download", "preprocess")}
    _, again = fake.run(values, sets)
    assert again.exit_code == 0
    assert len(fake.starts("download")) == before["download"]  # all three were done
    assert len(fake.starts("preprocess")) == before["preprocess"] + 2  # shards 1 and 2 only
    assert done_shards(storage_of(tmp_path), "preprocess") == {0, 1, 2}


def test_disabled_upstream_without_its_output_is_a_config_error(fake: Fake, tmp_path: Path) -> None:
    values = write_values(tmp_path, shards=2)
    _, result = fake.run(values, ("downloader.enabled=false",))
    assert result.exit_code == 2
    assert "downloader is disabled" in result.failure and "0-1" in result.failure
    assert fake.starts() == []

    # raw data of another shard count: its manifests would never come, nothing may wait for them
    assert fake.run(values, ("preprocessing.enabled=false", "training.enabled=false"))[1].exit_code == 0
    _, result = fake.run(values, ("downloader.enabled=false", "preprocessing.shards=1", "training.enabled=false"))
    assert result.exit_code == 2
    assert "downloaded as 2 shards, but preprocessing.shards is 1 and the downloader is disabled" in result.failure
    assert not fake.starts("preprocess")


def test_values_errors_name_the_file_and_key(tmp_path: Path) -> None:
    values = write_values(tmp_path, shards=2)
    with pytest.raises(ConfigError, match=r"preprocessing\.shards \(3\) must equal downloader\.shards \(2\)"):
        build_plan([values], ["preprocessing.shards=3"])
    with pytest.raises(ConfigError, match=r"bad\.yaml: downloader\.parallelism: expected an integer"):
        bad = write_values(tmp_path, name="bad.yaml", downloader__parallelism="four")
        build_plan([bad])
    with pytest.raises(ConfigError, match=r"preprocessing\.config\.targetRateHz"):
        build_plan([values], ["preprocessing.config.targetRateHz=-1"])
    with pytest.raises(ConfigError, match="every stage is disabled"):
        build_plan([values], ["downloader.enabled=false,preprocessing.enabled=false,training.enabled=false"])
    # a list replaces the lower files' list whole: its errors are the file's that gave it
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"downloader": {"config": {"sources": [{"type": "file", "name": "a", "pathh": "/x"}]}}}))
    with pytest.raises(ConfigError) as info:
        build_plan([values, typo])
    assert "values.yaml" not in str(info.value)
    assert "typo.yaml: downloader.config.sources[0].path: required" in str(info.value)
    assert "typo.yaml: downloader.config.sources[0].pathh: unknown key" in str(info.value)
    typo.write_text(yaml.safe_dump({"downloader": {"config": {"sources": [{"name": "a", "path": "/x"}]}}}))
    with pytest.raises(ConfigError, match=r"typo\.yaml: downloader\.config\.sources\[0\]\.type: required key is missing$"):
        build_plan([values, typo])
    # caught by a dry run, not by the download pods
    no_sources = tmp_path / "no-sources.yaml"
    no_sources.write_text(yaml.safe_dump({"downloader": {"config": {"sources": []}}}))
    with pytest.raises(ConfigError, match=r"no-sources\.yaml: downloader\.config\.sources is empty"):
        build_plan([values, no_sources])
    assert build_plan([values, no_sources], ["downloader.enabled=false"]).stages
    # a value no file of the user's gave is the chart's: named so, not as a file to edit
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"downloader/values\.yaml \(the chart's default\): downloader\.config\.sources "
                                          r"is empty"):
        build_plan([empty])


def test_a_stage_missing_from_the_install_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.local import pipeline

    monkeypatch.setitem(pipeline.STAGES, "preprocessing", ("preprocess", "trajflow.no_such_stage.cli"))
    plan = build_plan([write_values(tmp_path)])
    problems = [p for p in missing_stage_modules(plan) if p.startswith("preprocessing")]
    assert len(problems) == 1
    assert "trajflow preprocess" in problems[0] and "preprocessing.enabled=false" in problems[0]


@pytest.mark.parametrize("env", ["dev", "staging", "production", "kind", "local"])
def test_every_environment_values_file_plans_locally(env: str) -> None:
    """A platform engineer can try any environment's values with `trajflow run` first."""
    repo = Path(__file__).resolve().parents[2]
    plan = build_plan([repo / "values" / f"{env}.yaml"])
    assert [s.stage for s in plan.stages] == ["downloader", "preprocessing", "training"]
    # the in-release Pushgateway is a Helm template: locally nothing is pushed
    assert "{{" not in plan.global_.metrics.pushgateway_url
    for stage in plan.stages:
        assert "{{" not in yaml.safe_dump(stage.rendered)


def test_a_template_other_than_the_pushgateway_is_named(tmp_path: Path) -> None:
    values = write_values(tmp_path, global__storage__s3__endpoint="{{ .Values.minio }}")
    with pytest.raises(ConfigError, match=r"global\.storage\.s3\.endpoint is a Helm template .*--set global\.storage\.s3\.endpoint="):
        build_plan([values])


def test_dry_run_prints_the_commands_and_writes_the_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from trajflow.cli import main

    values = write_values(tmp_path, shards=2)
    work = tmp_path / "work"
    assert main(["run", "-f", str(values), "--dry-run", "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    config = work / "config"
    assert f"download --config {config / 'downloader.yaml'}" in out
    assert "JOB_COMPLETION_INDEX=0 TRAJFLOW_SHARDS=2" in out
    assert f"train --config {config / 'training.yaml'} --nproc-per-node=" in out
    assert f"preprocess --config {config / 'preprocessing.yaml'} --wait 6h" in out  # the chart's waitTimeout
    assert sorted(p.name for p in config.iterdir()) == ["downloader.yaml", "preprocessing.yaml", "training.yaml"]
    assert not (tmp_path / "data").exists()  # nothing ran


@pytest.mark.parametrize("exit_code, hint", [
    (4, "the same command, run again, resumes from them"),
    (130, "the same command, run again, resumes from them"),
    (2, "fix what the error above names, then the same command resumes from them"),
    (3, "fix what the error above names"),
    (5, "fix what the error above names"),
])
def test_the_last_hint_promises_a_resume_only_where_a_rerun_can_succeed(exit_code: int, hint: str) -> None:
    from rich.console import Console

    from trajflow.local.report import print_summary

    console = Console(file=io.StringIO(), width=200)
    doc = {"exitCode": exit_code, "interruptedBy": "SIGINT" if exit_code == 130 else None, "runId": "r", "seconds": 1.0}
    print_summary(console, doc, [])
    text = console.file.getvalue()
    assert hint in text and text.count("finished shards are kept") == 1


def test_the_processes_of_a_stage_share_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four preprocessing processes on 8 CPUs get 2 threads each, not 8 each; a user's
    OMP_NUM_THREADS is kept."""
    from trajflow.local import runner as runner_module

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner_module, "cpu_budget", lambda: 8)
    runner = Runner(build_plan([write_values(tmp_path, shards=4, preprocessing__parallelism=4)]), tmp_path / "work",
                    PlainView(stream=io.StringIO()), command=[sys.executable, str(FAKE)])
    task = next(t for t in runner.tasks if t.stage.stage == "preprocessing")
    runner.config_paths["preprocessing"] = tmp_path / "config.yaml"  # written when the run starts
    assert runner.env(task)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runner.env(task)["OMP_NUM_THREADS"] == "3"


def test_a_local_training_serves_its_metrics_on_this_machine_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.metrics import METRICS_ADDR_ENV

    monkeypatch.setenv(METRICS_ADDR_ENV, "0.0.0.0")
    runner = Runner(build_plan([write_values(tmp_path)]), tmp_path / "work", PlainView(stream=io.StringIO()),
                    command=[sys.executable, str(FAKE)])
    task = next(t for t in runner.tasks if t.stage.stage == "training")
    runner.config_paths["training"] = tmp_path / "config.yaml"
    assert runner.env(task)[METRICS_ADDR_ENV] == "127.0.0.1"


def test_the_stages_after_the_downloader_are_given_its_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the chart mounts the dataset ConfigMap: they wait for the download it names."""
    from trajflow.config.loader import DATASET_CONFIG_ENV

    monkeypatch.setenv(DATASET_CONFIG_ENV, "/elsewhere.yaml")
    runner = Runner(build_plan([write_values(tmp_path)]), tmp_path / "work", PlainView(stream=io.StringIO()),
                    command=[sys.executable, str(FAKE)])
    runner.config_paths = {stage: tmp_path / f"{stage}.yaml" for stage in ("downloader", "preprocessing", "training")}
    given = {t.stage.stage: runner.env(t).get(DATASET_CONFIG_ENV) for t in runner.tasks}
    assert given == {"downloader": None, "preprocessing": str(tmp_path / "downloader.yaml"),
                     "training": str(tmp_path / "downloader.yaml")}
    del runner.config_paths["downloader"]  # a run without the downloader: any download will do
    assert {runner.env(t).get(DATASET_CONFIG_ENV) for t in runner.tasks if t.stage.stage != "downloader"} == {None}
    runner.config_paths["downloader"] = tmp_path / "downloader.yaml"
    del runner.config_paths["preprocessing"]  # nothing remakes the shards: training takes those there are
    assert runner.env(next(t for t in runner.tasks if t.stage.stage == "training")).get(DATASET_CONFIG_ENV) is None


def test_the_stages_after_the_downloader_read_the_config_they_are_given(tmp_path: Path) -> None:
    """The downloader's own stage config stands for the chart's dataset ConfigMap: the stages
    after it take the download generation from it, and nothing stops the local downloader."""
    from trajflow.config.loader import stage_settings, wanted_download

    runner = Runner(build_plan([write_values(tmp_path)]), tmp_path / "work", PlainView(stream=io.StringIO()),
                    command=[sys.executable, str(FAKE)])
    runner.write_configs()
    generation = stage_settings("downloader", runner.config_paths["downloader"]).config.generation_id()
    for task in runner.tasks:
        env = runner.env(task)
        if task.stage.stage == "preprocessing":
            settings = stage_settings("preprocessing", runner.config_paths["preprocessing"], env=env)
            assert settings.download_generation == generation
        assert wanted_download(env) is None  # no shard count: nothing to stop


def test_a_tick_checks_each_task_once_however_many_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.local.runner import PENDING, RUNNING, WAITING

    runner = Runner(build_plan([write_values(tmp_path, shards=40)]), tmp_path / "work", PlainView(stream=io.StringIO()),
                    command=[sys.executable, str(FAKE)])
    reads: list[str] = []
    read_bytes = runner.storage.read_bytes
    monkeypatch.setattr(runner.storage, "read_bytes", lambda key: reads.append(key) or read_bytes(key))

    def launch(task):  # type: ignore[no-untyped-def]
        task.state = RUNNING

    monkeypatch.setattr(runner, "_launch", launch)
    runner._schedule()
    states = Counter((t.stage.stage, t.state) for t in runner.tasks)
    assert states[("downloader", RUNNING)] == 2 and states[("downloader", PENDING)] == 38  # parallelism 2
    assert states[("preprocessing", WAITING)] == 40 and states[("training", WAITING)] == 1
    for task in runner.stage_tasks("downloader")[:2]:
        task.state = DONE
    reads.clear()
    runner._schedule()
    # the two finished downloads make two preprocessing shards ready: their inputs are read once,
    # and the 38 downloads still pending for parallelism are not checked again
    assert sorted(reads) == ["raw/_done/00000.json", "raw/_done/00001.json"]
    runner._schedule()
    assert len(reads) == 2


def test_a_reader_that_goes_away_leaves_the_run_going(fake: Fake, tmp_path: Path) -> None:
    class ClosedPipe(io.StringIO):  # `trajflow run ... | tee log` with tee killed
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    view = PlainView(stream=ClosedPipe())
    result = Runner(build_plan([write_values(tmp_path)]), tmp_path / "work", view,
                    command=[sys.executable, str(FAKE)]).run()
    assert result.exit_code == 0 and all(t.state == DONE for t in result.tasks)
    assert done_shards(storage_of(tmp_path), "preprocess") == {0, 1, 2}


def test_a_log_the_work_dir_cannot_take_stops_the_run_naming_it(fake: Fake, tmp_path: Path) -> None:
    """A full disk under the work dir (/dev/full answers every write with ENOSPC) ends the
    run with one message, instead of a reader thread dying and the child blocking on its pipe."""
    logs = tmp_path / "work" / "logs"
    logs.mkdir(parents=True)
    (logs / "download-00000.log").symlink_to("/dev/full")
    _, result = fake.run(write_values(tmp_path, shards=1))
    assert result.exit_code == 1
    assert f"work dir {tmp_path / 'work'}: cannot write" in result.failure
    assert "No space left on device" in result.failure and "download-00000.log" in result.failure
    assert "Traceback" not in fake.out.getvalue()


def test_a_state_file_the_work_dir_cannot_take_stops_the_run_naming_it(fake: Fake, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / f".state.json.tmp-{os.getpid()}").mkdir()  # where the state's temporary would be written
    _, result = fake.run(write_values(tmp_path, shards=1))
    assert result.exit_code == 1
    assert f"work dir {work}: cannot write" in result.failure and "state.json" in result.failure
    # the shard itself finished: its manifest is there for the next run
    assert done_shards(storage_of(tmp_path), "download") == {0}


def test_a_run_lock_the_work_dir_cannot_take_is_named(fake: Fake, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "run.lock").symlink_to("/dev/full")  # no write succeeds there
    with pytest.raises(ConfigError, match=rf"work dir {work}: cannot write {work / 'run.lock'}: "):
        fake.run(write_values(tmp_path, shards=1))


def test_a_storage_error_in_the_runner_s_own_checks_is_retried(fake: Fake, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 503 that outlasts the client's retries, on the runner's look for a finished
    shard's manifest, must not stop every healthy shard: it is tried again; one that lasts
    ends the run with a one-line error naming the key."""
    from trajflow.local import runner as runner_module

    monkeypatch.setattr(runner_module, "STORAGE_RETRY_DELAYS", (0.01, 0.01))
    values = write_values(tmp_path, shards=2)
    plan = build_plan([values])

    class Flaky:
        def __init__(self, failures: int) -> None:
            self.real, self.failures = runner_module.open_run_root(plan.global_), failures

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def exists(self, key: str) -> bool:
            if key == "raw/_done/00000.json" and self.failures:
                self.failures -= 1
                raise ConnectionError("SlowDown (503)")
            return bool(self.real.exists(key))

    runner = Runner(plan, tmp_path / "work", PlainView(stream=fake.out), storage=Flaky(2),  # type: ignore[arg-type]
                    command=[sys.executable, str(FAKE)])
    assert runner.run().exit_code == 0
    runner = Runner(plan, tmp_path / "work2", PlainView(stream=fake.out), storage=Flaky(10**6),  # type: ignore[arg-type]
                    command=[sys.executable, str(FAKE)], force=True)
    with pytest.raises(TransientError, match=r"looking for raw/_done/00000\.json: ConnectionError: SlowDown"):
        runner.run()


def test_a_store_that_fails_leaves_the_report_without_its_figures() -> None:
    """The summary and report are written whatever the run root does: a store that is down
    gives no manifests (the first failure ends the reading, each would wait out its retries)."""
    from botocore.exceptions import EndpointConnectionError

    from trajflow.local.report import _manifests, training_history

    class DeadStore:
        uri, reads = "s3://bucket/runs/r", 0

        def read_bytes(self, key: str) -> bytes:
            self.reads += 1
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    store = DeadStore()
    assert _manifests(store, "preprocess", 64) == [] and store.reads == 1  # type: ignore[arg-type]
    logged = [{"epoch": 0, "val_loss": 1.0}]
    assert training_history(store, logged) == (logged, {})  # type: ignore[arg-type]
