"""Checkpoints under `<root>/train/checkpoints/`, through the run root's atomic writer.

    ckpt-0000001234.pt     torch.save payload (model, optimizer, scheduler, epoch, step,
                           RNG states of every rank, trainer state, config hash)
    ckpt-0000001234.json   its marker: size, sha256, epoch, step, validation loss

The marker is written after the payload, like a shard manifest: a checkpoint exists iff
its marker does, and it is valid iff the payload's size and sha256 match the marker and
it loads. Loading walks from the newest marker down and skips (with a warning) any
checkpoint whose payload is missing or does not match its marker, so a checkpoint cut short
by a killed pod or a corrupted object never stops a restart. Verified bytes that do not
load (another torch or trajflow version) are not corrupt: that stops the run
(`CheckpointUnreadable`) and every checkpoint is kept. Pruning keeps the newest `keep_last`
and the one with the best validation loss.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from trajflow.errors import PermanentError
from trajflow.storage import Storage
from trajflow.storage.manifest import TRAIN_CHECKPOINT_DIR

log = logging.getLogger(__name__)

CHECKPOINT_DIR = TRAIN_CHECKPOINT_DIR
FORMAT = "trajflow.checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{10})\.json$")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a marker says about its checkpoint."""

    key: str  # payload key
    marker: str  # marker key
    step: int
    epoch: int  # epoch the run resumes in
    batch_in_epoch: int  # batches of `epoch` already done (0: the epoch starts afresh)
    val_loss: float | None  # set on the checkpoint written at the end of an epoch
    size: int
    sha256: str
    config_hash: str


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""


class CheckpointUnreadable(PermanentError):
    """A checkpoint whose bytes match its marker but that this process cannot load: it is
    intact (another torch or trajflow wrote it), so it must be neither skipped nor deleted.
    Exit code 3 fails the Job: a retry with the same image fails the same way."""


def _payload_key(step: int) -> str:
    return f"{CHECKPOINT_DIR}/ckpt-{step:010d}.pt"


def _marker_key(step: int) -> str:
    return f"{CHECKPOINT_DIR}/ckpt-{step:010d}.json"


class CheckpointStore:
    def __init__(self, storage: Storage, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.storage = storage
        self.keep_last = keep_last

    def _where(self, key: str) -> str:
        return f"{self.storage.uri}/{key}"

    # ---- listing ------------------------------------------------------------------------

    def _read_marker(self, key: str) -> CheckpointInfo:
        try:
            doc = json.loads(self.storage.read_bytes(key))
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise CheckpointError(f"{self._where(key)}: not a version-{VERSION} checkpoint marker")
            val = doc.get("val_loss")
            step = int(doc["step"])
            # a marker only ever names its own payload: pruning and discarding delete that key
            if key != _marker_key(step) or doc["key"] != _payload_key(step):
                raise CheckpointError(f"{self._where(key)}: a marker of step {step} naming {doc['key']!r}, "
                                      f"not {_payload_key(step)!r}")
            return CheckpointInfo(
                key=_payload_key(step),
                marker=key,
                step=step,
                epoch=int(doc["epoch"]),
                batch_in_epoch=int(doc.get("batch_in_epoch", 0)),
                val_loss=None if val is None else float(val),
                size=int(doc["size"]),
                sha256=str(doc["sha256"]),
                config_hash=str(doc.get("config_hash", "")),
            )
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{self._where(key)}: marker vanished") from None
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            raise CheckpointError(f"{self._where(key)}: unreadable marker ({exc})") from None

    def list(self) -> list[CheckpointInfo]:
        """Checkpoints with a readable marker, oldest first (unreadable markers are warned about)."""
        out = []
        for obj in self.storage.list(CHECKPOINT_DIR + "/"):
            name = obj.key.rsplit("/", 1)[-1]
            if not _NAME.match(name):
                continue
            try:
                out.append(self._read_marker(obj.key))
            except CheckpointError as exc:
                log.warning("ignoring checkpoint: %s", exc)
        return sorted(out, key=lambda c: c.step)

    def best(self, infos: list[CheckpointInfo] | None = None) -> CheckpointInfo | None:
        scored = [c for c in (self.list() if infos is None else infos) if c.val_loss is not None]
        # the earliest of equal losses, as the trainer's best_epoch
        return min(scored, key=lambda c: (c.val_loss, c.step)) if scored else None

    # ---- reading ------------------------------------------------------------------------

    def load(self, info: CheckpointInfo) -> dict[str, Any]:
        """The payload of `info` on the CPU, verified against its marker (CheckpointError otherwise)."""
        try:
            data = self.storage.read_bytes(info.key)
        except FileNotFoundError:
            raise CheckpointError(f"{self._where(info.key)}: payload is missing") from None
        if len(data) != info.size:
            raise CheckpointError(f"{self._where(info.key)}: {len(data)} bytes, the marker says {info.size}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise CheckpointError(f"{self._where(info.key)}: sha256 {digest[:12]}... does not match the marker")
        # the bytes are the ones written: a failure from here on is this process's, not the file's
        remedy = ("it is intact and kept: run the trajflow/torch version that wrote it, or use a new "
                  f"global.runId or remove {self._where(CHECKPOINT_DIR)}/")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except MemoryError:
            raise  # not the file's fault either: an ordinary (retried) failure
        except Exception as exc:  # noqa: BLE001  an unpickler that refuses verified bytes
            raise CheckpointUnreadable(f"{self._where(info.key)}: cannot be loaded by this process "
                                       f"({type(exc).__name__}: {exc}); {remedy}") from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointUnreadable(f"{self._where(info.key)}: not a trajflow checkpoint payload; {remedy}")
        return state

    def latest_valid(self) -> tuple[CheckpointInfo | None, dict[str, Any] | None, list[CheckpointInfo]]:
        """(info, payload) of the newest checkpoint that verifies and loads, or (None, None);
        and the newer ones skipped as corrupt (each warned about). A verified one that does
        not load raises CheckpointUnreadable: falling back to an older one would lose it."""
        skipped: list[CheckpointInfo] = []
        for info in reversed(self.list()):
            try:
                return info, self.load(info), skipped
            except CheckpointError as exc:
                log.warning("skipping corrupt checkpoint: %s", exc)
                skipped.append(info)
        return None, None, skipped

    def discard(self, infos: list[CheckpointInfo]) -> None:
        """Remove checkpoints found corrupt, so they neither shadow newer good ones nor take
        a `keep_last` slot."""
        for info in infos:
            self.storage.delete(info.marker)
            self.storage.delete(info.key)
            log.warning("removed corrupt checkpoint %s", self._where(info.key))

    # ---- writing ------------------------------------------------------------------------

    def save(self, state: dict[str, Any], *, step: int, epoch: int, batch_in_epoch: int,
             val_loss: float | None, config_hash: str) -> CheckpointInfo:
        """Write payload then marker (each atomically), then prune. Call on one rank only."""
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "version": VERSION, **state}, buffer)
        data = buffer.getvalue()
        key = _payload_key(step)
        if self.storage.exists(_marker_key(step)):
            # never rewritten in place: a marker of the old bytes over the new ones reads as
            # corrupt (and is discarded) if the writer dies before the new marker
            log.warning("checkpoint of step %d already exists: replacing it", step)
            self.storage.delete(_marker_key(step))
        self.storage.write_bytes(key, data)
        info = CheckpointInfo(
            key=key,
            marker=_marker_key(step),
            step=step,
            epoch=epoch,
            batch_in_epoch=batch_in_epoch,
            val_loss=val_loss,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            config_hash=config_hash,
        )
        marker = {
            "format": FORMAT,
            "version": VERSION,
            "key": key,
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "val_loss": val_loss,
            "size": info.size,
            "sha256": info.sha256,
            "config_hash": config_hash,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.storage.write_bytes(info.marker, json.dumps(marker, indent=1).encode())
        self.prune()
        return info

    def prune(self) -> list[str]:
        """Delete all but the newest `keep_last` checkpoints and the best; also payloads whose
        marker was never written (a writer killed in between), older than the newest marker."""
        infos = self.list()
        keep = {c.step for c in infos[-self.keep_last :]}
        best = self.best(infos)
        if best is not None:
            keep.add(best.step)
        deleted = []
        for c in infos:
            if c.step not in keep:
                self.storage.delete(c.marker)  # the marker first: never a marker without its payload
                self.storage.delete(c.key)
                deleted.append(c.key)
        newest = infos[-1].step if infos else -1
        marked = {c.key for c in infos}
        for obj in self.storage.list(CHECKPOINT_DIR + "/"):
            m = re.match(r"^ckpt-(\d{10})\.pt$", obj.key.rsplit("/", 1)[-1])
            if m and obj.key not in marked and int(m.group(1)) < newest:
                self.storage.delete(obj.key)
                deleted.append(obj.key)
        if deleted:
            log.debug("pruned checkpoints", extra={"deleted": deleted})
        return deleted
