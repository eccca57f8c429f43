"""`trajflow run -f values/local.yaml [-f more.yaml] [--set k=v]`: the pipeline on this machine.

The same values files as `helm install`; each enabled stage runs as child processes
through its own CLI with the config the chart would mount, so what works here works in
the cluster. Rendered configs, logs, the resume state and the report go to the work
directory (default `.trajflow/runs/<runId>`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from trajflow.config.loader import add_set_arguments
from trajflow.errors import ConfigError

if TYPE_CHECKING:
    from trajflow.local.pipeline import RunPlan
    from trajflow.local.runner import Runner

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE",
                        help="values file, as for helm install (repeatable; later files win)")
    add_set_arguments(parser)
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="rendered configs, logs, resume state and report (default .trajflow/runs/<runId>)")
    parser.add_argument("--report", default=None, metavar="FILE.html",
                        help="where to write the HTML report; a PNG is written beside it (default <work-dir>/report.html)")
    parser.add_argument("--force", action="store_true",
                        help="start every stage process even when an earlier run finished it with the same inputs")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the values, write the rendered stage configs and print what would run; run nothing")
    parser.add_argument("--plain", action="store_true", help="plain log lines even on a terminal")
    parser.add_argument("-v", "--verbose", action="store_true", help="with plain lines: also print every stage log line")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from trajflow.local import procs
    from trajflow.local.pipeline import build_plan, missing_file_sources, missing_stage_modules
    from trajflow.local.progress import make_view
    from trajflow.local.report import print_summary, write_report
    from trajflow.local.runner import Runner

    if not args.values and not args.set:
        raise ConfigError("no values given: run e.g. `trajflow run -f values/local.yaml`")
    plan = build_plan(args.values, args.set)
    problems = missing_stage_modules(plan)
    if problems:
        raise ConfigError("\n".join(problems))
    work_dir = Path(args.work_dir) if args.work_dir else Path(".trajflow") / "runs" / plan.global_.run_id
    absent = missing_file_sources(plan)
    if absent and not args.force and _downloads_done(plan):
        # a rerun reads the stored plan and skips the downloads: the source is not needed
        for problem in absent:
            log.warning("%s; every download shard is done, so the run goes on without it", problem)
        absent = []
    if args.dry_run:
        runner = Runner(plan, work_dir, make_view(plain=True))
        for problem in absent:  # a cluster's path, or one a later step makes (the demo's data)
            log.warning("%s; a run here would stop at once", problem)
        return _dry_run(runner)
    if absent:
        raise ConfigError("\n".join(absent))
    procs.become_subreaper()
    view = make_view(plain=True if args.plain else None, verbose=args.verbose)
    runner = Runner(plan, work_dir, view, force=args.force)
    try:
        result = runner.run()
    finally:
        # any training worker the launcher left behind was adopted by this process: stop and collect it
        orphans = procs.adopted_orphans(known=set())
        procs.kill_tree(orphans)
        procs.reap(pid for pid, _ in orphans)
    doc, stages = write_report(runner, result, Path(args.report) if args.report else None)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # keep log files free of wrapped table rows
    print_summary(console, doc, stages)
    return result.exit_code


def _downloads_done(plan: "RunPlan") -> bool:
    """Whether the run root holds this download's manifest for every shard (a rerun's case):
    of this shard count and generation, not an earlier run's."""
    from trajflow.storage import open_run_root, read_manifest_fields
    from trajflow.storage.wait import is_storage_error, manifest_expectations, stale_reason

    down = plan.stage("downloader")
    if down is None:
        return False
    expected = manifest_expectations("download", down.shards, down.config.generation_id())
    try:
        storage = open_run_root(plan.global_)
        # stops at the first shard not done
        return all((doc := read_manifest_fields(storage, "download", shard)) is not None and stale_reason(doc, expected) is None
                   for shard in range(down.shards))
    except ValueError:  # a torn manifest
        return False
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        return False  # a run root the runner will name


def _dry_run(runner: "Runner") -> int:
    """Print each stage's processes, environment and rendered config; start nothing."""
    from trajflow.local.progress import describe_plan

    runner.write_configs()
    print(describe_plan(runner))
    shown: set[str] = set()
    for task in runner.tasks:
        stage = task.stage
        if stage.stage in shown:
            continue
        shown.add(stage.stage)
        env = runner.env(task)
        keys = ("JOB_COMPLETION_INDEX", "TRAJFLOW_SHARDS", "TRAJFLOW_CONFIG")
        retries = f"{stage.retries} retr{'y' if stage.retries == 1 else 'ies'}"
        if stage.stage == "training":
            print(f"\ntraining: {stage.nproc_per_node} worker(s) on this machine, {retries}")
        else:
            print(f"\n{stage.stage}: {stage.shards} shard process(es), {stage.parallelism} at once, {retries} each")
        print("  " + " ".join(f"{k}={env[k]}" for k in keys) + (" ..." if stage.shards > 1 else ""))
        print("  " + " ".join(runner.argv(task)))
    print(f"\nrendered configs (what the chart's ConfigMaps hold) are in {runner.work_dir / 'config'}")
    return 0
