"""Child processes of `trajflow run`: started in their own process groups, stopped as trees.

Each stage process gets its own session, so a Ctrl-C on the terminal reaches only the
runner, which then decides how to stop everyone (forward the signal, wait, kill). On Linux
children also get SIGTERM if the runner dies, and the runner becomes the subreaper of its
descendants, so the training workers (which torch's elastic agent puts in sessions of their
own) can still be found and stopped if the agent itself is killed.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Iterator

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        _libc = None


def die_with_parent() -> bool:
    """SIGTERM this process when its parent dies (Linux); True when it is set. Also run in
    a child between fork and exec."""
    return _libc is not None and _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux); True when it worked."""
    if _libc is None:
        return False
    return _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def spawn(argv: list[str], env: dict[str, str], cwd: str | Path | None = None,
          keep_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start a stage process in a new session, stdout and stderr merged into one pipe;
    `keep_fds` stay open in it (the run's lock).

    Must be called from the main thread: PR_SET_PDEATHSIG fires when the forking thread exits.
    """
    return subprocess.Popen(
        argv,
        pass_fds=keep_fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        # only a prctl call between fork and exec, made while this thread holds the GIL
        preexec_fn=die_with_parent if _libc is not None else None,
    )


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) from /proc, or None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after its last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def descendants(pid: int) -> list[tuple[int, int]]:
    """Every live descendant of `pid` as (pid, start time), found through /proc (Linux)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None:
            parents.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    out, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        out.extend(children)
        frontier.extend(child for child, _ in children)
    return out


def alive(pid: int, start_time: int | None = None) -> bool:
    """Whether `pid` still runs (and is the same process, when its start time is given)."""
    stat = _proc_stat(pid)
    if stat is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return start_time is None
    return start_time is None or stat[1] == start_time


def _open_files() -> Iterator[tuple[Path, str]]:
    """(/proc/<pid>, real path) of every file a process has open (Linux; only the processes
    this user may inspect)."""
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):  # gone, or not ours
            yield from [(fd_dir.parent, os.path.realpath(fd)) for fd in fd_dir.iterdir()]


def open_files() -> set[str]:
    """The real paths of every file a process has open."""
    return {path for _, path in _open_files()}


def holders(path: Path) -> list[str]:
    """`pid (command line)` of every process with `path` open."""
    target = os.path.realpath(path)
    found = []
    for proc in sorted({proc for proc, open_path in _open_files() if open_path == target}, key=lambda p: int(p.name)):
        with contextlib.suppress(OSError):  # gone since
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"{proc.name} ({cmdline[:120]})")
    return found


def signal_group(pid: int, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (the child's own session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(tree: Iterable[tuple[int, int]], sig: int = signal.SIGKILL) -> None:
    """Signal every still-running process of a snapshot taken with `descendants` and
    its process group; the start time guards against recycled pids."""
    for pid, start in tree:
        if alive(pid, start):
            for send in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
                try:
                    send()
                except (ProcessLookupError, PermissionError):
                    pass


def adopted_orphans(known: set[int]) -> list[tuple[int, int]]:
    """Direct children of this process that it did not start itself (adopted as subreaper)."""
    me = os.getpid()
    return [(pid, start) for pid, start in descendants(me) if pid not in known and (_proc_stat(pid) or (0, 0))[0] == me]


def reap(pids: Iterable[int]) -> None:
    """Collect exited adopted children; never touches the runner's own Popen children,
    whose exit status their Popen objects must read."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


