"""`trajflow download`: fetch this shard's items to the run root.

In a pod: `trajflow download --config /etc/trajflow/config.yaml` with JOB_COMPLETION_INDEX
and TRAJFLOW_SHARDS set by the Indexed Job. Locally: `trajflow download -f values.yaml
--shard 0 --shards 1`. Never reads stdin. Exit codes: 0 every required item verified;
2 bad configuration, or the release names another download now (an upgrade replaced the Job);
3 permanent failures (403/404, checksums that never match); 4 transient failures remain, or
SIGTERM (a rerun resumes them); 1 the run root failed.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
# --summary-json paths that cannot be written whatever the disk holds: the caller's mistake
_BAD_PATH_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS)


def configure(parser: argparse.ArgumentParser) -> None:
    from trajflow.config import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--shard", type=int, default=None, help="shard index (default: $JOB_COMPLETION_INDEX, else 0)")
    parser.add_argument("--shards", type=int, default=None, help="shard count (default: $TRAJFLOW_SHARDS, else downloader.shards of the -f/--set values, "
                        "else 1)")
    parser.add_argument("--plan-only", action="store_true", help="make (or read) the plan, print this shard's items, fetch nothing")
    parser.add_argument("--summary-json", metavar="FILE", default=None, help="also write the final summary as JSON to FILE")


def _terminated(signum: int, frame: object) -> None:
    from trajflow.download.failures import STOPPING
    from trajflow.errors import TransientError

    STOPPING.set()
    raise TransientError(f"stopped by signal {signum}; a rerun resumes where this one stopped")


def run(args: argparse.Namespace) -> int:
    from trajflow.download.failures import STOPPING

    STOPPING.clear()  # a SIGTERM that stopped an earlier run in this process is not this run's
    if threading.current_thread() is not threading.main_thread():
        return _download(args)
    # SIGTERM (pod deletion, eviction): unwind so the final metrics push happens; the
    # temporaries stay and the next run resumes them. Exit 4: retry the shard.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _download(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _download(args: argparse.Namespace) -> int:
    from trajflow import log as trajflow_log
    from trajflow.config import stage_settings
    from trajflow.download.failures import STOPPING
    from trajflow.download.progress import ProgressReporter, human_bytes, human_duration
    from trajflow.config.loader import wanted_download
    from trajflow.download.shard import ShardDownloader, Superseded, raise_for, wait_for_release
    from trajflow.errors import ConfigError, PermanentError, TrajflowError
    from trajflow.files import replace_file
    from trajflow.metrics import Pusher, download_metrics
    from trajflow.storage import open_run_root
    from trajflow.storage.manifest import clear_failure, record_failure
    from trajflow.storage.s3 import UPLOAD_CONCURRENCY

    env = dict(os.environ)
    if args.shard is not None:
        env["JOB_COMPLETION_INDEX"] = str(args.shard)
    if args.shards is not None:
        env["TRAJFLOW_SHARDS"] = str(args.shards)
    if args.summary_json:  # checked before any download: scripts read the file after exit 0
        where = os.path.dirname(os.path.abspath(args.summary_json))
        if os.path.isdir(args.summary_json) or not os.path.isdir(where) or not os.access(where, os.W_OK):
            raise ConfigError(f"--summary-json {args.summary_json}: not a file that can be written (a directory, or "
                              "in a directory that does not exist or is read-only)")
    settings = stage_settings("downloader", args.config, args.values, args.set, env=env)
    trajflow_log.set_context(run=settings.global_.run_id, stage="download", shard=settings.shard)
    if settings.shards > 1 and "JOB_COMPLETION_INDEX" not in env:  # outside a pod, the values' shard count
        log.warning("fetching shard %d of %d only (downloader.shards); --shard N takes another, --shards 1 everything "
                    "at once, and `trajflow run` runs every shard", settings.shard, settings.shards)
    config = settings.config
    # On an S3 run root, the items in flight upload their parts on threads they share (else
    # threads, and a pod's process count, grow with them; at least one item's worth), and the
    # client has a connection for each of those and each worker's request (urllib3 discards
    # connections past its pool, with a warning each time).
    upload_threads = max(config.concurrency, UPLOAD_CONCURRENCY)
    root = open_run_root(settings.global_, upload_threads=upload_threads, max_pool=config.concurrency + upload_threads + 8)
    metrics = download_metrics()
    metrics.start_time.set(time.time())
    # a pod of a Job an upgrade replaced before it started pushes nothing: its shard's group is the new Job's
    wait_for_release(lambda: wanted_download(env), settings.shards, config.generation_id())
    # a plan alone fetches nothing: its push would replace the shard's real figures with zeros
    url = "" if args.plan_only else settings.global_.metrics.pushgateway_url
    pusher = Pusher(url, metrics, settings.global_.run_id, settings.shard)
    pusher.start(config.push_interval_seconds)
    if settings.shard == 0:
        pusher.drop_shards_from(settings.shards)
    if not args.plan_only:
        clear_failure(root, "download", settings.shard)
    success = superseded = False
    try:
        downloader = ShardDownloader(
            root, config, settings.shard, settings.shards, metrics,
            progress=lambda d: ProgressReporter(d, config.progress_interval_seconds, trajflow_log.is_terminal(), metrics),
            wanted=lambda: wanted_download(env),
        )
        if args.plan_only:
            _, items = downloader.plan()
            for item in items:
                print(json.dumps(item.to_json(), sort_keys=True))
            success = True
            return 0
        summary = downloader.run()
        doc = summary.as_dict()
        log.info(
            "shard %d/%d finished: %d fetched, %d skipped, %d reused, %d adopted, %d missing, %d failed; "
            "%s received in %s (%s/s), %d retries",
            summary.shard, summary.shards, doc["fetched"], doc["skipped"], doc["reused"], doc["adopted"], doc["missing"],
            doc["failed"], human_bytes(summary.bytes_received), human_duration(summary.elapsed_s),
            human_bytes(doc["throughput_bytes_per_s"]), summary.retries, extra={"summary": doc},
        )
        success = summary.exit_code == 0
        if args.summary_json:
            target = Path(args.summary_json).resolve()  # a link's target is the file to write
            text = json.dumps(doc, indent=1, sort_keys=True)
            try:
                if target.exists() and not target.is_file():
                    target.write_text(text)  # a pipe or a device (/dev/stdout) is written to, not replaced
                else:
                    replace_file(target, text)
            except OSError as exc:
                # a path that cannot be (a missing directory, no permission) is the caller's; a full disk is not
                error = ConfigError if exc.errno in _BAD_PATH_ERRNOS else TrajflowError
                raise error(f"--summary-json {args.summary_json}: cannot write it ({exc.strerror or exc}); the "
                            "shard itself is done") from None
        raise_for(summary)
        return 0
    except Superseded:
        superseded = True
        raise
    except PermanentError as exc:
        if not args.plan_only:  # the preprocessing shard waiting for this one stops instead of holding its GPU
            record_failure(root, "download", settings.shard, settings.shards, config.generation_id(), str(exc))
        raise
    finally:
        # a pod of a Job an upgrade replaced says it stopped (no failure), unless its shard's
        # group is the new Job's pod's already; left running, it would look lost
        pusher.stop(success, interrupted=STOPPING.is_set() or superseded,
                    final=not superseded or pusher.group_is_mine())
        sys.stdout.flush()
