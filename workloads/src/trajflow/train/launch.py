"""Start the training workers through torch's elastic launcher (what `torchrun` runs) and
turn the workers' exit codes into the pod's.

Plain `torchrun` exits 1 whatever its workers exited with, so the chart's podFailurePolicy
could not tell a diverged run (fail the Job) from a crash (retry). This launcher runs the
same elastic agent in-process (c10d rendezvous, `--max-restarts`) and, when the workers
still fail after the restarts, exits with the most decisive worker exit code: CONFIG,
then DIVERGED, PERMANENT, TRANSIENT, TIMEOUT; anything else (a crash, a signal) is ERROR.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from trajflow.errors import FINAL_EXIT_CODES, ExitCode, TrajflowError
from trajflow.files import replace_file
from trajflow.resources import cpu_budget

log = logging.getLogger(__name__)

# the order in which a worker exit code decides the pod's
_DECISIVE = (ExitCode.CONFIG, ExitCode.DIVERGED, ExitCode.PERMANENT, ExitCode.TRANSIENT, ExitCode.TIMEOUT)
# set by the launcher for its workers: where a worker records a final failure, and the agent's pid
FINAL_FAILURE_ENV = "TRAJFLOW_FINAL_FAILURE_FILE"
AGENT_PID_ENV = "TRAJFLOW_AGENT_PID"
# "1" (the PyTorchJob's pods): the final-failure marker outlives the launcher, see `launch`
KEEP_FINAL_FAILURE_ENV = "TRAJFLOW_KEEP_FINAL_FAILURE"
KEPT_FINAL_FAILURE_FILE = "trajflow-final-failure.json"


def record_final_failure(exc: TrajflowError) -> None:
    """Note a worker's final failure for the restarted group (see `earlier_final_failure`)."""
    path = os.environ.get(FINAL_FAILURE_ENV)
    if not path or exc.exit_code not in FINAL_EXIT_CODES:
        return
    with contextlib.suppress(OSError):
        replace_file(Path(path), json.dumps({"exit_code": int(exc.exit_code), "message": str(exc)}))


def earlier_final_failure() -> tuple[int, str] | None:
    """(exit code, message) of a final failure of an earlier attempt of this group: the
    agent restarts the workers after any failure (--max-restarts), and a restarted worker
    that would only fail the same way (a config error, a divergence) again exits at once,
    with no data loaded or steps retrained."""
    path = os.environ.get(FINAL_FAILURE_ENV)
    if not path:
        return None
    try:
        with open(path) as fh:
            doc = json.load(fh)
        return int(doc["exit_code"]), str(doc["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pod_exit_code(worker_codes: Iterable[int]) -> int:
    """The pod's exit code from the failed workers' codes."""
    codes = set(worker_codes)
    for code in _DECISIVE:
        if int(code) in codes:
            return int(code)
    return int(ExitCode.ERROR)


@dataclass
class LaunchOptions:
    """The torchrun options the launcher takes (names as torchrun spells them)."""

    nproc_per_node: str = "1"  # an integer, or torchrun's "gpu"/"cpu"/"auto"
    nnodes: str = "1"  # "N" or "MIN:MAX"
    rdzv_endpoint: str = ""  # host:port of the c10d store (pod 0 of the Job)
    rdzv_id: str = ""  # same on every node of one run
    rdzv_conf: str = ""  # e.g. "join_timeout=900"
    max_restarts: int = 0
    monitor_interval: float = 0.5
    local_addr: str = ""  # this node's address as the others reach it

    def torchrun_args(self) -> list[str]:
        args = [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--max-restarts={self.max_restarts}",
            f"--monitor-interval={self.monitor_interval}",
        ]
        if self.rdzv_endpoint:
            args.append(f"--rdzv-endpoint={self.rdzv_endpoint}")
        if self.rdzv_id:
            args.append(f"--rdzv-id={self.rdzv_id}")
        if self.rdzv_conf:
            args.append(f"--rdzv-conf={self.rdzv_conf}")
        if self.local_addr:
            args.append(f"--local-addr={self.local_addr}")
        return args


def worker_command(train_args: Sequence[str], log_level: str | None = None) -> list[str]:
    """`python -m trajflow.cli [--log-level L] train ARGS`: the interpreter running this
    launcher, so a virtual environment needs no `trajflow` on PATH."""
    head = [sys.executable, "-m", "trajflow.cli"]
    if log_level:
        head += ["--log-level", log_level]
    return [*head, "train", *train_args]


SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


def _warn_unless_shutdown_timeout_is_read() -> None:
    """The training chart gives the workers the pod's grace period to checkpoint through
    this variable; an older torch's agent ignores it and kills them 30 s after SIGTERM."""
    from torch.distributed.launcher.api import LaunchConfig

    if os.environ.get(SHUTDOWN_TIMEOUT_ENV) and "shutdown_timeout" not in LaunchConfig.__dataclass_fields__:
        import torch

        log.warning("torch %s ignores %s: on SIGTERM the workers are killed after 30 s, checkpointed or not "
                    "(the trajflow-gpu image carries a torch that reads it)", torch.__version__, SHUTDOWN_TIMEOUT_ENV)


def launch(options: LaunchOptions, train_args: Sequence[str], log_level: str | None = None) -> int:
    """Run the elastic agent until the workers finish; returns the pod's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousError,
        RendezvousTimeoutError,
    )
    from torch.distributed.run import parse_args, run

    # With the agent's TCPStore shared (torch's default), a restarted group reads the keys
    # its dead predecessor left (gloo/NCCL addresses) and fails to connect
    # (pytorch/pytorch#135712, #167288); a store per attempt avoids that.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    _warn_unless_shutdown_timeout_is_read()
    command = worker_command(train_args, log_level)
    argv = [*options.torchrun_args(), "--no-python", command[0], *command[1:]]
    markers = None
    if os.environ.get(KEEP_FINAL_FAILURE_ENV) == "1":
        # A PyTorchJob restarts the container on any exit code (OnFailure): the marker sits
        # in $TMPDIR, the pod's /tmp emptyDir, which outlives the container, so a restart
        # after a final failure exits at once. It is per pod: a new PyTorchJob starts clean.
        marker = os.path.join(tempfile.gettempdir(), KEPT_FINAL_FAILURE_FILE)
        os.environ[FINAL_FAILURE_ENV] = marker
        earlier = earlier_final_failure()
        if earlier is not None:
            os.environ.pop(FINAL_FAILURE_ENV)
            log.error("not retried: this pod failed earlier in a way no restart changes (exit %d, see %s): %s",
                      earlier[0], marker, earlier[1])
            return earlier[0]
    else:  # a Job's failed pod is replaced; its podFailurePolicy fails the Job on a final code
        markers = tempfile.mkdtemp(prefix="trajflow-train-")
        os.environ[FINAL_FAILURE_ENV] = os.path.join(markers, "final-failure.json")
    nproc = options.nproc_per_node
    if "OMP_NUM_THREADS" not in os.environ and nproc.isdigit() and int(nproc) > 1:
        # torchrun gives each of several workers one thread otherwise: a CPU pod's ranks share its limit
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_budget() // int(nproc)))
    log.info("starting training workers", extra={"torchrun": argv})
    os.environ[AGENT_PID_ENV] = str(os.getpid())
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        code = pod_exit_code(codes.values())
        # the pod's last line is its termination message: it says why, not only how
        earlier = earlier_final_failure()
        why = f": {earlier[1]}" if earlier is not None and earlier[0] == code else ""
        log.error("training workers failed after %d restart(s)%s", options.max_restarts, why,
                  extra={"worker_exit_codes": codes, "exit_code": code})
        return code
    except RendezvousTimeoutError as exc:
        log.error("rendezvous timed out: %s", exc)
        return int(ExitCode.TIMEOUT)
    except RendezvousError as exc:
        earlier = earlier_final_failure()
        if earlier is not None:
            # the other nodes' agents left as their workers failed for good (a divergence):
            # the same failure, not a crash to retry
            log.error("rendezvous failed after a worker failed in a way no restart changes (exit %d): %s", *earlier)
            return earlier[0]
        log.error("rendezvous failed: %s", exc)
        return int(ExitCode.ERROR)
    except SignalException as exc:
        log.warning("launcher stopped by signal %s", exc.sigval)
        return 128 + int(exc.sigval)
    finally:
        if markers is not None:
            shutil.rmtree(markers, ignore_errors=True)
        for name in (FINAL_FAILURE_ENV, AGENT_PID_ENV):
            os.environ.pop(name, None)
    return int(ExitCode.OK)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_local(nproc: int | str, train_args: Sequence[str], *, port: int | None = None, max_restarts: int = 0,
                 log_level: str | None = None, rdzv_id: str = "trajflow-local") -> int:
    """`nproc` workers on this machine, rendezvous on 127.0.0.1 and a free port (the local
    runner's entry point)."""
    if port is None:
        port = _free_port()
    options = LaunchOptions(
        nproc_per_node=str(nproc),
        nnodes="1",
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_id=rdzv_id,
        max_restarts=max_restarts,
        local_addr="127.0.0.1",
    )
    return launch(options, train_args, log_level)
