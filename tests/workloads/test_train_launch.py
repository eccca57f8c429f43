"""launch() under a PyTorchJob: the operator restarts the container on every exit code
(restartPolicy OnFailure), so a final failure (config 2, permanent 3, diverged 5) kept in
the pod's /tmp makes the restarted launcher exit with it at once, without starting the
workers (no wait for their rendezvous, no shard check, no retraining to the divergence)."""
from __future__ import annotations

import os
import tempfile

import pytest
from trajflow.errors import ExitCode
from trajflow.train import launch
from trajflow.train.errors import TrainingDiverged

torchrun = pytest.importorskip("torch.distributed.run")

OPTIONS = launch.LaunchOptions(nproc_per_node="1", nnodes="2", rdzv_endpoint="127.0.0.1:1")


def workers_diverge(args):  # type: ignore[no-untyped-def]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    launch.record_final_failure(TrainingDiverged("loss became NaN/Inf at epoch 0, step 3"))
    raise ChildFailedError("trajflow", {0: ProcessFailure(0, 4000, int(ExitCode.DIVERGED), "no-error-file")})


@pytest.fixture
def pod_tmp(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """$TMPDIR: the pod's /tmp emptyDir, which outlives a restarted container."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in (launch.KEEP_FINAL_FAILURE_ENV, launch.FINAL_FAILURE_ENV, launch.AGENT_PID_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_a_restarted_pytorchjob_launcher_repeats_a_final_failure_without_starting_the_workers(
        pod_tmp, monkeypatch, caplog):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(launch.KEEP_FINAL_FAILURE_ENV, "1")
    monkeypatch.setattr(torchrun, "run", workers_diverge)
    assert launch.launch(OPTIONS, ["--config", "x"]) == ExitCode.DIVERGED
    marker = pod_tmp / launch.KEPT_FINAL_FAILURE_FILE
    assert marker.exists()  # kept after the launcher exits

    def never(args):  # type: ignore[no-untyped-def]
        pytest.fail("the restarted launcher started the workers again after a final failure")

    monkeypatch.setattr(torchrun, "run", never)
    caplog.clear()
    assert launch.launch(OPTIONS, ["--config", "x"]) == ExitCode.DIVERGED
    assert str(marker) in caplog.text and "NaN/Inf" in caplog.text
    assert launch.FINAL_FAILURE_ENV not in os.environ


def test_the_job_launcher_keeps_no_final_failure_past_its_exit(pod_tmp, monkeypatch, caplog):  # type: ignore[no-untyped-def]
    """An Indexed Job's failed pod is replaced (its podFailurePolicy fails the Job on 2, 3, 5):
    nothing is left behind, and a second launch starts the workers."""
    monkeypatch.setattr(torchrun, "run", workers_diverge)
    assert launch.launch(OPTIONS, ["--config", "x"]) == ExitCode.DIVERGED
    # the last line (the pod's termination message) says why
    assert caplog.records[-1].getMessage() == (
        "training workers failed after 0 restart(s): loss became NaN/Inf at epoch 0, step 3")
    assert list(pod_tmp.iterdir()) == []
    started = []
    monkeypatch.setattr(torchrun, "run", started.append)
    assert launch.launch(OPTIONS, ["--config", "x"]) == ExitCode.OK
    assert len(started) == 1


@pytest.mark.parametrize("nproc, given, expected", [("4", None, "2"), ("2", "3", "3"), ("1", None, None),
                                                     ("gpu", None, None)])
def test_the_workers_of_a_cpu_pod_share_its_cpus(pod_tmp, monkeypatch, nproc, given, expected):  # type: ignore[no-untyped-def]
    """torchrun gives each of several workers one thread unless OMP_NUM_THREADS says otherwise:
    4 ranks of an 8-CPU pod would use 4 of its CPUs."""
    monkeypatch.setattr(launch, "cpu_budget", lambda: 8)
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    seen = []
    monkeypatch.setattr(torchrun, "run", lambda args: seen.append(os.environ.get("OMP_NUM_THREADS")))
    options = launch.LaunchOptions(nproc_per_node=nproc, nnodes="2", rdzv_endpoint="127.0.0.1:1")
    assert launch.launch(options, ["--config", "x"]) == ExitCode.OK
    assert seen == [expected]
