"""`trajflow preprocess`: resample this pod's raw shard to the uniform rate.

In a pod the shard is JOB_COMPLETION_INDEX of TRAJFLOW_SHARDS and the init container has
already waited for its download manifest; ``--wait`` (the chart's waitTimeout) bounds the
wait for a LeRobot dataset's meta/info.json planned in another download shard. Locally, ``--shards 0-7 --wait 2h`` processes
several shards, each as soon as its download (of ``preprocessing.shards`` shards in the
values, or TRAJFLOW_SHARDS) is done.

Exit codes (trajflow.errors.ExitCode, the chart's podFailurePolicy): 0 done or already
done; 2 bad config (fail the Job); 3 too many bad trajectories, or a shard too large for
/tmp (fail the index); 4 storage trouble or download not done yet (for this shard count
and downloader.config), 1 anything unexpected, 143 SIGTERM (retry).
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def configure(parser: argparse.ArgumentParser) -> None:
    from trajflow.config import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--shards", default=None,
                        help="shards to process (3, 0-7, 0,2,5-6); default: JOB_COMPLETION_INDEX")
    parser.add_argument("--wait", default="0s",
                        help="wait this long for the download shards a shard needs (e.g. 30m): with --shards each "
                        "one's own, and always one holding a dataset's meta/info.json; default: no waiting")
    parser.add_argument("--summary", action="store_true", help="print one JSON summary line per shard on stdout")


def run(args: argparse.Namespace) -> int:
    from trajflow.config import stage_settings
    from trajflow.preprocess.stage import run_shard, run_shards
    from trajflow.storage.wait import parse_duration, parse_shards

    from trajflow.errors import raise_terminated

    if threading.current_thread() is threading.main_thread():
        # SIGTERM (pod deletion, eviction, `trajflow run` stopping) unwinds, so the final
        # metrics push says the shard stopped; a partial shard is never published
        signal.signal(signal.SIGTERM, raise_terminated)
    settings = stage_settings("preprocessing", args.config, args.values, args.set)
    if args.shards is not None:
        shards = sorted(parse_shards(args.shards))
        summaries = run_shards(settings, shards, wait_timeout_s=parse_duration(args.wait))
    else:
        summaries = [run_shard(settings, wait_s=parse_duration(args.wait))]
    if args.summary:
        for s in summaries:
            print(json.dumps(s.to_json(), sort_keys=True), file=sys.stdout)
    return 0
