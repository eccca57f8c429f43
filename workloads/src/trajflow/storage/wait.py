"""`trajflow wait`: block until upstream shard manifests exist (init containers use it)."""
from __future__ import annotations

import argparse
import logging
import random
import re
import time
from typing import Callable

from trajflow.errors import ConfigError, WaitTimeout
from trajflow.storage.base import Storage
from trajflow.storage.manifest import STAGE_DIRS, done_shards

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `2h`, `1h30m`."""
    m = _DURATION.match(text)
    if not text.strip() or not m or not any(m.groups()):
        raise ConfigError(f"invalid duration {text!r}: use e.g. 90s, 15m, 2h, 1h30m")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def parse_shards(spec: str) -> set[int]:
    """`3`, `0-7`, `0,2,5-6`."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"invalid shard list {spec!r}: use e.g. 3, 0-7 or 0,2,5-6")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ConfigError(f"invalid shard range {part!r}: end before start")
        out.update(range(lo, hi + 1))
    return out


def wait_for_shards(
    storage: Storage,
    stage: str,
    shards: set[int],
    timeout_s: float,
    initial_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll with capped exponential backoff until every shard's manifest exists."""
    deadline = clock() + timeout_s
    delay = initial_delay_s
    while True:
        missing = sorted(shards - done_shards(storage, stage))
        if not missing:
            log.info("all %d %s shard(s) are done", len(shards), stage)
            return
        remaining = deadline - clock()
        if remaining <= 0:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise WaitTimeout(
                f"timed out after {timeout_s:.0f}s waiting for {len(missing)} {stage} shard(s) "
                f"under {storage.uri}/{STAGE_DIRS[stage]}/_done: {shown}"
            )
        log.info("waiting for %d %s shard(s): %s", len(missing), stage, missing[:10])
        sleep(min(delay * random.uniform(0.8, 1.2), remaining))
        delay = min(delay * 2, max_delay_s)


def configure(parser: argparse.ArgumentParser) -> None:
    from trajflow.config import add_config_arguments

    parser.add_argument("--stage", required=True, choices=sorted(STAGE_DIRS), help="upstream stage to wait for")
    parser.add_argument("--shards", required=True, help="shards to wait for: 3, 0-7, 0,2,5-6")
    parser.add_argument("--timeout", default="2h", help="give up after this long (exit 6), e.g. 30m, 2h")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from trajflow.config import global_settings
    from trajflow.storage import open_run_root

    shards = parse_shards(args.shards)
    timeout_s = parse_duration(args.timeout)
    glob = global_settings(args.config, args.values, args.set)
    wait_for_shards(open_run_root(glob), args.stage, shards, timeout_s)
    return 0
