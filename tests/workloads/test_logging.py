"""Logging: JSON lines off a terminal (pods), readable lines and progress bars on one."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

SCRIPT = r"""
import logging, sys
from trajflow import log
log.setup()
logger = logging.getLogger("trajflow.demo")
logger.debug("hidden at INFO")
logger.info("fetched %s", "a.bin", extra={"shard": 3, "bytes": 1024, "path": __import__("pathlib").Path("/x")})
logger.info("diverged", extra={"loss": float("nan"), "best": [float("-inf")], "by_rank": {(0, 1): float("inf")}})
try:
    1 / 0
except ZeroDivisionError:
    logger.exception("item failed")
with log.progress("download", total=3, unit="items", interval_s=0) as bar:
    for _ in range(3):
        bar.advance()
logger.warning("done")
"""


def _run_piped(env_extra: dict[str, str] | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRAJFLOW_LOG_FORMAT", "TRAJFLOW_LOG_LEVEL")}
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def _run_on_terminal(env_extra: dict[str, str] | None = None) -> str:
    """Run with stderr on a pseudo-terminal and return what it showed."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("TRAJFLOW_LOG_FORMAT", "TRAJFLOW_LOG_LEVEL")}
    env.update({"COLUMNS": "120", "TERM": "xterm", **(env_extra or {})})
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=10)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_json_lines_when_not_on_a_terminal():
    lines = _run_piped()
    # every line is one strict JSON object (no bare NaN, which many log pipelines refuse)
    docs = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}")) for line in lines]
    by_msg = {d["msg"]: d for d in docs}
    fetched = by_msg["fetched a.bin"]
    assert fetched["level"] == "info" and fetched["logger"] == "trajflow.demo"
    assert fetched["shard"] == 3 and fetched["bytes"] == 1024 and fetched["path"] == "/x"
    assert fetched["ts"].endswith("Z") and "T" in fetched["ts"]
    diverged = by_msg["diverged"]
    assert (diverged["loss"], diverged["best"], diverged["by_rank"]) == ("nan", ["-inf"], {"(0, 1)": "inf"})
    failed = by_msg["item failed"]
    assert failed["level"] == "error" and "ZeroDivisionError" in failed["exc"]
    assert "hidden at INFO" not in by_msg
    progress = [d for d in docs if "progress_done" in d]
    assert [d["progress_done"] for d in progress][-1] == 3 and progress[-1]["progress_total"] == 3
    assert progress[-1]["msg"].startswith("download: 3/3 items") and progress[-1]["msg"].endswith(", done")
    assert docs[-1]["msg"] == "done" and docs[-1]["level"] == "warning"


def test_log_level_from_the_environment():
    docs = [json.loads(line) for line in _run_piped({"TRAJFLOW_LOG_LEVEL": "DEBUG"})]
    assert "hidden at INFO" in {d["msg"] for d in docs}
    docs = [json.loads(line) for line in _run_piped({"TRAJFLOW_LOG_LEVEL": "WARNING"})]
    assert {d["level"] for d in docs} == {"warning", "error"}


def test_readable_lines_and_a_progress_bar_on_a_terminal():
    shown = _run_on_terminal()
    assert "fetched a.bin" in shown and "item failed" in shown and "ZeroDivisionError" in shown
    assert "━" in shown and "3/3" in shown  # rich's bar and count
    for line in shown.splitlines():
        stripped = line.strip()
        if stripped.startswith("{"):
            try:
                json.loads(stripped)
            except ValueError:
                continue
            raise AssertionError(f"JSON on a terminal: {line}")


def test_json_can_be_forced_on_a_terminal():
    shown = _run_on_terminal({"TRAJFLOW_LOG_FORMAT": "json"})
    docs = [json.loads(line) for line in shown.replace("\r\n", "\n").splitlines() if line.strip()]
    assert "fetched a.bin" in {d["msg"] for d in docs}


def test_capped_logs_the_first_of_each_kind_then_says_the_rest_go_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from trajflow.log import Capped

    capped = Capped(logging.getLogger("trajflow.capped"), limit=2)
    with caplog.at_level(logging.DEBUG, logger="trajflow.capped"):
        for i in range(4):
            capped.log(logging.WARNING, "failed items", "item %d failed", i)
        capped.log(logging.INFO, "retries", "retry %d", 0)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "item 0 failed"), ("WARNING", "item 1 failed"),
        ("WARNING", "2 failed items logged; further ones are logged at DEBUG level (the shard's summary counts them all)"),
        ("DEBUG", "item 2 failed"), ("DEBUG", "item 3 failed"),
        ("INFO", "retry 0"),  # another kind: its own count
    ]


def test_capped_says_the_rest_go_to_debug_after_every_line_it_counts(caplog: pytest.LogCaptureFixture) -> None:
    """From many threads at once (a download's workers adopting items): the notice was
    sometimes logged before the last full lines, by the thread that counted past the limit."""
    import logging
    import threading

    from trajflow.log import Capped

    ordered = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads change between any two bytecodes: the race shows at once
    for _ in range(20):
        caplog.clear()
        capped = Capped(logging.getLogger("trajflow.capped"), limit=20)
        start = threading.Barrier(8)

        def work(t: int) -> None:
            start.wait()
            for i in range(10):
                capped.log(logging.INFO, "adopted items", "adopted %d.%d", t, i)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        with caplog.at_level(logging.INFO, logger="trajflow.capped"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        lines = [r.getMessage() for r in caplog.records]
        ordered.append(len(lines) == 21 and lines[-1].startswith("20 adopted items logged; further ones"))
    sys.setswitchinterval(switch)
    assert all(ordered), f"{ordered.count(False)} of 20 rounds logged the notice before a line it counts"


def test_json_lines_carry_the_process_context_after_their_own_fields() -> None:
    import logging

    from trajflow.log import JsonFormatter, set_context

    def line(**extra: object) -> dict:
        record = logging.LogRecord("trajflow.x", logging.INFO, __file__, 1, "fetched %s", ("a",), None)
        record.__dict__.update(extra)
        return json.loads(JsonFormatter().format(record))

    set_context(run="r0", stage="preprocess", shard=9)  # an earlier stage of this process
    set_context(run="r1", stage="download", shard=3)
    try:
        assert {k: v for k, v in line().items() if k != "ts"} == {
            "level": "info", "logger": "trajflow.x", "msg": "fetched a", "run": "r1", "stage": "download", "shard": 3}
        assert line(shard=7)["shard"] == 7  # a line's own field wins
        set_context(run="r1", stage="train", rank=0)  # replaces, with nothing left of the shard's
        assert {k: line()[k] for k in ("run", "stage", "rank")} == {"run": "r1", "stage": "train", "rank": 0}
        assert "shard" not in line()
    finally:
        set_context()


def test_progress_logs_while_nothing_advances(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """One large file read for minutes must not leave the log silent."""
    import logging
    import threading

    from trajflow import log
    from trajflow.log import Progress

    monkeypatch.setattr(log, "console", None)  # off a terminal (an earlier log.setup() in this process may have made one)

    logger = logging.getLogger("trajflow.progress-test")
    two_beats = threading.Event()

    class Counting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if sum("0/3 files" in r.getMessage() for r in caplog.records) >= 2:
                two_beats.set()

    logger.addHandler(Counting())
    with caplog.at_level(logging.INFO, logger="trajflow.progress-test"):
        with Progress("shard 00000", total=3, unit="files", interval_s=0.05, logger=logger) as bar:
            assert two_beats.wait(30)  # nothing advanced, and yet the log goes on
            bar.advance(3)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1].startswith("shard 00000: 3/3 files") and messages[-1].endswith(", done")
