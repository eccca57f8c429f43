"""`trajflow train`: a training worker, or, with `--nproc-per-node`, the launcher of them.

    # one process (or one worker under torchrun: RANK, WORLD_SIZE, LOCAL_RANK... from it)
    trajflow train --config /etc/trajflow/config.yaml
    # launcher: the elastic agent starts N workers per node, restarts the group up to
    # --max-restarts times, and exits with the workers' decisive exit code
    trajflow train --config /etc/trajflow/config.yaml --nproc-per-node 8 --nnodes 4 \\
        --rdzv-endpoint trainer-0.trainer:29400 --max-restarts 3
    # on this machine, from values files
    trajflow train -f values/local.yaml --nproc-per-node 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable

from trajflow import log as trajflow_log
from trajflow.config import add_config_arguments, stage_settings
from trajflow.config.merge import set_option
from trajflow.errors import ConfigError, ExitCode, TrajflowError

STAGE = "training"
log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    group = parser.add_argument_group(
        "launcher", "with --nproc-per-node this command is torch's elastic agent (torchrun) and starts the workers"
    )
    group.add_argument("--nproc-per-node", default=None, metavar="N", type=_nproc,
                       help="workers on this node: an integer, or gpu/cpu/auto as torchrun takes it")
    group.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="nodes (pods) in the group (default 1)")
    group.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                       help="c10d rendezvous store, normally pod 0 of the Job (default 127.0.0.1 and a free port for one node)")
    group.add_argument("--rdzv-backend", default="c10d", choices=["c10d"],
                       help="rendezvous backend (c10d only; accepted so torchrun's arguments carry over)")
    group.add_argument("--rdzv-id", default="", help="rendezvous id, the same on every node (default: global.runId)")
    group.add_argument("--rdzv-conf", default="", metavar="K=V,...", help="rendezvous options, e.g. join_timeout=900")
    group.add_argument("--max-restarts", type=_at_least(0), default=0,
                       help="restarts of the worker group after a failure")
    group.add_argument("--monitor-interval", type=float, default=0.5, help="seconds between worker health checks")
    group.add_argument("--local-addr", default="", help="this node's address as the other nodes reach it")
    waiting = parser.add_argument_group("waiting", "first wait for preprocessing, as an init container would")
    waiting.add_argument("--input-shards", type=_at_least(1), default=None, metavar="N",
                         help="the preprocessed shards 0..N-1 to wait for (training.inputShards)")
    waiting.add_argument("--wait", default="", metavar="DURATION",
                         help="wait this long for them (exit 6 past it), e.g. 48h; before, a config the workers "
                              "would refuse fails at once (exit 2)")


def _nproc(value: str) -> str:
    """torchrun's --nproc-per-node: a positive integer or gpu/cpu/auto (a usage error, exit 2, else)."""
    if value in ("gpu", "cpu", "auto") or (value.isdigit() and int(value) >= 1):
        return value
    raise argparse.ArgumentTypeError(f"expected a positive integer, gpu, cpu or auto, got {value!r}")


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return number

    return parse


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_nproc(nproc: str, device: str) -> str:
    """Workers for one machine: each GPU worker needs a GPU of its own, so a count beyond
    the GPUs here (the demo's two on a one-GPU workstation) becomes one per GPU."""
    if not nproc.isdigit() or device == "cpu":
        return nproc
    gpus = _visible_gpus()
    if 0 < gpus < int(nproc):
        log.warning("--nproc-per-node %s on a machine with %d GPU(s): starting %d worker(s), one per GPU",
                    nproc, gpus, gpus)
        return str(gpus)
    return nproc


def _config_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if args.config:
        out += ["--config", args.config]
    for f in args.values:
        out += ["-f", f]
    for expression in args.set:
        out += set_option(expression)
    return out


def _inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    # In the training Job the completion index numbers the pod (node), not a data shard:
    # every rank reads every shard, so the shard variables do not apply.
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_COMPLETION_INDEX", "TRAJFLOW_SHARDS")}
    return stage_settings(STAGE, args.config, args.values, args.set, env=env)


def _gpu_count(nproc: str) -> str:
    """torchrun's `gpu` as a count: torch's own answer on a machine without CUDA is a traceback."""
    if nproc != "gpu":
        return nproc
    gpus = _visible_gpus()
    if not gpus:
        raise ConfigError("--nproc-per-node gpu: this machine has no CUDA GPU; give a number of workers")
    return str(gpus)


def _tie_to_agent() -> None:
    """A worker dies with the elastic agent that started it. Torch gives each worker a
    session of its own, so a killed agent (OOM, SIGKILL) would leave them training on."""
    from trajflow.local.procs import die_with_parent
    from trajflow.train.launch import AGENT_PID_ENV

    agent = os.environ.get(AGENT_PID_ENV, "")
    if agent.isdigit() and die_with_parent() and os.getppid() != int(agent):
        log.error("the launcher (pid %s) that started this worker is gone; stopping", agent)
        sys.exit(int(ExitCode.ERROR))


def run(args: argparse.Namespace) -> int:
    if _inside_torchrun():
        return _worker(args)
    settings = _settings(args)  # config errors surface here, before any worker starts
    trajflow_log.set_context(run=settings.global_.run_id, stage="train")  # the launcher's lines; ranks add theirs
    if args.wait or args.input_shards:
        _wait_for_preprocessing(settings, args)
    if args.nproc_per_node:
        from trajflow.train.launch import LaunchOptions, launch, launch_local

        args.nproc_per_node = _gpu_count(args.nproc_per_node)
        if not args.rdzv_endpoint and args.nnodes == "1":
            nproc = _local_nproc(args.nproc_per_node, settings.config.device)
            return launch_local(nproc, _config_args(args), max_restarts=args.max_restarts,
                                log_level=args.log_level, rdzv_id=args.rdzv_id or settings.global_.run_id)
        options = LaunchOptions(
            nproc_per_node=str(args.nproc_per_node),
            nnodes=args.nnodes,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id or settings.global_.run_id,
            rdzv_conf=args.rdzv_conf,
            max_restarts=args.max_restarts,
            monitor_interval=args.monitor_interval,
            local_addr=args.local_addr,
        )
        return launch(options, _config_args(args), args.log_level)
    _unwind_on_sigterm()
    return _train(settings)


def _wait_for_preprocessing(settings, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    """Hold until preprocessed shards 0..N-1 are done. A PyTorchJob's pods wait here, not in
    an init container: an init container failing in a pod that restarts on failure is
    restarted in place forever, and the training operator never counts it against backoffLimit."""
    from trajflow.storage.wait import parse_duration, wait_in_run_root

    if not (args.wait and args.input_shards):
        raise ConfigError("--wait and --input-shards go together: how long, and for which shards")
    timeout_s = parse_duration(args.wait)
    wait_in_run_root(settings.global_, "preprocess", set(range(args.input_shards)), timeout_s,
                     expect_shards=args.input_shards, download_generation=settings.download_generation)


def _unwind_on_sigterm() -> None:
    """SIGTERM (the launcher passing on a pod's deletion or deadline) unwinds the training,
    so its final metrics push says where it stopped (the only push a training makes)."""
    import signal

    from trajflow.errors import raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)


def _worker(args: argparse.Namespace) -> int:
    """One worker of the group torch's elastic agent started."""
    from trajflow.train.launch import earlier_final_failure, record_final_failure

    _tie_to_agent()
    _unwind_on_sigterm()
    earlier = earlier_final_failure()
    if earlier is not None:
        code, message = earlier
        log.error("not retried: an earlier attempt of this worker group failed in a way no restart changes "
                  "(exit %d): %s", code, message)
        return code
    try:
        return _train(_settings(args))
    except TrajflowError as exc:
        record_final_failure(exc)  # a config error: restarts of the group cannot help either
        raise


def _train(settings) -> int:  # type: ignore[no-untyped-def]
    from trajflow.storage.wait import storage_failure
    from trajflow.train.loop import train

    try:
        summary = train(settings)
    except TrajflowError:
        raise
    except Exception as exc:
        # credentials refused, a read-only volume (exit 2), a full disk (retried): one line
        # that says so instead of a traceback
        failure = storage_failure(exc, "the run root", "training")
        if failure is None:
            raise
        raise failure from None
    if os.environ.get("RANK", "0") == "0":  # one result line per run, for people and the local runner
        brief = {k: summary.get(k) for k in ("status", "epochs_completed", "steps", "initial_val_loss",
                                             "best_val_loss", "final_val_loss", "world_size")}
        print(json.dumps(brief), file=sys.stdout, flush=True)
    if summary.get("world_size", 1) > 1:
        # Everything is written and pushed. Gloo's threads can still abort the interpreter's
        # teardown (SIGABRT, "terminate called without an active exception"), which would
        # fail a finished run's pod: a worker leaves without that teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
