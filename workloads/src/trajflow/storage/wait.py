"""`trajflow wait`: block until upstream shard manifests exist (init containers use it).

A manifest counts only when it belongs to the sharding the waiter expects: with
`--expect-shards N` its recorded shard count must be N. A manifest left by an earlier run
with another shard count keeps the gate closed until the upstream shard rewrites it; a
timeout names those stale manifests and why. Download manifests must also record the plan
in use (`plan/download.json`, written by every download pod when it plans): with the same
shard count, a new plan moves items between shard directories, so a manifest of the
earlier plan may list files that are gone. Where the stage is given the downloader's
config (`DATASET_CONFIG_ENV`), a download manifest must record that config's generation,
and a preprocess manifest the same as the download it was made from: a release installed
again with another dataset, under the same run id, starts every stage at once, and until
its download pods have planned the earlier dataset's manifests would otherwise count.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import random
import re
import sys
import time
from typing import Any, Callable, Mapping

from trajflow.errors import ConfigError, StorageUnavailable, TrajflowError, TransientError, WaitTimeout
from trajflow.plan import read_plan_in_use
from trajflow.storage.base import ObjectInfo, Storage
from trajflow.storage.manifest import (PLAN_KEY, STAGE_DIRS, done_manifests, failed_shards, failure_key, manifest_key,
                                       read_failure, read_manifest_fields)

log = logging.getLogger(__name__)

# A bare number is seconds only when it stands alone: in `1h30` the unit of 30 is a guess.
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)|(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?)\s*$")
WAITING_LOG_INTERVAL_S = 300.0  # a long wait says what it waits for this often, and when that changes
# ClientError codes that no amount of waiting fixes, with what to check
_BAD_IDENTITY = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_CREDENTIALS_HINT = ("global.storage.s3.existingSecret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or workload identity "
                     "(on your machine: export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `2h`, `1h30m`."""
    m = _DURATION.match(text)
    if not text.strip() or not m or not any(m.groups()):
        raise ConfigError(f"invalid duration {text!r}: use e.g. 90 (seconds), 90s, 15m, 2h, 1h30m")
    bare, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return bare + h * 3600 + mi * 60 + s


# the charts' most shards (values.schema.json): a larger index names no shard
MAX_SHARDS = 100000


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
        if hi >= MAX_SHARDS:
            raise ConfigError(f"invalid shard {hi} in {part!r}: shard indexes run from 0 to {MAX_SHARDS - 1}")
        out.update(range(lo, hi + 1))
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def stale_reason(doc: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Why a manifest belongs to another run (None when it matches every expected field)."""
    wrong = [(f"{name}={doc[name]!r}" if name in doc else f"no {name}") + f" (expected {value!r})"
             for name, value in expected.items() if doc.get(name) != value]
    return "records " + " and ".join(wrong) if wrong else None


# the manifest field that names the download a stage's shard comes from, and what a timeout
# on it says
_GENERATION_FIELD = {"download": "generation", "preprocess": "download_generation"}


def manifest_expectations(stage: str, shards: int | None, download_generation: str | None) -> dict[str, Any]:
    """What a `stage` manifest of this run records (see `stale_reason`): the shard count and
    the download generation, each when given."""
    expected: dict[str, Any] = {}
    if shards is not None:
        expected["shards"] = shards
    if download_generation is not None:
        expected[_GENERATION_FIELD[stage]] = download_generation
    return expected
_OTHER_GENERATION = {
    "download": " (made for another downloader.config, a source's endpoint included: its download pods have yet to "
                "fetch what it names, or they run another trajflow version than this pod)",
    "preprocess": " (made from another download: preprocessing has yet to make them again from the one "
                  "downloader.config names; a finished preprocessing Job does not rerun when only downloader.config "
                  "changes: use a new global.runId, or raise preprocessing.rerun)",
}


# The IAM action each S3 call on the run root needs, and whether the call writes. A stage
# needs all of RUN_ROOT_ACTIONS on the run root's bucket; `trajflow wait` the first two.
_S3_ACTIONS = {
    "ListObjectsV2": ("s3:ListBucket", False),
    "HeadObject": ("s3:GetObject", False),
    "GetObject": ("s3:GetObject", False),
    "PutObject": ("s3:PutObject", True),
    "CreateMultipartUpload": ("s3:PutObject", True),
    "UploadPart": ("s3:PutObject", True),
    "CompleteMultipartUpload": ("s3:PutObject", True),
    "AbortMultipartUpload": ("s3:AbortMultipartUpload", True),
    "DeleteObject": ("s3:DeleteObject", True),
}
RUN_ROOT_ACTIONS = ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload")


def fatal_storage_error(exc: Exception, where: str, doing: str = "use") -> TrajflowError | None:
    """The error to stop with when the run root cannot be used by trying again (no or
    refused credentials, access denied: exit 2); None when it may just be retried
    (network trouble, a 5xx). The downloader classifies its run-root errors with it too.
    `doing` ("read", "use") is said when the failed S3 call does not tell."""
    if isinstance(exc, StorageUnavailable):
        return None  # the store failed a read again and again: trying again later may still do
    if isinstance(exc, TrajflowError):
        return exc
    from botocore import exceptions as boto_errors

    # (CredentialRetrievalError is a credential endpoint failing, which trying again may cure)
    if isinstance(exc, (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError)):
        return ConfigError(
            f"cannot {doing} {where}: no usable S3 credentials ({_one_line(exc)}); give the pod credentials through "
            f"{_CREDENTIALS_HINT}"
        )
    if isinstance(exc, boto_errors.ClientError):
        from trajflow.storage.s3 import error_code, http_status

        code = error_code(exc)
        refused = _s3_action(exc)
        if refused is not None:
            doing = refused[1]
        if code in _BAD_IDENTITY:
            hint = f"the store does not accept these credentials: check {_CREDENTIALS_HINT}"
        elif code == "NoSuchBucket":
            hint = "the bucket does not exist: check global.storage.s3.bucket and endpoint"
        elif code in ("AccessDenied", "AllAccessDisabled") or http_status(exc) == 403:
            needed = f"{refused[0]} (refused here) among " if refused else ""
            hint = (f"the credentials need {needed}{', '.join(RUN_ROOT_ACTIONS)} on the run root's bucket "
                    "(charts/trajflow/README.md, Storage)")
        elif (not code or code.isdigit()) and 400 <= (http_status(exc) or 0) < 500 and http_status(exc) not in (408, 429):
            # an HTTP error without an S3 error document: no S3 store answers there
            hint = "the endpoint does not answer as an S3 store: check global.storage.s3.endpoint"
        else:
            return None
        return ConfigError(f"cannot {doing} {where}: {code or 'access denied'} ({_one_line(exc)}); {hint}")
    if isinstance(exc, PermissionError):
        doing = (_s3_action(exc.__cause__) or ("", doing))[1]  # S3's HEAD refusals come as PermissionError
        return ConfigError(f"cannot {doing} {where}: {_one_line(exc)}")
    return unusable_root_error(exc, where)


def _s3_action(exc: BaseException | None) -> tuple[str, str] | None:
    """The IAM action the failed S3 call needed and whether it read or wrote (None when
    `exc` is no S3 call's error)."""
    action = _S3_ACTIONS.get(getattr(exc, "operation_name", ""))
    return (action[0], "write" if action[1] else "read") if action else None


def s3_refusal_error(exc: BaseException) -> TrajflowError | None:
    """For an S3 error no stage handled: the config error it amounts to (credentials,
    bucket, permissions: exit 2), else None."""
    boto_errors = sys.modules.get("botocore.exceptions")
    if boto_errors is None or not isinstance(exc, (boto_errors.BotoCoreError, boto_errors.ClientError)):
        return None
    return fatal_storage_error(exc, "the run root")


def is_storage_error(exc: BaseException) -> bool:
    """Whether `exc` is the storage's (a disk, a volume, an object store, the network to it)
    rather than the content's."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, StorageUnavailable)):
        return True
    if type(exc).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer", "urllib3"):
        return True  # before the errno test: botocore's timeouts are errno-less OSErrors
    if isinstance(exc, OSError):  # an errno-less OSError is a parser's (h5py's) complaint about the bytes
        return exc.errno is not None
    return False


def storage_failure(exc: BaseException, where: str, what: str) -> TrajflowError | None:
    """The error a stage stops with for a storage error while working on `what`: exit 2
    when no retry can help (see `fatal_storage_error`), else transient (a full disk, a
    failing volume, the network); None for an error that is not the storage's."""
    if not is_storage_error(exc):
        return None
    assert isinstance(exc, Exception)
    return fatal_storage_error(exc, where) or TransientError(f"{what}: storage error: {type(exc).__name__}: {exc}")


def unusable_root_error(exc: BaseException, where: str) -> ConfigError | None:
    """The error to stop with when a filesystem run root cannot be written, and no retry
    can change that (exit 2); None for any other error."""
    if isinstance(exc, OSError) and exc.errno in _UNUSABLE_ROOT:
        return ConfigError(f"cannot use {where}: {_one_line(exc)} ({_UNUSABLE_ROOT[exc.errno]})")
    return None


_UNUSABLE_ROOT = {
    errno.EROFS: "the volume is mounted read-only: the stages write to the run root",
    errno.ENOTDIR: "a file stands where the run root needs a directory",
    errno.EEXIST: "a file stands where the run root needs a directory",
}


# how long a wait goes on after the shard it waits for failed for good (exit 3) in the
# release's current attempt of its stage (its `rerun`), for an upgrade raising it to reach
# the mounted dataset ConfigMap
FAILED_UPSTREAM_GRACE_S = 600.0
_CHART = {"download": "downloader", "preprocess": "preprocessing"}


class UpstreamFailed(WaitTimeout):
    """The shard waited for failed for good and the release reruns nothing (exit 6: the pod
    is retried, in case a rerun comes)."""


class UpstreamFailures:
    """The failure records (`trajflow.storage.manifest.record_failure`) of the upstream
    shards a wait is missing, each logged when it appears or changes. A record goes when a
    new attempt of its shard starts. One made by the attempt the release still names (the
    `rerun` it records is the upstream stage's `rerun` in the dataset ConfigMap) ends the
    wait after `FAILED_UPSTREAM_GRACE_S`: nothing will redo that shard. One of an earlier
    `rerun` waits for the rerun's pod to start; one whose attempt is unknown (no ConfigMap:
    `trajflow run`, an install without the downloader) is only reported. Records of another
    shard count or download generation belong to an earlier run and are ignored."""

    def __init__(self, storage: Storage, stage: str, expect_shards: int | None, download_generation: str | None,
                 clock: Callable[[], float] = time.monotonic, env: Mapping[str, str] | None = None):
        self.storage, self.stage, self.clock, self.grace_s = storage, stage, clock, FAILED_UPSTREAM_GRACE_S
        self.expect_shards, self.generation, self.env = expect_shards, download_generation, env
        self.seen: dict[int, tuple[float, str, str]] = {}  # shard -> (since when in this state, what failed, state)

    def _judge(self, shard: int) -> tuple[str, str] | None:
        """What failed, and whether the release reruns it: "final" (no), "rerun" (yes) or "unknown"."""
        from trajflow.config.loader import wanted_reruns

        doc = read_failure(self.storage, self.stage, shard)
        if doc is None or (self.expect_shards is not None and doc.get("shards") != self.expect_shards) \
                or (self.generation is not None and doc.get("generation") != self.generation):
            return None
        now = (wanted_reruns(self.env) or {}).get(_CHART[self.stage])
        failed_in = doc.get("rerun")
        if now is None or not isinstance(failed_in, int):
            state = "unknown"
        else:
            state = "final" if failed_in == now else "rerun"
        return " ".join(doc["error"].split()), state

    def poll(self, missing: list[int]) -> None:
        """Look at the records of the ``missing`` shards (one listing); raises UpstreamFailed."""
        listed = failed_shards(self.storage, self.stage) & set(missing) if missing else set()
        for shard in sorted(set(self.seen) | listed):
            judged = self._judge(shard) if shard in listed else None
            if judged is None:
                self.seen.pop(shard, None)  # rerun, or done
                continue
            why, state = judged
            if shard in self.seen and self.seen[shard][2] == state:
                continue
            self.seen[shard] = (self.clock(), why, state)
            where = f"{self.storage.uri}/{failure_key(self.stage, shard)}"
            log.warning("%s shard %d failed for good: %s; %s (%s)", self.stage, shard, why, {
                "final": f"no rerun of it is on its way: giving up in {self.grace_s:.0f}s unless "
                         f"{_CHART[self.stage]}.rerun is raised",
                "rerun": f"{_CHART[self.stage]}.rerun was raised since: waiting for its pod to redo the shard",
                "unknown": "waiting for a rerun of it",
            }[state], where)
        late = sorted(s for s, (since, _, state) in self.seen.items()
                      if state == "final" and self.clock() - since >= self.grace_s)
        if late:
            raise UpstreamFailed(self.explain(late) + f"; {_CHART[self.stage]}.rerun was not raised in "
                                 f"{self.grace_s:.0f}s")

    def explain(self, shards: list[int]) -> str:
        """What the failed ones among ``shards`` say, and what to do ("" when none failed)."""
        failed = [s for s in shards if s in self.seen and self.seen[s][2] != "rerun"]
        if not failed:
            return ""
        said = "; ".join(f"{self.stage} shard {s} failed for good: {self.seen[s][1]}" for s in failed[:3])
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        return (f"{said}{more}: fix that, then raise {_CHART[self.stage]}.rerun (with this stage's rerun, once its "
                "Job has failed)")


def plan_in_use(storage: Storage, stage: str, expect_shards: int | None) -> dict[str, Any]:
    """What a download manifest must record to belong to the plan in use (nothing for a
    stage without a plan, no plan yet, or a plan of another shard count than expected)."""
    if stage != "download":
        return {}
    doc = read_plan_in_use(storage, fields_only=True)
    if doc is None or (expect_shards is not None and doc.get("shards") != expect_shards):
        return {}  # none yet, being replaced, unreadable, or of another count: the shard count alone decides
    return {"generation": doc.get("generation"), "plan_fingerprint": doc.get("fingerprint")}


def wait_for_shards(
    storage: Storage,
    stage: str,
    shards: set[int],
    timeout_s: float,
    initial_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    *,
    expect_shards: int | None = None,
    download_generation: str | None = None,
) -> None:
    """Poll with capped exponential backoff until every shard's manifest exists and matches
    `expect_shards` and `download_generation` (when given: the download's generation, which a
    preprocess manifest records as the download it was made from).

    Raises WaitTimeout (exit 6) naming the missing and stale shards, or ConfigError (exit 2)
    when the run root cannot be read at all (no credentials, access denied); other storage
    errors are logged and the poll is retried until the deadline.
    """
    if expect_shards is not None:
        if expect_shards < 1:
            raise ConfigError(f"--expect-shards must be at least 1, got {expect_shards}")
        beyond = sorted(s for s in shards if s >= expect_shards)
        if beyond:
            raise ConfigError(
                f"shard {beyond[0]} does not exist when there are {expect_shards} shard(s) (0-{expect_shards - 1})"
            )
    expected = manifest_expectations(stage, expect_shards, download_generation)
    where = f"{storage.uri}/{STAGE_DIRS[stage]}/_done"
    deadline = clock() + timeout_s
    delay = initial_delay_s
    accepted: set[int] = set()
    stale: dict[int, str] = {}
    other_generation: set[int] = set()  # shards whose manifest records another download generation
    warned: dict[int, str] = {}
    last_error: Exception | None = None
    # Polls can last hours over thousands of shards: a stale manifest is judged again only
    # when it or the plan changed (S3 ETags tell), and the plan, which can be large, is read
    # only when it changed
    judged: dict[int, tuple[Any, str]] = {}
    plan_seen: Any = None
    plan_fields: dict[str, Any] = {}
    told: tuple[list[int], float] | None = None  # what was last said, and when
    failures = UpstreamFailures(storage, stage, expect_shards, download_generation, clock)
    while True:
        try:
            listing = {s: info for s, info in done_manifests(storage, stage).items() if s in shards}
            accepted &= set(listing)  # a manifest removed by a rerun upstream no longer counts
            to_judge = sorted(set(listing) - accepted)
            plan = _version(storage.stat(PLAN_KEY)) if stage == "download" and to_judge else None
            if to_judge and (plan is None or plan != plan_seen):
                plan_fields = plan_in_use(storage, stage, expect_shards)
                plan_seen = plan
            current = {**plan_fields, **expected}  # the plan in use may still be an earlier dataset's
            polled: dict[int, str] = {}
            for shard in to_judge:
                version = (_version(listing[shard]), plan) if _version(listing[shard]) is not None else None
                if version is not None and shard in judged and judged[shard][0] == version:
                    polled[shard] = judged[shard][1]
                    continue
                try:
                    doc = read_manifest_fields(storage, stage, shard)
                except ValueError as exc:  # corrupt or of another format: the upstream rerun replaces it
                    polled[shard] = "is unreadable: " + _one_line(exc).split(": ", 1)[-1]  # the key is said elsewhere
                    continue
                if doc is None:
                    continue  # removed since the listing
                reason = stale_reason(doc, current)
                if reason is None:
                    accepted.add(shard)
                else:
                    polled[shard] = reason
                    judged[shard] = (version, reason)
                    if download_generation is not None and doc.get(_GENERATION_FIELD[stage]) != download_generation:
                        other_generation.add(shard)
            stale, last_error = polled, None
            failures.poll(sorted(shards - accepted))  # raises UpstreamFailed, which passes as fatal below
        except Exception as exc:
            fatal = fatal_storage_error(exc, where, "read")
            if fatal is not None:
                raise fatal from None
            if last_error is None:
                log.warning("cannot read %s (%s); trying again", where, _one_line(exc))
            last_error = exc
        for shard, reason in stale.items():
            if warned.get(shard) != reason:
                log.warning("%s/%s %s: waiting for upstream shard %d to rewrite it",
                            storage.uri, manifest_key(stage, shard), reason, shard)
                warned[shard] = reason
        missing = sorted(shards - accepted)
        if not missing:
            log.info("all %d %s shard(s) are done", len(shards), stage)
            return
        remaining = deadline - clock()
        if remaining <= 0:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            message = f"timed out after {timeout_s:.0f}s waiting for {len(missing)} {stage} shard(s) under {where}: {shown}"
            if failures.explain(missing):
                message += "; " + failures.explain(missing)
            if stale:
                shown_stale = "; ".join(f"shard {s} {stale[s]}" for s in sorted(stale)[:5])
                more = "; ..." if len(stale) > 5 else ""
                message += f"; {len(stale)} of them have a manifest that does not count: {shown_stale}{more}"
                if other_generation & set(stale):
                    message += _OTHER_GENERATION[stage]
            if last_error is not None:
                message += f"; the last poll failed: {_one_line(last_error)}"
            raise WaitTimeout(message)
        # a wait of 48 h polled every 30 s: a line when what is missing changes, else every few minutes
        if told is None or told[0] != missing or clock() - told[1] >= WAITING_LOG_INTERVAL_S:
            log.info("waiting for %d %s shard(s): %s", len(missing), stage, missing[:10])
            told = (missing, clock())
        sleep(min(delay * random.uniform(0.8, 1.2), remaining))
        delay = min(delay * 2, max_delay_s)


def _version(info: ObjectInfo | None) -> tuple[int, str] | None:
    """What tells versions of an object apart: its S3 ETag and size (None on a filesystem,
    whose reads cost nothing)."""
    return (info.size, info.etag) if info is not None and info.etag else None


def configure(parser: argparse.ArgumentParser) -> None:
    from trajflow.config import add_config_arguments

    parser.add_argument("--stage", required=True, choices=sorted(STAGE_DIRS), help="upstream stage to wait for")
    parser.add_argument("--shards", required=True, help="shards to wait for: 3, 0-7, 0,2,5-6")
    parser.add_argument("--timeout", default="2h", help="give up after this long (exit 6), e.g. 30m, 2h (default: 2h)")
    parser.add_argument("--expect-shards", type=int, default=None, metavar="N",
                        help="the upstream stage's shard count: a manifest recording another count is from an "
                             "earlier run and does not count (default: any)")
    parser.add_argument("--check-config", default=None, metavar="STAGE",
                        choices=["downloader", "preprocessing", "training"],
                        help="first validate STAGE's whole config, so an init container fails at once (exit 2) "
                             "on what the stage would refuse only after the wait")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from trajflow import log as trajflow_log
    from trajflow.config import global_settings, stage_settings
    from trajflow.config.loader import expected_download_generation

    shards = parse_shards(args.shards)
    timeout_s = parse_duration(args.timeout)
    if args.check_config:
        stage_settings(args.check_config, args.config, args.values, args.set, env={})
    generation = expected_download_generation(args.config, args.values, args.set)
    glob = global_settings(args.config, args.values, args.set)
    # an init container's lines, filtered with its pod's stage lines by run (and index)
    index = os.environ.get("JOB_COMPLETION_INDEX", "")
    trajflow_log.set_context(run=glob.run_id, stage="wait", shard=int(index) if index.isdigit() else None)
    wait_in_run_root(glob, args.stage, shards, timeout_s,
                     expect_shards=args.expect_shards, download_generation=generation)
    return 0


def wait_in_run_root(glob: Any, stage: str, shards: set[int], timeout_s: float, expect_shards: int | None,
                     download_generation: str | None = None) -> None:
    """`wait_for_shards` in the run root of `glob` (a GlobalConfig)."""
    from trajflow.storage import open_run_root

    try:
        # every poll tries again: a store that never answers must not hold one call for the
        # client's usual 8 x 60 s, far past a short --timeout; one that answers slowly (15 s)
        # must still be heard, unless the whole wait is shorter than that
        call_timeout_s = min(60.0, max(15.0, timeout_s / 4), max(timeout_s, 1.0))
        storage = open_run_root(glob, timeout=call_timeout_s, attempts=2)
    except Exception as exc:
        fatal = fatal_storage_error(exc, "the run root")
        if fatal is not None:
            raise fatal from None
        raise TransientError(f"cannot open the run root: {_one_line(exc)}") from None
    wait_for_shards(storage, stage, shards, timeout_s, expect_shards=expect_shards,
                    download_generation=download_generation)
