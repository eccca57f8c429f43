"""Run the enabled stages on this machine as child processes, the way the chart runs pods.

- Every stage process runs `trajflow <stage> --config FILE` with JOB_COMPLETION_INDEX,
  TRAJFLOW_SHARDS and TRAJFLOW_CONFIG, where FILE is what the chart's ConfigMap holds;
  those after the downloader get its file in TRAJFLOW_DATASET_CONFIG, as the chart's
  dataset ConfigMap gives it to them.
- Download shards run `downloader.parallelism` at a time; preprocessing shard i starts as
  soon as download shard i is done (`preprocessing.parallelism` at a time); training starts
  when every preprocessed shard is done, under `trajflow train --nproc-per-node` (torch's
  elastic agent, rendezvous on 127.0.0.1), as in the chart.
- A shard that finished earlier with the same stage config and the same upstream
  manifests, and whose own output is still there, is skipped (`--force` runs it anyway;
  the stage itself still skips verified items).
- Exit codes follow the chart's podFailurePolicy: 2 (config), 3 (permanent) and 5
  (diverged) stop the run; others are retried `backoffLimitPerIndex` times.
- SIGINT or SIGTERM sends SIGTERM to every child's process group, as the kubelet does to
  pods; after a grace period the rest is killed. The run exits 128+signal (130 for Ctrl-C) and a rerun resumes.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from trajflow.config.loader import DATASET_CONFIG_ENV
from trajflow.errors import FINAL_EXIT_CODES, ConfigError, ExitCode, TransientError
from trajflow.local import procs
from trajflow.files import replace_file
from trajflow.local.pipeline import RunPlan, StagePlan
from trajflow.metrics import METRICS_ADDR_ENV
from trajflow.resources import cpu_budget
from trajflow.storage import Storage, manifest_key, open_run_root, read_manifest_fields, read_train_metrics, shard_name
from trajflow.storage.base import INTERNAL_PREFIX
from trajflow.storage.local import TMP_PREFIX

log = logging.getLogger(__name__)

STATE_VERSION = 1
GRACE_SECONDS = 20.0
STORAGE_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)  # the runner's reads of the run root, then it gives up


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a read of the run root raises when the store or the network fails (not a torn
    file's ValueError): OSError, and botocore's own errors where S3 is in use."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover  boto3 is a base dependency
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)
TICK_SECONDS = 0.2
MAX_RETRY_DELAY_SECONDS = 30.0

PENDING, WAITING, RUNNING, RETRY, DONE, SKIPPED, FAILED, STOPPED = (
    "pending", "waiting", "running", "retry", "done", "skipped", "failed", "stopped",
)
FINISHED = {DONE, SKIPPED}


class View(Protocol):
    def start(self, runner: "Runner") -> None: ...
    def event(self, text: str, level: int = logging.INFO) -> None: ...
    def child_record(self, task: "Task", record: dict[str, Any]) -> None: ...
    def refresh(self) -> None: ...
    def stop(self) -> None: ...


@dataclass
class Task:
    stage: StagePlan
    shard: int
    log_path: Path
    state: str = PENDING
    attempts: int = 0
    proc: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None
    started: float | None = None  # seconds since the run started
    ended: float | None = None
    exit_code: int | None = None
    retry_at: float = 0.0
    last_message: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # latest structured log fields
    history: list[dict[str, Any]] = field(default_factory=list)  # records with epoch metrics
    fingerprint: str = ""
    note: str = ""  # why it is waiting, or how it ended

    @property
    def key(self) -> str:
        return f"{self.stage.command}/{shard_name(self.shard)}"

    @property
    def label(self) -> str:
        return self.stage.command if self.stage.command == "train" else f"{self.stage.command}[{self.shard}]"

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return self.ended - self.started


@dataclass
class RunResult:
    exit_code: int
    seconds: float
    tasks: list[Task]
    interrupted_by: int | None = None  # signal number
    failure: str = ""


def trajflow_command() -> list[str]:
    """How to start `trajflow`: the console script beside this interpreter, on PATH, or -m."""
    beside = Path(sys.executable).with_name("trajflow")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("trajflow")
    if found:
        return [found]
    return [sys.executable, "-m", "trajflow.cli"]


TRAIN_FINISHED = ("completed", "early_stopped")


def training_finished(storage: Storage) -> bool:
    doc = read_train_metrics(storage)
    return doc is not None and doc.get("status") in TRAIN_FINISHED


class StateFile:
    """What finished, with which inputs: `<work>/state.json`, rewritten atomically."""

    def __init__(self, path: Path, root: str):
        self.path, self.root = path, root
        self.completed: dict[str, dict[str, Any]] = {}
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s): every shard will run again", path, exc)
            return
        if doc.get("version") == STATE_VERSION and doc.get("root") == root:
            self.completed = dict(doc.get("completed") or {})

    def matches(self, key: str, fingerprint: str) -> bool:
        return self.completed.get(key, {}).get("fingerprint") == fingerprint

    def record(self, key: str, fingerprint: str, seconds: float) -> None:
        self.completed[key] = {
            "fingerprint": fingerprint,
            "seconds": round(seconds, 3),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": STATE_VERSION, "root": self.root, "completed": self.completed}
        replace_file(self.path, json.dumps(doc, indent=1, sort_keys=True))


def _check_work_dir(work_dir: Path) -> None:
    """--work-dir must be a directory or a path one can be made at: name a file in the way
    in one line (a ConfigError), not as a traceback from mkdir."""
    for path in [work_dir, *work_dir.parents]:
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():
            what = "--work-dir" if path == work_dir else f"--work-dir {work_dir}:"
            raise ConfigError(f"{what} {path} exists and is not a directory; choose a directory for the run's files")


RUN_ROOT_LOCK = f"{INTERNAL_PREFIX}run.lock"
ABANDONED_AFTER_S = 60.0  # a temporary unchanged this long, and open nowhere, has no writer
# where the sweep looks: raw/<shard>/ (the downloaded files, perhaps millions) is the
# downloader's to sweep, and is not walked at every start
SWEPT_DIRS = ("plan", "raw/_done", "resampled", "train")


def _same_endpoint(endpoint: str) -> str:
    """An S3 endpoint spelled one way for every spelling of it (case, default port, trailing
    slash, localhost): two runs on one root must find the same lock. Empty: AWS's own."""
    from urllib.parse import urlsplit

    if not endpoint:
        return ""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host in ("localhost", "::1") else host
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return f"{parts.scheme.lower()}://{host}:{port}{parts.path.rstrip('/')}"


def _hold_run_lock(path: Path, where: str) -> Any:
    """`path` locked for this process (its stage processes inherit it: `spawn(keep_fds=...)`,
    so a runner killed with -9 leaves it held until the last of its stages, which stop only
    on their SIGTERM, exits), with this pid written in it; refused, naming who holds it."""
    import fcntl

    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        if holder.isdigit() and not procs.alive(int(holder)):
            holding = "; ".join(procs.holders(path)) or "none visible to this user"
            raise TransientError(f"the stage processes of an earlier `trajflow run` (pid {holder}, gone) are still "
                                 f"stopping {where}: wait for them to exit (they write their last state), or kill "
                                 f"them if they are stuck, then run again; holding the lock: {holding}") from None
        raise TransientError(f"another `trajflow run` (pid {holder}) is running {where}: "
                             "wait for it to end or stop it first") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
    except OSError:
        with contextlib.suppress(OSError):  # closing flushes the same bytes again
            fh.close()
        raise
    return fh


class Runner:
    def __init__(
        self,
        plan: RunPlan,
        work_dir: Path,
        view: View,
        force: bool = False,
        command: list[str] | None = None,
        storage: Storage | None = None,
        grace_seconds: float = GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.plan = plan
        self.work_dir = Path(work_dir)
        with self._naming_work_dir():
            _check_work_dir(self.work_dir)
        self.view = view
        self.force = force
        self.command = command or trajflow_command()
        self.storage = storage or open_run_root(plan.global_)
        self.grace_seconds = grace_seconds
        self._lock: Any = None  # run.lock while run() holds it
        self._root_lock: Any = None  # the run root's (on an object store, this machine's for it)
        self.clock = clock
        self.t0 = clock()
        self.state = StateFile(self.work_dir / "state.json", plan.root)
        self.config_paths: dict[str, Path] = {}
        self.tasks: list[Task] = []
        for stage in plan.stages:
            for shard in range(stage.shards):
                log_path = self.work_dir / "logs" / f"{stage.command}-{shard_name(shard)}.log"
                self.tasks.append(Task(stage, shard, log_path))
        # a child's output lines, OSError when its log cannot be written, None at its end
        self._lines: queue.Queue[tuple[Task, bytes | OSError | None]] = queue.Queue()
        self._signal: int | None = None
        self._kill_now = False
        self._failure: tuple[int, str] | None = None

    # ---- public ------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock() - self.t0

    def stage_tasks(self, stage: str) -> list[Task]:
        return [t for t in self.tasks if t.stage.stage == stage]

    def run(self) -> RunResult:
        self._lock = self._lock_work_dir()
        try:
            self._root_lock = self._lock_run_root()
            self._sweep_temporaries()
            result = self._run()
            if result.exit_code == 0:
                self._sweep_temporaries()  # what writers killed in earlier runs left, now old enough
            return result
        finally:
            for lock in (self._lock, self._root_lock):
                if lock is not None:
                    lock.close()
            self._lock = self._root_lock = None

    def _lock_work_dir(self) -> Any:
        """Hold `run.lock` in the work dir for the run: a second `trajflow run` of the same run
        would start every shard's process a second time over the same files."""
        with self._naming_work_dir():
            self.work_dir.mkdir(parents=True, exist_ok=True)
        with self._naming_work_dir(self.work_dir / "run.lock"):
            return _hold_run_lock(self.work_dir / "run.lock", f"in {self.work_dir}")

    def _lock_run_root(self) -> Any:
        """Hold `.trajflow-run.lock` in a run root on a filesystem: two runs with other work
        dirs (or from other directories) would otherwise write the same shards and checkpoints.
        An object store has no file to lock: this machine holds one for it instead."""
        root = self._local_root()
        if root is None:
            return self._lock_remote_run_root()
        path = root / RUN_ROOT_LOCK
        try:
            root.mkdir(parents=True, exist_ok=True)
            return _hold_run_lock(path, f"on the run root {root}")
        except OSError as exc:
            raise ConfigError(f"run root {root}: cannot write {exc.filename or path}: {exc.strerror or exc}") from None

    def _lock_remote_run_root(self) -> Any:
        """A lock file of this machine named by the run root's URI and endpoint: it keeps a
        second run of this machine off an S3 root (runs of other machines are not seen)."""
        identity = f"{self.storage.uri} {_same_endpoint(self.plan.global_.storage.s3.endpoint)}"
        locks = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trajflow" / "run-roots"
        path = locks / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.lock"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            return _hold_run_lock(path, f"on the run root {self.storage.uri}")
        except OSError as exc:
            log.warning("cannot hold a lock for the run root %s on this machine (%s): a second `trajflow run` of "
                        "it here would not be refused", self.storage.uri, exc)
            return None

    def _local_root(self) -> Path | None:
        """The run root's directory, when it is on a filesystem."""
        lock = self.storage.local_path(RUN_ROOT_LOCK)
        return lock.parent if lock is not None else None

    def _sweep_temporaries(self) -> None:
        """Remove what writers killed mid-write left in a filesystem run root (a checkpoint's
        temporary is as large as the checkpoint): with the root locked, only this run's stages
        write there, and a temporary none of them has open that has not changed for a minute
        is no write in progress."""
        root = self._local_root()
        if root is None or not root.is_dir():
            return
        cutoff = time.time() - ABANDONED_AFTER_S
        found = [p for d in SWEPT_DIRS for p in (root / d).rglob(f"{TMP_PREFIX}*")
                 if p.is_file() and p.stat().st_mtime < cutoff]
        open_now = procs.open_files() if found else set()
        for path in found:
            if os.path.realpath(path) not in open_now:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    log.info("removed %s, left by a writer that was killed", path)

    def _run(self) -> RunResult:
        self.write_configs()
        previous = self._install_signal_handlers()
        self.view.start(self)
        try:
            self._check_disabled_upstreams()
            while not self._finished():
                if self._signal is not None:
                    # SIGTERM whatever the runner got, as the kubelet sends: a KeyboardInterrupt
                    # raised inside an import can surface as an ImportError that a fallback swallows
                    self._stop_children(signal.SIGTERM)
                    break
                self._drain_lines()
                self._reap()
                if self._failure is not None:
                    self._stop_children(signal.SIGTERM)
                    break
                self._schedule()
                self.view.refresh()
                time.sleep(TICK_SECONDS)
            self._drain_lines()
        finally:
            self._restore_signal_handlers(previous)
            self._stop_children(signal.SIGTERM)  # no-op unless something went wrong above
            self.view.refresh()
            self.view.stop()
        return self._result()

    # ---- setup -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _naming_work_dir(self, path: Path | None = None) -> Iterator[None]:
        """An OS error in the work dir (read-only, no space, a file in the way) as a config
        error that names it (or `path`, being written): the run cannot start there."""
        try:
            yield
        except OSError as exc:
            where = exc.filename or path or self.work_dir
            raise ConfigError(f"work dir {self.work_dir}: cannot write {where}: {exc.strerror or exc}; "
                              "choose another with --work-dir") from None

    def write_configs(self) -> None:
        config_dir = self.work_dir / "config"
        with self._naming_work_dir():
            config_dir.mkdir(parents=True, exist_ok=True)
            for stage in self.plan.stages:
                path = config_dir / f"{stage.stage}.yaml"
                data = stage.rendered_yaml
                if not path.is_file() or path.read_bytes() != data:
                    replace_file(path, data)
                self.config_paths[stage.stage] = path.resolve()

    def _download_shard_counts(self, shards: int) -> set[int]:
        """The shard counts the download manifests 0..shards-1 record."""
        counts = set()
        for i in range(shards):
            with contextlib.suppress(ValueError):  # a torn manifest: preprocessing names it
                manifest = self._from_storage(f"reading {manifest_key('download', i)}",
                                              functools.partial(read_manifest_fields, self.storage, "download", i))
                counts.add((manifest or {}).get("shards", shards))
        return counts

    def _check_disabled_upstreams(self) -> None:
        """A stage whose upstream is disabled reads what an earlier run left; say so if nothing is there."""
        enabled = {s.stage for s in self.plan.stages}
        pre = self.plan.stage("preprocessing")
        if pre and "downloader" not in enabled:
            missing = [i for i in range(pre.shards) if not self._exists(manifest_key("download", i))]
            if missing:
                self._fail(
                    int(ExitCode.CONFIG),
                    f"preprocessing needs download shards {_ranges(missing)}, but the downloader is disabled and "
                    f"{self.storage.uri}/raw/_done/ has no manifest for them; enable it (--set downloader.enabled=true)",
                )
            elif other_counts := self._download_shard_counts(pre.shards) - {pre.shards}:
                # nothing would ever write manifests of this shard count: waiting would be forever
                self._fail(
                    int(ExitCode.CONFIG),
                    f"the raw data under {self.storage.uri}/raw/ was downloaded as {min(other_counts)} shards, but "
                    f"preprocessing.shards is {pre.shards} and the downloader is disabled; use that shard count or "
                    "enable the downloader to re-shard it",
                )
        train = self.plan.stage("training")
        if train and "preprocessing" not in enabled:
            missing = [i for i in range(train.input_shards) if not self._exists(manifest_key("preprocess", i))]
            if missing:
                self._fail(
                    int(ExitCode.CONFIG),
                    f"training needs preprocessed shards {_ranges(missing)}, but preprocessing is disabled and "
                    f"{self.storage.uri}/resampled/_done/ has no manifest for them; enable it (--set preprocessing.enabled=true)",
                )

    # ---- signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._signal is not None:
            self._kill_now = True  # a second Ctrl-C: stop waiting for children
        self._signal = signum

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    # ---- scheduling --------------------------------------------------------------------

    def _finished(self) -> bool:
        return self._failure is not None or all(t.state in FINISHED for t in self.tasks)

    def _upstream_ready(self, task: Task, downloads: dict[int, Task], preprocessing_left: int) -> bool:
        """Whether the inputs of `task` are complete, and note what it waits for if not."""
        stage = task.stage.stage
        if stage == "downloader":
            return True
        if stage == "preprocessing":
            upstream = downloads.get(task.shard)
            if upstream is not None and upstream.state not in FINISHED:
                task.note = f"waiting for download shard {task.shard}"
                return False
            return True
        if preprocessing_left:
            task.note = f"waiting for {preprocessing_left} preprocessed shard(s)"
            return False
        return True

    def _fingerprint(self, task: Task) -> str:
        digest = hashlib.sha256(task.stage.fingerprint.encode())
        stage = task.stage.stage
        inputs: list[str] = []
        if stage == "preprocessing":
            inputs = [manifest_key("download", task.shard)]
        elif stage == "training":
            inputs = [manifest_key("preprocess", i) for i in range(task.stage.input_shards)]
        for key in inputs:
            try:
                digest.update(self._from_storage(f"reading {key}", lambda: self.storage.read_bytes(key)))
            except FileNotFoundError:
                digest.update(b"missing:" + key.encode())
        return digest.hexdigest()

    def _output_present(self, task: Task) -> bool:
        if task.stage.stage == "training":
            return self._from_storage("looking for the trained model", lambda: training_finished(self.storage))
        return self._exists(manifest_key(task.stage.command, task.shard))

    def _exists(self, key: str) -> bool:
        return bool(self._from_storage(f"looking for {key}", lambda: self.storage.exists(key)))

    def _from_storage(self, what: str, call: Callable[[], Any]) -> Any:
        """The runner's own look at the run root, retried: one S3 503 that outlasts the
        client's retries, or a dropped connection, must not stop every healthy shard. (The
        waits block the loop, stage output and Ctrl-C included, for 15 s at most.)"""
        delays = iter(STORAGE_RETRY_DELAYS)
        while True:
            try:
                return call()
            except FileNotFoundError:
                raise
            except _storage_errors() as exc:
                delay = next(delays, None)
                if delay is None:
                    raise TransientError(f"{self.storage.uri}: {what}: {type(exc).__name__}: {exc}") from None
                log.warning("%s: %s failed (%s: %s); again in %g s", self.storage.uri, what, type(exc).__name__,
                            exc, delay)
                time.sleep(delay)

    def _schedule(self) -> None:
        """One tick: check what became ready (once per task: its inputs are final then), launch
        what the stages' parallelism allows. Linear in the tasks: runs with a thousand shards
        tick five times a second."""
        now = self.now()
        downloads = {t.shard: t for t in self.tasks if t.stage.stage == "downloader"}
        preprocessing_left = sum(1 for t in self.tasks if t.stage.stage == "preprocessing" and t.state not in FINISHED)
        running = Counter(t.stage.stage for t in self.tasks if t.state == RUNNING)
        for task in self.tasks:
            if task.state == WAITING or (task.state == PENDING and not task.fingerprint):
                if not self._upstream_ready(task, downloads, preprocessing_left):
                    task.state = WAITING
                    continue
                task.fingerprint = self._fingerprint(task)
                if not self.force and self.state.matches(task.key, task.fingerprint) and self._output_present(task):
                    task.state, task.note = SKIPPED, "done earlier with the same inputs"
                    self.view.event(f"{task.label}: skipped, done earlier with the same config and inputs")
                    continue
                task.state, task.note = PENDING, ""
            if task.state == PENDING or (task.state == RETRY and now >= task.retry_at):
                if running[task.stage.stage] < task.stage.parallelism:
                    self._launch(task)
                    running[task.stage.stage] += 1

    # ---- processes ---------------------------------------------------------------------

    def argv(self, task: Task) -> list[str]:
        config = str(self.config_paths[task.stage.stage])
        argv = [*self.command, task.stage.command, "--config", config]
        if task.stage.stage == "training":
            # the launcher the chart runs too (rendezvous on 127.0.0.1): it exits with the workers' own code
            argv += [f"--nproc-per-node={task.stage.nproc_per_node}", f"--max-restarts={task.stage.max_restarts}"]
        elif task.stage.wait_timeout:  # preprocessing, as the chart runs it
            argv += ["--wait", task.stage.wait_timeout]
        return argv

    def env(self, task: Task) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JOB_COMPLETION_INDEX=str(task.shard),
            TRAJFLOW_SHARDS=str(task.stage.shards),
            TRAJFLOW_CONFIG=str(self.config_paths[task.stage.stage]),
            TRAJFLOW_LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        env[METRICS_ADDR_ENV] = "127.0.0.1"
        env.pop(DATASET_CONFIG_ENV, None)  # the run's own downloader decides, not the shell's
        downloader = self.config_paths.get("downloader")
        if downloader is not None and "preprocessing" in self.config_paths and task.stage.stage != "downloader":
            env[DATASET_CONFIG_ENV] = str(downloader)  # as the chart's dataset ConfigMap
        if "OMP_NUM_THREADS" not in os.environ:
            # processes of one stage share the cores instead of each claiming all of them
            busy = task.stage.nproc_per_node if task.stage.stage == "training" else task.stage.parallelism
            env["OMP_NUM_THREADS"] = str(max(1, cpu_budget() // max(1, busy)))
        return env

    def _launch(self, task: Task) -> None:
        argv = self.argv(task)
        try:
            task.log_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._work_dir_failed(exc, task.log_path)
            return
        task.attempts += 1
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        header = f"=== {stamp} attempt {task.attempts}: {' '.join(argv)}\n".encode()
        try:
            locks = tuple(lock.fileno() for lock in (self._lock, self._root_lock) if lock is not None)
            task.proc = procs.spawn(argv, self.env(task), keep_fds=locks)
        except OSError as exc:
            self._fail(int(ExitCode.ERROR), f"{task.label}: cannot start {argv[0]}: {exc}")
            return
        task.state, task.note, task.exit_code = RUNNING, "", None
        task.started = self.now() if task.started is None else task.started
        task.ended = None
        task.reader = threading.Thread(target=self._read_output, args=(task, task.proc, header), name=f"read-{task.key}",
                                       daemon=True)
        task.reader.start()
        attempt = f" (attempt {task.attempts} of {task.stage.retries + 1})" if task.attempts > 1 else ""
        self.view.event(f"{task.label}: started{attempt}, pid {task.proc.pid}, log {task.log_path}")

    def _read_output(self, task: Task, proc: subprocess.Popen[bytes], header: bytes) -> None:
        """Copy the child's output to its log (after `header`) and the view. Once the log
        cannot be written (a full disk), the output is still read: a child whose pipe fills
        up would block."""
        assert proc.stdout is not None

        def give_up(sink: Any, exc: OSError | None) -> None:
            """Stop logging (the view still gets the lines); report `exc` if any."""
            if sink is not None:
                with contextlib.suppress(OSError):
                    sink.close()
            if exc is not None:
                self._lines.put((task, exc))

        sink: Any = None
        try:
            sink = task.log_path.open("ab")
            sink.write(header)
            sink.flush()
        except OSError as exc:
            sink = give_up(sink, exc)
        for line in iter(proc.stdout.readline, b""):
            if sink is not None:
                try:
                    sink.write(line)
                    sink.flush()
                except OSError as exc:
                    sink = give_up(sink, exc)
            self._lines.put((task, line))
        give_up(sink, None)
        proc.stdout.close()
        self._lines.put((task, None))

    def _drain_lines(self) -> None:
        while True:
            try:
                task, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if isinstance(line, OSError):
                self._work_dir_failed(line, task.log_path)
            elif line is not None:
                self._on_line(task, line.decode(errors="replace").rstrip("\n"))

    def _on_line(self, task: Task, text: str) -> None:
        record: dict[str, Any]
        try:
            parsed = json.loads(text) if text.startswith("{") else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "msg" in parsed:
            record = parsed
        else:
            record = {"level": "info", "msg": text, "raw": True}
        if not record.get("raw"):
            task.last_message = str(record.get("msg", ""))
        extras = {k: v for k, v in record.items() if k not in ("ts", "level", "logger", "msg", "exc", "raw")}
        task.fields.update(extras)
        if task.stage.stage == "training" and any(k in extras for k in ("val_loss", "train_loss")) and "epoch" in extras:
            task.history.append(extras)
        self.view.child_record(task, record)

    def _reap(self) -> None:
        for task in self.tasks:
            if task.state != RUNNING or task.proc is None or task.proc.poll() is None:
                continue
            if task.reader is not None:
                task.reader.join(timeout=5)
            self._drain_lines()
            self._on_exit(task, int(task.proc.returncode))

    def _on_exit(self, task: Task, code: int) -> None:
        task.ended = self.now()
        task.exit_code = code
        task.proc = None
        if code == 0:
            if task.stage.stage != "training" and not self._output_present(task):
                self._finish_failed(task, int(ExitCode.ERROR),
                                    f"exited 0 but wrote no manifest {manifest_key(task.stage.command, task.shard)}")
                return
            task.state = DONE
            elapsed = task.ended - (task.started or task.ended)
            self.view.event(f"{task.label}: done in {elapsed:.1f}s")
            try:
                self.state.record(task.key, task.fingerprint, elapsed)
            except OSError as exc:  # the shard is done all the same: a rerun checks its manifest
                self._work_dir_failed(exc, self.state.path)
            return
        why = _describe_exit(code)
        if code in FINAL_EXIT_CODES:
            self._finish_failed(task, code, f"{why}: {_EXIT_MEANING.get(code, '')}; not retried")
        elif task.attempts <= task.stage.retries:
            delay = min(2.0 ** (task.attempts - 1), MAX_RETRY_DELAY_SECONDS)
            task.state, task.retry_at = RETRY, self.now() + delay
            task.note = f"{why}; retrying in {delay:.0f}s"
            attempt = f"attempt {task.attempts + 1} of {task.stage.retries + 1}"
            self.view.event(f"{task.label}: {why}; retrying in {delay:.0f}s ({attempt})", logging.WARNING)
        else:
            retries = f" after {task.attempts} attempts" if task.attempts > 1 else ""
            self._finish_failed(task, code if code > 0 else int(ExitCode.ERROR), f"{why}{retries}")

    def _finish_failed(self, task: Task, code: int, why: str) -> None:
        task.state, task.note = FAILED, why
        tail = _tail(task.log_path, 15)
        message = f"{task.label} failed: {why}; log {task.log_path}"
        if tail:
            message += "\n" + "\n".join(f"    {line}" for line in tail)
        self._fail(code, message)

    def _work_dir_failed(self, exc: OSError, path: Path) -> None:
        """A write in the work dir failed mid-run (a full disk): the run stops, naming it."""
        self._fail(int(ExitCode.ERROR), f"work dir {self.work_dir}: cannot write {exc.filename or path}: "
                                        f"{exc.strerror or exc}; the run stops (what finished is kept)")

    def _fail(self, code: int, message: str) -> None:
        if self._failure is None:
            self._failure = (code, message)
            self.view.event(message, logging.ERROR)

    def _stop_children(self, sig: int) -> None:
        running = [t for t in self.tasks if t.state == RUNNING and t.proc is not None]
        if not running:
            return
        name = signal.Signals(sig).name
        self.view.event(f"stopping {len(running)} process(es) with {name}", logging.WARNING)
        trees = {t.key: procs.descendants(t.proc.pid) for t in running if t.proc is not None}
        for task in running:
            assert task.proc is not None
            procs.signal_group(task.proc.pid, sig)
        started = self.clock()
        deadline = started + self.grace_seconds
        while self.clock() < deadline and not self._kill_now:
            self._drain_lines()
            if all(t.proc is None or t.proc.poll() is not None for t in running):
                break
            time.sleep(0.05)
        for task in running:
            proc = task.proc
            if proc is None:
                continue
            if proc.poll() is None:
                waited = self.clock() - started
                if self._kill_now:
                    why = f"a second interrupt after {waited:.1f}s of the {self.grace_seconds:.0f}s grace period"
                else:
                    why = f"still running after {waited:.0f}s ({self.grace_seconds:.0f}s grace period)"
                self.view.event(f"{task.label}: {why}; killing it", logging.WARNING)
                procs.signal_group(proc.pid, signal.SIGKILL)
            # the training launcher's workers may live in their own sessions: make sure none outlives it
            procs.kill_tree(trees.get(task.key, []))
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if task.reader is not None:
                task.reader.join(timeout=2)
            task.ended = self.now()
            task.exit_code = proc.returncode
            task.state, task.note, task.proc = STOPPED, "stopped", None
        self._drain_lines()

    def _result(self) -> RunResult:
        seconds = self.now()
        if self._signal is not None:
            for task in self.tasks:
                if task.state in (PENDING, WAITING, RETRY):
                    task.state, task.note = STOPPED, "not started"
            return RunResult(128 + self._signal, seconds, self.tasks, interrupted_by=self._signal)
        if self._failure is not None:
            for task in self.tasks:
                if task.state in (PENDING, WAITING, RETRY):
                    task.state, task.note = STOPPED, "not started"
            return RunResult(self._failure[0], seconds, self.tasks, failure=self._failure[1])
        return RunResult(0, seconds, self.tasks)


_EXIT_MEANING = {
    int(ExitCode.CONFIG): "the configuration is invalid",
    int(ExitCode.PERMANENT): "the input can never succeed",
    int(ExitCode.DIVERGED): "training diverged (loss is NaN/Inf)",
}


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    try:
        return f"exit code {code} ({ExitCode(code).name})"
    except ValueError:
        return f"exit code {code}"


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


_CLI_ERROR = re.compile(r"^trajflow [\w-]+: error: ")


def _tail(path: Path, lines: int) -> list[str]:
    """What explains a failure, from the last attempt's part of a log: the stage's own
    error lines when it wrote any (deduplicated: every rank may say the same), else the
    last lines. JSON records are shown as their level and message."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            raw = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    starts = [i for i, text in enumerate(raw) if text.startswith("=== ") and " attempt " in text]
    raw = raw[starts[-1] + 1 :] if starts else raw
    shown, errors = [], []
    for text in raw:
        try:
            record = json.loads(text) if text.startswith("{") else None
        except ValueError:
            record = None
        if isinstance(record, dict) and "msg" in record:
            level = str(record.get("level", "")).lower()
            text = f"{level.upper()} {record['msg']}"
            if record.get("exc"):
                text += " | " + str(record["exc"]).strip().splitlines()[-1]
            if level in ("error", "critical"):
                errors.append(text)
        elif _CLI_ERROR.match(text):
            errors.append(text)
        shown.append(text)
    if errors:
        return list(dict.fromkeys(errors))[-lines:]
    return shown[-lines:]
