"""Training under torch's elastic launcher (`trajflow train --nproc-per-node N`): gloo on
127.0.0.1 with an explicit free port, 1 and 2 processes, a rank killed mid-epoch, and a
diverged run's exit code.

Tolerance for the killed run: the resumed run must reproduce the uninterrupted run's
validation losses to a relative 1e-6 (on CPU with gloo and two ranks the arithmetic is in
fact the same, so the parameters match bit for bit, which is asserted as well).
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from trajflow.errors import ExitCode
from trajflow.storage import LocalStorage, read_train_metrics
from trajflow.testing import free_port
from trajflow.train import artifacts
from trajflow.train.checkpoint import CheckpointStore
from trajflow.train.synthetic import (
    local_settings,
    write_config_file,
    write_synthetic_shards,
)

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 180
CONFIG = {
    "window": 8,
    "epochs": 4,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "log_every_steps": 5,
    "model": {"type": "gru", "hidden_size": 32, "num_layers": 1},
    "checkpoints": {"every_steps": 7, "keep_last": 3},
}


@dataclass
class Run:
    root: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    nproc: int
    scraped: dict[int, float] = field(default_factory=dict)  # port -> highest steps seen

    @property
    def storage(self) -> LocalStorage:
        return LocalStorage(self.root)

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"training did not finish in {RUN_TIMEOUT_S}s:\n{self.log()[-4000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict:
        doc = read_train_metrics(self.storage)
        assert doc is not None, self.log()[-4000:]
        return doc


def start_run(tmp_path: Path, run_id: str, nproc: int, max_restarts: int = 0, data: bool = True,
              env_extra: dict[str, str] | None = None, **overrides: object) -> Run:
    port = free_port(2)  # local ranks 0 and 1 serve /metrics on port and port + 1
    settings = local_settings(tmp_path, run_id, **{**CONFIG, "metrics_port": port, **overrides})
    root = tmp_path / run_id
    if data:
        write_synthetic_shards(LocalStorage(root), shards=2, episodes_per_shard=6, length=120)
    config_file = write_config_file(tmp_path / f"{run_id}.yaml", settings)
    log_path = tmp_path / f"{run_id}.log"
    env = {**os.environ, "TRAJFLOW_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    with open(log_path, "wb") as log_fh:
        process = subprocess.Popen(
            [sys.executable, "-m", "trajflow.cli", "train", "--config", str(config_file),
             "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts)],
            stdout=log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            # SIGINT as a terminal's Ctrl-C finds it (a shell running these tests in the background ignores it)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    return Run(root, process, log_path, port, nproc)


def scrape_while_running(run: Run) -> threading.Thread:
    """Poll every rank's /metrics until the launcher exits; keep the highest step count."""
    pattern = re.compile(r"^trajflow_train_steps_total (\S+)$", re.MULTILINE)

    def poll() -> None:
        while run.process.poll() is None:
            for port in range(run.metrics_port, run.metrics_port + run.nproc):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
                        match = pattern.search(resp.read().decode())
                # before a rank listens, a connection to its free port can meet itself (a TCP
                # self-connect echoes the request back as the status line)
                except (OSError, http.client.HTTPException):
                    continue
                if match:
                    run.scraped[port] = max(run.scraped.get(port, 0.0), float(match.group(1)))
            time.sleep(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def worker_pid(launcher: int, rank: int) -> int | None:
    for pid in children(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """An uninterrupted 2-process run; the reference for the killed one."""
    tmp = tmp_path_factory.mktemp("train-2proc")
    run = start_run(tmp, "ref", nproc=2)
    scraper = scrape_while_running(run)
    assert run.wait() == 0, run.log()[-4000:]
    scraper.join(timeout=5)
    return run


def check_converged_and_in_sync(run: Run, nproc: int) -> dict:
    doc = run.metrics()
    assert doc["status"] == "completed" and doc["world_size"] == nproc
    assert doc["final_val_loss"] < 0.5 * doc["initial_val_loss"], doc["history"]
    assert doc["ranks_in_sync"] is True
    assert len(doc["parameter_digests"]) == nproc and len(set(doc["parameter_digests"])) == 1
    for key in (artifacts.CURVE_KEY, artifacts.MODEL_KEY, artifacts.CONFIG_KEY):
        assert run.storage.exists(key), key
    return doc


def test_one_process_run_converges(tmp_path: Path) -> None:
    run = start_run(tmp_path, "one", nproc=1)
    assert run.wait() == 0, run.log()[-4000:]
    check_converged_and_in_sync(run, 1)
    summary = [json.loads(line) for line in run.log().splitlines() if line.startswith('{"status"')]
    assert summary and summary[-1]["world_size"] == 1


def test_two_process_run_converges_with_equal_parameters_and_serves_metrics(two_process_run: Run) -> None:
    doc = check_converged_and_in_sync(two_process_run, 2)
    assert doc["restarts"] == 0 and doc["resumed_from"] == []
    # both ranks served /metrics while training, each on metricsPort + LOCAL_RANK
    ports = [two_process_run.metrics_port, two_process_run.metrics_port + 1]
    assert all(two_process_run.scraped.get(p, 0) > 0 for p in ports), two_process_run.scraped


def test_killed_rank_restarts_the_group_and_resumes_to_the_same_result(tmp_path: Path, two_process_run: Run) -> None:
    run = start_run(tmp_path, "killed", nproc=2, max_restarts=1)
    store = CheckpointStore(run.storage)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    killed_after = None
    while killed_after is None:
        assert run.process.poll() is None, f"the run ended before a rank could be killed:\n{run.log()[-4000:]}"
        assert time.monotonic() < deadline, "no mid-epoch checkpoint in epoch 1 appeared"
        mid = [c for c in store.list() if c.epoch >= 1 and c.batch_in_epoch > 0]
        pid = worker_pid(run.process.pid, rank=1)
        if mid and pid:
            os.kill(pid, signal.SIGKILL)  # rank 1 dies mid-epoch, rank 0 is left waiting
            killed_after = mid[-1]
        else:
            time.sleep(0.02)
    assert run.wait() == 0, run.log()[-4000:]
    doc = run.metrics()
    reference = two_process_run.metrics()
    assert doc["restarts"] == 1
    assert len(doc["resumed_from"]) == 1
    resumed = doc["resumed_from"][0]
    assert resumed["restart"] == 1 and resumed["step"] >= killed_after.step
    assert "failed (exitcode: -9) local_rank: 1" in run.log()  # the agent saw the kill
    assert doc["steps"] == reference["steps"]
    assert [h["epoch"] for h in doc["history"]] == [h["epoch"] for h in reference["history"]]
    for got, want in zip(doc["history"], reference["history"]):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
    assert doc["final_val_loss"] == pytest.approx(reference["final_val_loss"], rel=1e-6)
    assert doc["parameter_digests"] == reference["parameter_digests"]


def injected(tmp_path: Path, sitecustomize: str, **env: str) -> dict[str, str]:
    """The environment of a run whose processes import `sitecustomize` first."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(sitecustomize)
    return {**env, "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}


# Preprocessing rewrites the shards (3 instead of 2) after rank 0 has opened them and
# before rank 1 does.
REWRITTEN_BEFORE_RANK_1 = '''
import os
root = os.environ.get("TEST_REWRITE_SHARDS")
if root and os.environ.get("RANK") == "1":
    from trajflow.storage import LocalStorage
    from trajflow.train import loop
    from trajflow.train.synthetic import write_synthetic_shards
    open_shards = loop.open_shards
    def rewritten_first(storage, *args, **kw):
        write_synthetic_shards(LocalStorage(root), shards=3, episodes_per_shard=4, length=120)
        return open_shards(storage, *args, **kw)
    loop.open_shards = rewritten_first
'''


def test_ranks_that_open_different_shards_stop_together(tmp_path: Path) -> None:
    """Each rank lists resampled/ itself: ranks that saw different shards would wait in
    collectives the others never reach (for the 30 min timeout), or train on other windows."""
    env = injected(tmp_path, REWRITTEN_BEFORE_RANK_1, TEST_REWRITE_SHARDS=str(tmp_path / "rewritten"))
    run = start_run(tmp_path, "rewritten", nproc=2, env_extra=env)
    assert run.wait() == ExitCode.TRANSIENT, run.log()[-4000:]
    assert run.log().count("the ranks opened different shards under") == 2  # each rank says why


# Collectives give up after 10 s, and rank 0 takes 15 s to check the shards (terabytes from
# S3 take hours).
SLOW_SHARDS = '''
import os, time
if os.environ.get("TEST_SLOW_SHARDS"):
    from trajflow.train import dist, loop
    setup = dist.DistContext.setup
    dist.DistContext.setup = lambda self, device="auto", timeout_s=0: setup(self, device, 10.0)
    if os.environ.get("RANK") == "0":
        open_shards = loop.open_shards
        def slow(*args, **kw):
            time.sleep(15)
            return open_shards(*args, **kw)
        loop.open_shards = slow
'''


def test_peers_wait_for_a_slow_check_of_the_shards_beyond_the_collective_timeout(tmp_path: Path) -> None:
    """Each node's first rank fetches or checks the shards while the others wait: past the
    collective timeout (30 min) they would give up, and every restart would start over."""
    run = start_run(tmp_path, "slow-shards", nproc=2, env_extra=injected(tmp_path, SLOW_SHARDS, TEST_SLOW_SHARDS="1"),
                    epochs=1)
    assert run.wait() == 0, run.log()[-4000:]
    assert run.metrics()["restarts"] == 0


# Rank 0's checkpoint of the stop is slow (a large model to S3), and rank 1 notes whether it
# was written when rank 1 stopped: a rank that stops first makes its launcher give rank 0
# 30 s before a SIGKILL.
SLOW_STOP_SAVE = '''
import os, pathlib, time
marks = os.environ.get("TEST_SLOW_STOP_SAVE")
if marks:
    marks = pathlib.Path(marks)
    from trajflow.errors import Terminated
    from trajflow.train import loop
    from trajflow.train.checkpoint import CheckpointStore
    if os.environ.get("RANK") == "0":
        save = CheckpointStore.save
        def slow_save(self, payload, **kw):
            if kw.get("val_loss") is None:  # the stop's (every_steps 0: no other mid-epoch save)
                time.sleep(2)
            info = save(self, payload, **kw)
            (marks / f"saved-{kw['step']}").touch()
            return info
        CheckpointStore.save = slow_save
    else:
        stop = loop.Trainer.stop_with_checkpoint
        def noting_stop(self, *args, **kw):
            try:
                stop(self, *args, **kw)
            except Terminated:
                written = (marks / f"saved-{self.state.step}").exists()
                (marks / "rank-1-stopped").write_text("after the save" if written else "before the save")
                raise
        loop.Trainer.stop_with_checkpoint = noting_stop
'''


def test_sigterm_to_one_rank_checkpoints_the_step_and_resumes_to_the_same_result(
        tmp_path: Path, two_process_run: Run) -> None:
    """A node drained under one worker: the group learns of its SIGTERM in the step's
    all-reduce, checkpoints that step and stops; the restarted group resumes there. With
    DataLoader workers, which the agent's signal to the worker's process group must spare.
    Rank 1 stops only once rank 0 has written the checkpoint."""
    marks = tmp_path / "marks"
    marks.mkdir()
    run = start_run(tmp_path, "drained", nproc=2, max_restarts=1, num_workers=2,
                    env_extra=injected(tmp_path, SLOW_STOP_SAVE, TEST_SLOW_STOP_SAVE=str(marks)),
                    checkpoints={"every_steps": 0, "keep_last": 3})
    store = CheckpointStore(run.storage)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        assert run.process.poll() is None, f"the run ended before a rank could be stopped:\n{run.log()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint of epoch 0 appeared"
        pid = worker_pid(run.process.pid, rank=1)
        if pid and store.list():
            os.killpg(pid, signal.SIGTERM)  # rank 1's group alone, as the agent of a drained pod passes it on
            break
        time.sleep(0.02)
    assert run.wait() == 0, run.log()[-4000:]
    text = run.log()
    stopped_at = [int(s) for s in re.findall(r"1 rank\(s\) got a stop signal(?: \(this one SIGTERM\))?; the group "
                                             r"checkpointed step (\d+)", text)]
    assert len(stopped_at) == 2 and len(set(stopped_at)) == 1, text[-4000:]  # each rank says why, at one step
    assert text.count("(this one SIGTERM)") == 1  # rank 1's
    assert (marks / "rank-1-stopped").read_text() == "after the save"
    doc = run.metrics()
    reference = two_process_run.metrics()
    assert doc["restarts"] == 1
    assert [(r["restart"], r["step"]) for r in doc["resumed_from"]] == [(1, stopped_at[0])]
    assert doc["steps"] == reference["steps"]
    for got, want in zip(doc["history"], reference["history"], strict=True):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-6)
    assert doc["parameter_digests"] == reference["parameter_digests"]


def test_ctrl_c_checkpoints_the_step_and_a_rerun_resumes_to_the_same_result(
        tmp_path: Path, two_process_run: Run) -> None:
    """Ctrl-C in the terminal of a local `trajflow train --nproc-per-node 2` (SIGINT to the
    launcher's process group): the agent passes it on to its workers, the group checkpoints
    one step and the launcher exits 130; running the command again resumes there."""
    run = start_run(tmp_path, "interrupted", nproc=2, num_workers=2, checkpoints={"every_steps": 0, "keep_last": 3})
    store = CheckpointStore(run.storage)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not store.list():
        assert run.process.poll() is None, f"the run ended before it could be interrupted:\n{run.log()[-4000:]}"
        assert time.monotonic() < deadline, "no checkpoint of epoch 0 appeared"
        time.sleep(0.02)
    os.killpg(run.process.pid, signal.SIGINT)
    assert run.wait() == 128 + signal.SIGINT, run.log()[-4000:]
    text = run.log()
    stopped_at = [int(s) for s in re.findall(r"rank\(s\) got a stop signal(?: \(this one SIGINT\))?; the group checkpointed "
                                             r"step (\d+)", text)]
    assert len(stopped_at) == 2 and len(set(stopped_at)) == 1, text[-4000:]  # both ranks, at one step
    assert "(this one SIGINT)" in text
    newest = store.list()[-1]
    assert newest.step == stopped_at[0] and newest.val_loss is None  # the stop's own checkpoint, mid-epoch

    rerun = start_run(tmp_path, "interrupted", nproc=2, data=False, num_workers=2,
                      checkpoints={"every_steps": 0, "keep_last": 3})
    assert rerun.wait() == 0, rerun.log()[-4000:]
    doc = rerun.metrics()
    assert [r["step"] for r in doc["resumed_from"]] == [stopped_at[0]]
    reference = two_process_run.metrics()
    assert doc["steps"] == reference["steps"]
    assert doc["parameter_digests"] == reference["parameter_digests"]


def test_diverged_run_exits_with_the_diverged_code_and_restarts_do_not_retrain(tmp_path: Path) -> None:
    run = start_run(tmp_path, "nan", nproc=1, max_restarts=2, learning_rate=1e30, grad_clip=0.0, metrics_port=0)
    assert run.wait() == int(ExitCode.DIVERGED), run.log()[-4000:]
    text = run.log()
    # the worker's error, the two restarted workers' refusals, and the launcher's last line
    assert text.count("training diverged: the loss or gradient norm became NaN/Inf") == 4, text[-4000:]
    assert "training workers failed after 2 restart(s): training diverged" in text.strip().splitlines()[-1]
    # the agent restarted the group twice; each restarted worker stopped at once
    assert text.count("not retried: an earlier attempt of this worker group failed") == 2
    assert '"worker_exit_codes"' in text
    doc = run.metrics()
    assert doc["status"] == "diverged" and doc["restarts"] == 0  # written by the one attempt that trained
    assert CheckpointStore(run.storage).list() == []


def test_every_rank_stops_with_the_error_of_the_rank_that_reads_the_data(tmp_path: Path) -> None:
    run = start_run(tmp_path, "nodata", nproc=2, data=False, metrics_port=0)
    assert run.wait() == int(ExitCode.TRANSIENT), run.log()[-4000:]
    text = run.log()
    # each rank says why (the agent may stop the slower one once the first has exited)
    assert text.count("no done shards yet; training starts after preprocessing has finished") >= 1
    assert "failed unexpectedly" not in text and "Connection closed" not in text, text[-4000:]
    codes = json.loads(re.search(r'"worker_exit_codes": (\{[^}]*\})', text).group(1))
    assert 4 in codes.values() and set(codes.values()) <= {4, -15}


def test_workers_die_with_a_killed_launcher(tmp_path: Path) -> None:
    run = start_run(tmp_path, "orphans", nproc=2, epochs=100000, metrics_port=0, early_stopping={"enabled": False})
    deadline = time.monotonic() + 120
    while '"msg": "epoch done"' not in run.log() and run.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # training, past the rendezvous: the workers no longer need the agent
    workers = children(run.process.pid)
    assert len(workers) == 2, run.log()[-4000:]
    run.process.kill()  # SIGKILL to the launcher alone (an OOM kill): torch gave its workers sessions of their own
    run.process.wait()
    deadline = time.monotonic() + 20  # a worker left behind would train on for hours
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
