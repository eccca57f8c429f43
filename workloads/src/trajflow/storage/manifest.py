"""The data-plane contract between stages: where things live and when a shard is done.

    <root>/plan/download.json          header of the partition plan in use (the plan: plan/download-<n>-<gen>/)
    <root>/raw/<shard>/...             downloaded items
    <root>/raw/_done/<shard>.json      shard manifest — written last
    <root>/raw/_failed/<shard>.json    a shard that failed for good (exit 3), until its next attempt
    <root>/resampled/<shard>.*         fixed-rate shards + resampled/_done/<shard>.json
    <root>/train/checkpoints/, train/artifacts/

A shard is done iff its manifest exists and records the shard count the consumer expects
(a manifest of another shard count belongs to an earlier sharding of the run) and, for
downloads, the plan in use (`trajflow wait` compares it with `plan/download.json`).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from typing import Any, BinaryIO

from trajflow.storage.base import ObjectInfo, Storage

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
# `trajflow wait --stage` name -> directory of that stage's output
STAGE_DIRS = {"download": "raw", "preprocess": "resampled"}
PLAN_KEY = "plan/download.json"
# what training writes on rank 0: checkpoints, and the artifacts (metrics, model, curve)
TRAIN_ARTIFACT_DIR = "train/artifacts"
TRAIN_METRICS_KEY = f"{TRAIN_ARTIFACT_DIR}/metrics.json"
TRAIN_MODEL_KEY = f"{TRAIN_ARTIFACT_DIR}/model.safetensors"
TRAIN_CHECKPOINT_DIR = "train/checkpoints"


def read_train_metrics(storage: Storage) -> dict[str, Any] | None:
    """The training's metrics.json (history, initial/best/final losses, status); None when
    there is none yet, or none readable. Here, not beside its writer: readers need no torch."""
    try:
        doc = json.loads(storage.read_bytes(TRAIN_METRICS_KEY))
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def shard_name(shard: int) -> str:
    """Zero-padded so shards sort by number in listings."""
    return f"{shard:05d}"


def manifest_key(stage: str, shard: int) -> str:
    return f"{STAGE_DIRS[stage]}/_done/{shard_name(shard)}.json"


def write_manifest(storage: Storage, stage: str, shard: int, shards: int, items: list[dict[str, Any]],
                   **extra: Any) -> dict[str, Any]:
    """Mark a shard done. Call last, after every item it lists is in place."""
    doc = {
        "version": MANIFEST_VERSION,
        "stage": stage,
        "shard": shard,
        "shards": shards,
        "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "items": items,
        **extra,
    }
    _write(storage, manifest_key(stage, shard), doc)
    return doc


def update_manifest(storage: Storage, stage: str, shard: int, doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Record more about a done shard (its manifest `doc`, as read), in one atomic write."""
    updated = {**doc, **fields}
    _write(storage, manifest_key(stage, shard), updated)
    return updated


def _write(storage: Storage, key: str, doc: dict[str, Any]) -> None:
    storage.write_bytes(key, json.dumps(doc, indent=1, sort_keys=True).encode())


# the `rerun` of the stage's chart, which the chart gives its pods: which attempt of the
# release failed (`record_failure`)
RERUN_ENV = "TRAJFLOW_RERUN"


def failure_key(stage: str, shard: int) -> str:
    return f"{STAGE_DIRS[stage]}/_failed/{shard_name(shard)}.json"


def record_failure(storage: Storage, stage: str, shard: int, shards: int, generation: str | None,
                   error: str) -> None:
    """Record that ``shard`` failed in a way no retry changes (exit 3: the chart fails its
    index), and in which of the release's attempts (its `rerun`), so that the stage after
    it, waiting for the shard, says why and stops instead of holding its GPUs until its
    timeout (`trajflow.storage.wait.UpstreamFailures`). ``generation``: the download the
    shard worked for. The shard's next attempt removes it (`clear_failure`). Never raises:
    the failure itself is what the shard reports."""
    rerun = os.environ.get(RERUN_ENV, "")
    doc = {"shard": shard, "shards": shards, "generation": generation, "error": error, "time": round(time.time(), 3),
           "rerun": int(rerun) if rerun.isdigit() else None}
    try:
        _write(storage, failure_key(stage, shard), doc)
    except Exception as exc:  # noqa: BLE001
        log.warning("cannot record the failure in %s/%s: %s", storage.uri, failure_key(stage, shard), exc)


def clear_failure(storage: Storage, stage: str, shard: int) -> None:
    """Remove the record of an earlier attempt's failure: the shard is being tried again."""
    try:
        storage.delete(failure_key(stage, shard))
    except Exception as exc:  # noqa: BLE001 - the wait then stops on it later (a rerun clears it)
        log.warning("cannot remove %s/%s: %s", storage.uri, failure_key(stage, shard), exc)


def read_failure(storage: Storage, stage: str, shard: int) -> dict[str, Any] | None:
    """The record of ``shard``'s failure (`record_failure`), or None: none, or unreadable."""
    try:
        doc = json.loads(storage.read_bytes(failure_key(stage, shard)))
    except FileNotFoundError:
        return None
    except ValueError:  # torn or foreign: its shard's next failure writes it again
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("error"), str) else None


def failed_shards(storage: Storage, stage: str) -> set[int]:
    """Numbers of the shards with a failure record (one listing)."""
    names = (info.key.rsplit("/", 1)[-1] for info in storage.list(f"{STAGE_DIRS[stage]}/_failed/"))
    return {int(name[:-5]) for name in names if name.endswith(".json") and name[:-5].isdigit()}


def read_manifest(storage: Storage, stage: str, shard: int) -> dict[str, Any] | None:
    """The shard's manifest, or None when the shard is not done."""
    key = manifest_key(stage, shard)
    try:
        raw = storage.read_bytes(key)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested beyond the parser's depth
        raise ValueError(f"{storage.uri}/{key}: corrupt manifest: {exc}") from None
    return _checked(storage, key, doc)


def read_manifest_fields(storage: Storage, stage: str, shard: int) -> dict[str, Any] | None:
    """The shard's manifest with its lists and objects (`items`, `missing`) read as None, or
    None when the shard is not done. It reads in chunks and keeps none of the items: a
    manifest lists every item of its shard (180 MB for 380k), and a pod that only
    asks whether a shard is done (`trajflow wait`, in a small init container) must not need
    the memory to hold them all. Of the nested values it checks only that their brackets
    pair: the pod that reads the items (`read_manifest`) checks the rest."""
    key = manifest_key(stage, shard)
    try:
        doc = read_top_level_fields(storage, key)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ValueError(f"{storage.uri}/{key}: corrupt manifest: {exc}") from None
    return _checked(storage, key, doc)


def read_top_level_fields(storage: Storage, key: str) -> Any:
    """The JSON document at ``key`` with every value nested in the top-level one read as
    None, in the memory of a few chunks (see `read_manifest_fields`). FileNotFoundError,
    or ValueError naming what is wrong."""
    with storage.open_read(key) as stream:
        return json.loads(_top_level_fields(stream))


def _checked(storage: Storage, key: str, doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{storage.uri}/{key}: unsupported manifest (version {doc.get('version') if isinstance(doc, dict) else '?'})")
    return doc


# a run of anything but brackets and quotes, or a whole string (escapes included), each
# matched one way only and possessively: a string cut by the end of a chunk fails at once,
# and no backtracking state piles up over a long run of strings or escapes
_NO_BRACKET = re.compile(rb'(?:[^"\\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL)
# the rest of a string a chunk cut, up to its closing quote or the chunk's end (before a
# backslash whose escaped byte is in the next chunk)
_IN_STRING = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+', re.DOTALL)
_CLOSER = {ord("["): ord("]"), ord("{"): ord("}")}
_FIELDS_CHUNK = 1 << 20


def _top_level_fields(stream: BinaryIO) -> bytes:
    """The JSON document in `stream` with every value nested in the top-level one replaced
    by null: one pass over brackets (strings are skipped whole by a regex), holding a chunk
    or so. A string longer than a chunk is read on from where the chunk ended, never again
    from its quote. Raises ValueError where the brackets do not pair or the document ends
    early."""
    out, opened, buf, pos, in_string = bytearray(), [], b"", 0, False
    while True:
        scan = _IN_STRING if in_string else _NO_BRACKET
        end = scan.match(buf, pos).end()  # type: ignore[union-attr]  # both match the empty string
        keep = len(opened) <= 1
        if keep:
            out += buf[pos:end]
        pos = end
        if pos < len(buf) and buf[pos] == ord('"'):
            # a cut string's closing quote, or the opening quote of a string this chunk cuts
            in_string = not in_string
            if keep:
                out.append(ord('"'))
            pos += 1
            continue
        if pos == len(buf) or in_string:  # the chunk's end (in a string, maybe before a backslash)
            chunk = stream.read(_FIELDS_CHUNK)
            if not chunk:
                raise ValueError("the document ends early" if opened or in_string else "no document")
            buf, pos = buf[pos:] + chunk, 0
            continue
        bracket = buf[pos]
        pos += 1
        if bracket in _CLOSER:
            out += bytes([bracket]) if not opened else b"null" if len(opened) == 1 else b""
            opened.append(_CLOSER[bracket])
            continue
        if not opened or opened.pop() != bracket:
            raise ValueError(f"unexpected {chr(bracket)!r}")
        if not opened:
            return bytes(out + bytes([bracket]))


def done_manifests(storage: Storage, stage: str) -> dict[int, ObjectInfo]:
    """The manifests that exist, by shard number (one listing)."""
    prefix = f"{STAGE_DIRS[stage]}/_done/"
    out = {}
    for info in storage.list(prefix):
        name = info.key.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            out[int(name[:-5])] = info
    return out


def done_shards(storage: Storage, stage: str) -> set[int]:
    """Numbers of the shards whose manifests exist."""
    return set(done_manifests(storage, stage))


def remove_foreign_manifests(storage: Storage, stage: str, shards: int) -> list[int]:
    """Remove the manifests of shard numbers that ``shards`` does not have, left by a run
    with more shards: nothing waits for them, and a consumer listing the done shards (the
    trainer) must not count data that the current shards hold again. Returns their numbers."""
    removed = []
    for other in sorted(done_shards(storage, stage)):
        if other < shards:
            continue
        try:
            doc = read_manifest_fields(storage, stage, other)
        except ValueError:
            doc = None
        if doc is None or doc.get("shards") != shards:
            log.info("removing %s (from a run with %s shards)", manifest_key(stage, other),
                     doc.get("shards") if doc else "?")
            storage.delete(manifest_key(stage, other))
            removed.append(other)
    return removed
