"""The training loop: one process per rank, as torchrun starts them (or one process alone).

Every start resumes from the newest valid checkpoint, so a group that torchrun brings back
after a failure (`--max-restarts`) continues where the last checkpoint left it: same
epoch, same position in the epoch, same optimiser and RNG states. Decisions that must be
identical on every rank (divergence, early stopping, the end of an epoch, a stop on
SIGTERM or Ctrl-C) are taken on all-reduced values, so no rank ever waits alone in a collective.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from trajflow import log as trajflow_log
from trajflow.config import StageSettings
from trajflow.config.train import TrainConfig
from trajflow.errors import ConfigError, PermanentError, Terminated, TrajflowError, TransientError
from trajflow.metrics import METRICS_ADDR_ENV, Pusher, StageMetrics, train_metrics
from trajflow.storage import LocalStorage, Storage, open_run_root
from trajflow.storage.base import STALE_UPLOAD_S
from trajflow.train import artifacts
from trajflow.train.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
    CheckpointUnreadable,
)
from trajflow.train.data import (
    EpochBatches,
    TrainData,
    WindowDataset,
    build_data,
    check_finite,
    local_moments,
    open_shards,
    rank_share,
    stats_from_moments,
)
from trajflow.train.dist import DistContext
from trajflow.train.errors import TrainingDiverged
from trajflow.train.launch import record_final_failure
from trajflow.train.models import (
    ModelSpec,
    TrajectoryModel,
    build_model,
    parameter_count,
)

log = logging.getLogger(__name__)

# What stops a training at a step, with a checkpoint: SIGTERM (a pod deleted, drained or
# preempted) and SIGINT (Ctrl-C, which torch's agent also passes on to its workers).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop signal this long after the first stops a rank at once. Sooner it is the same
# request: the parent-death signal of an agent killed with several threads comes once per thread.
REPEATED_STOP_S = 1.0
# A loader worker that cannot put a batch into a full /dev/shm drops it and the rank would
# wait for ever; a batch of local, memory-mapped windows never takes this long otherwise.
LOADER_TIMEOUT_S = 600.0
# A checkpoint temporary unwritten this long is a killed writer's, not one still being written
ABANDONED_CHECKPOINT_S = 600.0


def _shm_nearly_full(path: str = "/dev/shm") -> bool:
    """Whether the shared memory loader workers hand batches over in is (about) used up."""
    import shutil

    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < max(usage.total // 20, 16 << 20)


HASHED = ("task", "observation", "action", "window", "model")  # what a checkpoint's weights depend on


def config_hash(config: TrainConfig) -> str:
    """Hash of what a checkpoint's weights depend on (task, streams, window, architecture).
    Optimisation settings (epochs, learning rate...) may change between restarts. A new
    setting must leave it unchanged at its default: runs in progress resume on new images
    (tests/workloads/test_config.py pins it)."""
    part = config.model_dump(mode="json", include=set(HASHED))
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def hashed_differences(saved: Any, config: TrainConfig) -> list[str]:
    """What differs between a checkpoint's config (as its payload holds it, by alias) and
    ``config`` in the settings `config_hash` covers, as "model.hiddenSize 128 -> 256"."""
    if not isinstance(saved, dict):
        return []  # a checkpoint from before the payload carried its config
    now = config.model_dump(mode="json", by_alias=True)
    out = []
    for key in HASHED:
        before, after = saved.get(key), now.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            out += [f"{key}.{k} {before.get(k)!r} -> {after.get(k)!r}"
                    for k in sorted({*before, *after}) if before.get(k) != after.get(k)]
        elif before != after:
            out.append(f"{key} {before!r} -> {after!r}")
    return out


def split_settings(config: TrainConfig) -> dict[str, Any]:
    """What decides which windows are validation and the order of the batches: a checkpoint's
    best loss, early-stopping count and position in the epoch mean nothing under others."""
    return {"seed": config.seed, "valFraction": config.val_fraction, "stride": config.stride,
            "episodeSplit": SPLIT_SCHEME}


# how split_episodes picks the validation episodes: a checkpoint of another scheme validated others
SPLIT_SCHEME = "name-hash-threshold"


@dataclass
class TrainerState:
    """Progress that checkpoints carry besides the model and optimiser."""

    epoch: int = 0  # the epoch in progress (or next to start)
    batch_in_epoch: int = 0  # batches of `epoch` already done
    step: int = 0  # optimiser steps over the whole run
    initial_val_loss: float | None = None
    best_val_loss: float | None = None  # the lowest validation loss: the exported model's
    best_epoch: int | None = None
    # early stopping counts epochs that fail to beat this by minDelta (it moves only when
    # one does, so slow steady gains still end the run)
    early_stopping_reference: float | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # running sums of the epoch in progress, so a mid-epoch resume reports the same epoch loss
    epoch_loss_sum: float = 0.0
    epoch_samples: float = 0.0
    epoch_train_seconds: float = 0.0
    resumed_from: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(doc: dict[str, Any]) -> "TrainerState":
        known = TrainerState.__dataclass_fields__
        return TrainerState(**{k: v for k, v in doc.items() if k in known})


def has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 (Ampere and later). torch.cuda.is_bf16_supported()
    also says yes where bf16 is only emulated (V100, T4), slower than float32."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
        # this rank's own GPU (set_device made it the current one): the next run may place the
        # same rank on another pod with another number of GPUs
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> bool:
    """Restore a rank's generators; returns False where its GPU's could not be (a checkpoint
    of a CPU run, or one that saved every GPU of a pod of another shape)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if not torch.cuda.is_available():
        return True
    if isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda.cpu())
        return True
    if cuda and len(cuda) == torch.cuda.device_count():  # a checkpoint that saved every visible GPU's
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        return True
    return False


def parameter_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _lr_factor(config: TrainConfig, total_steps: int) -> Any:
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, settings: StageSettings, dist: DistContext, storage: Storage, metrics: StageMetrics):
        self.settings = settings
        self.config: TrainConfig = settings.config
        self.dist = dist
        self.storage = storage
        self.metrics = metrics
        self.store = CheckpointStore(storage, keep_last=self.config.checkpoints.keep_last)
        self.hash = config_hash(self.config)
        self._val_sample: tuple[int, np.ndarray] | None = None  # (windows, the sample drawn of them)
        self.state = TrainerState()
        self.last_checkpoint: CheckpointInfo | None = None
        self.checkpoint_written_at = 0.0  # of the checkpoint resumed from (0: unknown)
        self.status = "running"
        self._stop_signal: int | None = None  # a stop signal noted while the epochs run
        self.device = dist.device
        self.autocast = self.config.bf16 and self.device.type == "cuda"
        if self.autocast and not has_native_bf16(self.device):
            log.warning("this GPU only emulates bf16 (before Ampere): training in fp32 (set training.config.bf16: false "
                        "to silence)")
            self.autocast = False
        self.spec: ModelSpec | None = None
        self.per_epoch = 0  # batches an epoch (each rank's), set once the data is known
        self.rate_hz: float | None = None  # of the shards: a checkpoint holds a model of that rate
        # the training split's moments: a checkpoint holds a model of exactly that data
        self.data_moments: np.ndarray | None = None

    # ---- setup --------------------------------------------------------------------------

    def _log(self, msg: str, *args: Any, **extra: Any) -> None:
        if self.dist.is_main:
            log.info(msg, *args, extra=extra or None)

    def load_data(self) -> TrainData:
        cfg = self.config
        streams = [cfg.observation] if cfg.task == "forecast" else [cfg.observation, cfg.action]
        cache = cfg.cache_dir or None
        # the first rank of each node fetches (S3) or checks (filesystem) the shards against their
        # manifests; the others then open what it found good
        shards, failure = None, None
        if self.dist.local_rank == 0:
            try:
                shards = open_shards(self.storage, streams, cache)
            except TrajflowError as exc:
                failure = exc
        # in place of a barrier: every rank stops with the error (and exit code) that stopped a
        # first rank, instead of losing that peer in the barrier
        self._gather_or_fail(failure, data_wait=True)
        identity, failure = None, None
        try:
            if shards is None:
                shards = open_shards(self.storage, streams, cache, verify=False)
            data = build_data(shards, cfg, announce=self.dist.is_main)
            identity = shards.identity()
        except TrajflowError as exc:
            failure = exc
        # every rank lists the shards itself: one that saw preprocessing rewrite them would
        # train on other windows, or wait in a collective the others never reach
        if len(set(self._gather_or_fail(failure, identity))) > 1:
            raise TransientError(
                f"the ranks opened different shards under {self.storage.uri}/resampled/ (preprocessing rewrote them "
                "while training started?): every rank stops, and the restarted group opens them again")
        if len(data.train) == 0 or len(data.val) == 0:
            raise PermanentError(f"no samples in the {'training' if not len(data.train) else 'validation'} split "
                                 f"(window {cfg.window}, {data.describe()})")
        self._log("data ready", **data.describe())
        return data

    def _gather_or_fail(self, failure: TrajflowError | None, value: Any = None, data_wait: bool = False) -> list[Any]:
        """`value` of every rank, unless a rank failed: then every rank raises that rank's
        error (its own first), with its exit code."""
        seen = self.dist.gather_objects((value, failure and (type(failure), str(failure))), data_wait=data_wait)
        if failure is not None:
            raise failure
        for _, failed in seen:
            if failed:
                kind, message = failed
                raise kind(message)
        return [v for v, _ in seen]

    def scan_data(self, data: TrainData) -> list[tuple[np.ndarray, np.ndarray]]:
        """One pass over the data, shared out over the ranks: rejects NaN/Inf frames in
        either split, and returns the (mean, std) of the input and target streams over the
        training split only (one all-reduce adds up the ranks' moments)."""
        streams = [data.train.input_stream, data.train.target_stream]
        rank, world = self.dist.rank, self.dist.world_size
        check_finite(data.shards, [data.val_episodes[i] for i in rank_share(len(data.val_episodes), rank, world)], streams)
        mine = [data.train_episodes[i] for i in rank_share(len(data.train_episodes), rank, world)]
        vector = torch.from_numpy(local_moments(data.shards, mine, streams)).to(self.device)
        total = self.data_moments = self.dist.all_reduce_sum(vector).cpu().numpy()
        return stats_from_moments(total, [data.shards.dims[s] for s in streams])

    # ---- checkpoints --------------------------------------------------------------------

    def resume(self, model: TrajectoryModel, optimizer: torch.optim.Optimizer, scheduler: Any) -> bool:
        """Load the newest valid checkpoint (chosen on rank 0, loaded by every rank)."""
        choice: dict[str, Any] | None = None
        unreadable: str | None = None
        payload: dict[str, Any] | None = None
        if self.dist.is_main:
            if isinstance(self.storage, LocalStorage):
                # not the temporary a pod of an earlier Job may still be writing its last checkpoint to
                self.storage.remove_stale_temporaries(CHECKPOINT_DIR, older_than_s=ABANDONED_CHECKPOINT_S)
            else:  # counted from an upload's start, not its last part: as long as the other stages wait
                self.storage.abort_stale_uploads(CHECKPOINT_DIR + "/", STALE_UPLOAD_S)
            try:
                info, payload, skipped = self.store.latest_valid()
            except CheckpointUnreadable as exc:  # intact: every checkpoint is kept, the run stops
                info, skipped, unreadable = None, [], str(exc)
            if skipped:  # missing or not matching their markers: really corrupt
                self.store.discard(skipped)
                if info is None:
                    log.warning("no checkpoint could be loaded (all corrupt, removed: %s): training starts from "
                                "step 0", ", ".join(c.key for c in skipped))
            choice = None if info is None else asdict(info)
        # every rank stops with rank 0's error, instead of waiting for it in the broadcast
        choice, unreadable = self.dist.broadcast_object((choice, unreadable))
        if unreadable is not None:
            raise CheckpointUnreadable(unreadable)
        if choice is None:
            return False
        info = CheckpointInfo(**choice)
        if payload is None:  # rank 0 has it already
            payload = self.store.load(info)  # on the CPU: load_state_dict copies onto the device
        if payload.get("config_hash") != self.hash:
            changed = hashed_differences(payload.get("config"), self.config)
            what = ", ".join(changed) or f"config hash {payload.get('config_hash')} != {self.hash}"
            raise ConfigError(
                f"{self.storage.uri}/{info.key} was written for a different task/streams/window/model "
                f"(training.config {what}); restore them, or use a new global.runId or remove "
                f"{self.storage.uri}/{CHECKPOINT_DIR}/"
            )
        # the hash covers the config only: the stream widths come from the shards, which may have been redone
        saved = payload.get("spec") or {}
        differ = [f"{k} {saved[k]!r} (the current data and config give {v!r})"
                  for k, v in model.spec.to_json().items() if k in saved and saved[k] != v]
        if payload.get("rate_hz") not in (None, self.rate_hz):  # shards redone at another targetRateHz
            differ.append(f"data at {payload['rate_hz']:g} Hz (the current shards are at {self.rate_hz:g} Hz)")
        if differ:
            raise ConfigError(
                f"{self.storage.uri}/{info.key} was written for another model: {', '.join(differ)}; use a new "
                f"global.runId or remove {self.storage.uri}/{CHECKPOINT_DIR}/"
            )
        saved_split, split = payload.get("split", split_settings(self.config)), split_settings(self.config)
        if "episodeSplit" not in saved_split:
            log.warning("%s was written by a version that chose the validation episodes otherwise: its best loss "
                        "was measured on another validation set", info.key)
            saved_split = {**saved_split, "episodeSplit": SPLIT_SCHEME}
        changed = [f"{k} {saved_split.get(k)!r} -> {v!r}" for k, v in split.items() if saved_split.get(k) != v]
        if changed:
            raise ConfigError(
                f"{self.storage.uri}/{info.key} was written with other training.config {', '.join(changed)}: they "
                "choose the validation episodes and the batches, so its best loss and position would not carry over; "
                f"restore them, or use a new global.runId or remove {self.storage.uri}/{CHECKPOINT_DIR}/"
            )
        # with the split unchanged, other moments mean other frames: new sources, other preprocessing
        if not same_data(payload.get("data_moments"), self.data_moments):
            raise ConfigError(
                f"{self.storage.uri}/{info.key} was trained on other data: the training split's frames differ from "
                "the current shards' (the sources or the preprocessing changed since); use a new global.runId or "
                f"remove {self.storage.uri}/{CHECKPOINT_DIR}/"
            )
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        self.state = TrainerState.from_dict(payload["trainer"])
        if self.state.early_stopping_reference is None:  # a checkpoint from before the field
            self.state.early_stopping_reference = self.state.best_val_loss
        same_world = payload.get("world_size") == self.dist.world_size
        own_stream = self.config.seed + 1000 * self.dist.rank + 1 + self.state.step
        if not same_world:  # the ranks' generators cannot be restored: give each its own stream again
            torch.manual_seed(own_stream)
        elif not _set_rng_state(payload["rng"][self.dist.rank]):
            torch.cuda.manual_seed(own_stream)  # not every rank on the seed all GPUs were given
        if self.state.batch_in_epoch:
            self._place_in_epoch(info, payload)
        self.state.resumed_from.append(
            {"key": info.key, "step": info.step, "epoch": info.epoch, "batch_in_epoch": info.batch_in_epoch,
             "resumed_at_batch": self.state.batch_in_epoch, "restart": self.dist.restart_count,
             "world_size": self.dist.world_size}
        )
        self.last_checkpoint = info
        # the checkpoint's age goes on from its writing, not from this process's start (a
        # crash-looping run would never look overdue); older payloads: the file's time
        written_at = payload.get("written_at")
        if written_at is None:
            with contextlib.suppress(OSError):
                stat = self.storage.stat(info.key)
                written_at = stat.modified_ns / 1e9 if stat is not None else None
        self.checkpoint_written_at = float(written_at or 0.0)
        if self.finished():
            self._warn_already_finished(info)
        else:
            self._log("resumed from checkpoint", key=info.key, step=info.step, epoch=info.epoch,
                      batch_in_epoch=info.batch_in_epoch)
        return True

    def _warn_already_finished(self, info: CheckpointInfo) -> None:
        """A rerun after the final checkpoint trains nothing: say so, or a changed learning
        rate (or any setting but the epochs) looks applied while the model is the old one."""
        if not self.dist.is_main:
            return
        done, total = self.state.epoch, self.config.epochs
        where, more = f"at epoch {done} of {total}", "epochs"
        if done > total:
            where = f"at epoch {done}, past the {total} epochs configured"
        elif done < total:
            where, more = where + " (early stopping)", "earlyStopping.patience"
        msg = f"training had already finished {where} (checkpoint {info.key}, step {info.step})"
        restarted = self.dist.restart_count > 0  # by the launcher, in this same run (writing the model failed)
        if not restarted:
            msg += (f": settings changed since are not applied (raise training.config.{more} to train on, or use a "
                    "new global.runId)")
        # already_finished for the local runner's summary; epoch and epochs as "epoch done" and the
        # live view take them: the last epoch trained, and a total never below it (the
        # checkpoint's own epoch is the next one, past the end)
        extra = {"already_finished": msg, "key": info.key, "step": info.step, "epoch": done - 1,
                 "epochs": max(done, total)}
        log.log(logging.INFO if restarted else logging.WARNING, "%s", msg, extra=extra)

    def _place_in_epoch(self, info: CheckpointInfo, payload: dict[str, Any]) -> None:
        """Go on from where a mid-epoch checkpoint stopped, in this run's batches. Every world
        size and batch size deals the epoch's order alike (`EpochBatches`): the batches done
        covered its first world x batchSize x batches windows, so another world size or
        batchSize goes on from the batch that starts at or before that point, and at most one
        step's windows are trained again. Where those windows cover this run's whole epoch
        (maxStepsPerEpoch), its last batch is trained again: the epoch then ends at a step of
        its own, whose checkpoint does not overwrite the one resumed from. The epoch's running
        sums (loss, samples, seconds) keep the share of the windows before that batch, so the
        windows trained again count once in the epoch's loss and rate."""
        done_windows = (payload.get("world_size") or self.dist.world_size) * \
            payload.get("batch_size", self.config.batch_size) * self.state.batch_in_epoch
        step_windows = self.dist.world_size * self.config.batch_size
        position = min(done_windows // step_windows, self.per_epoch - 1)
        if position == self.state.batch_in_epoch and position * step_windows == done_windows:
            return  # the same windows, at the same batch
        if self.dist.is_main:
            log.warning(
                "checkpoint %s was written by %s processes with batchSize %s at batch %d of epoch %d, %d windows in; "
                "this run has %s with %s and %d batches an epoch: the epoch goes on from batch %d, %d of those "
                "windows again",
                info.key, payload.get("world_size"), payload.get("batch_size"), self.state.batch_in_epoch,
                self.state.epoch, done_windows, self.dist.world_size, self.config.batch_size, self.per_epoch, position,
                min(done_windows, (position + 1) * step_windows) - position * step_windows,
            )
        st = self.state
        kept = position * step_windows / done_windows
        st.epoch_loss_sum *= kept
        st.epoch_samples *= kept
        st.epoch_train_seconds *= kept
        st.batch_in_epoch = position

    def checkpoint(self, model: TrajectoryModel, optimizer: torch.optim.Optimizer, scheduler: Any,
                   val_loss: float | None) -> None:
        rngs = self.dist.gather_objects(_rng_state())  # every rank's, so each resumes its own stream
        failure: BaseException | None = None
        if self.dist.is_main:
            try:
                self._save_checkpoint(model, optimizer, scheduler, val_loss, rngs)
            except BaseException as exc:  # re-raised below, after the peers know
                failure = exc
        self._fail_together(failure, f"writing the checkpoint of step {self.state.step}")

    def _fail_together(self, failure: BaseException | None, what: str) -> None:
        """Every rank waits here for rank 0's `what`, and fails with it: a peer that went on
        (or stopped: its launcher then gives rank 0 30 s before a SIGKILL) would leave rank 0
        alone with a half-written file, or hang its next collective."""
        failed = self.dist.all_reduce_max(
            torch.tensor([1.0 if failure is not None else 0.0], device=self.dist.device))
        if failure is not None:
            raise failure
        if failed.item() > 0:
            raise RuntimeError(f"rank 0 failed {what} (its log has the error); failing with it so the run is retried")

    def _save_checkpoint(self, model: TrajectoryModel, optimizer: torch.optim.Optimizer, scheduler: Any,
                         val_loss: float | None, rngs: list[Any]) -> None:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "trainer": self.state.to_dict(),
            "rng": rngs,
            "world_size": self.dist.world_size,
            "config_hash": self.hash,
            "split": split_settings(self.config),
            "batch_size": self.config.batch_size,
            "batches_per_epoch": self.per_epoch,
            "config": self.config.model_dump(mode="json", by_alias=True),
            "spec": model.spec.to_json(),
            "rate_hz": self.rate_hz,
            "data_moments": None if self.data_moments is None else self.data_moments.tolist(),
            "written_at": time.time(),
        }
        self.last_checkpoint = self.store.save(
            payload, step=self.state.step, epoch=self.state.epoch, batch_in_epoch=self.state.batch_in_epoch,
            val_loss=val_loss, config_hash=self.hash,
        )
        self.metrics.checkpoint_time.set(payload["written_at"])
        log.debug("checkpoint written", extra={"key": self.last_checkpoint.key})

    # ---- steps --------------------------------------------------------------------------

    def _batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        # the loader workers start (fork) with the stop signals blocked, until they leave this
        # process group (`_leave_process_group`); here it waits until they have started
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if loader.num_workers else None
        try:
            batches = iter(loader)
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        while True:
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                if "DataLoader timed out" not in str(exc):
                    raise
                waited = f"no batch from the DataLoader workers in {loader.timeout:g} s"
                if _shm_nearly_full():
                    raise PermanentError(
                        f"{waited}, and /dev/shm is nearly full (a worker's log says 'unable to allocate shared "
                        "memory'): raise training.shm.sizeLimit, or lower config.numWorkers or config.batchSize") from None
                raise TransientError(f"{waited} (a worker stuck on storage, or deadlocked): the pod is retried") from None
            yield x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)

    def _autocast(self) -> Any:
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _validation_windows(self, n: int) -> Sequence[int]:
        """The windows every validation pass covers: all n, or a seeded sample of
        maxValWindows of them, spread over every validation episode and drawn once."""
        cap = self.config.max_val_windows
        if not cap or n <= cap:
            return range(n)
        if self._val_sample is None or self._val_sample[0] != n:
            rng = np.random.default_rng(self.config.seed)
            self._val_sample = (n, np.sort(rng.choice(n, cap, replace=False)))
        return self._val_sample[1]

    @torch.no_grad()
    def evaluate(self, model: TrajectoryModel, dataset: WindowDataset) -> float:
        """Mean validation loss over the validation windows (`_validation_windows`), each
        exactly once whatever the world size."""
        was_training = model.training
        model.eval()
        windows = self._validation_windows(len(dataset))
        indices = windows[self.dist.rank :: self.dist.world_size]  # as rank_share: a range or a view, no list
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        bs = self.config.batch_size
        for start in range(0, len(indices), bs):
            x, y = dataset[indices[start : start + bs]]
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                pred = model(x)
            err = (pred.float() - model.normalize_target(y)).square().mean(dim=1)
            sums[0] += err.sum(dtype=torch.float64)
            sums[1] += err.shape[0]
        self.dist.all_reduce_sum(sums)
        model.train(was_training)
        self.metrics.last_progress.set(time.time())  # a validation pass is progress too (no steps meanwhile)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    def _diverged(self, loss: float, epoch: int, split: str) -> TrainingDiverged:
        # The loss gauge carries the divergence to the NaN-loss alert (the final push sends
        # it). A finite mean loss means the gradient norm diverged: the next loss would be
        # NaN, so NaN is what the gauge says.
        self.metrics.loss.labels(split=split).set(loss if not math.isfinite(loss) else math.nan)
        # rank 0 writes the checkpoints: only it can name the last one
        where = ""
        if self.dist.is_main:
            where = f"; last good checkpoint: {self.last_checkpoint.key if self.last_checkpoint else 'none yet'}"
        return TrainingDiverged(
            f"training diverged: the loss or gradient norm became NaN/Inf at epoch {epoch}, step {self.state.step + 1} "
            f"(mean loss {loss}){where}. Lower training.config.learningRate, set gradClip, or check the data"
        )

    # ---- the run ------------------------------------------------------------------------

    def finished(self) -> bool:
        cfg = self.config
        if self.state.epoch >= cfg.epochs:
            return True
        es = cfg.early_stopping
        return es.enabled and self.state.epochs_without_improvement >= es.patience

    def run(self) -> dict[str, Any]:
        cfg, dist = self.config, self.dist
        data = self.load_data()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        spec = self.spec = ModelSpec.from_config(cfg.model, data.train.input_dim, data.train.target_dim, cfg.window)
        self.rate_hz = data.shards.rate_hz
        model = build_model(spec).to(self.device)
        lr = cfg.learning_rate * (dist.world_size if cfg.scale_lr_with_world_size else 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        batches = EpochBatches(data.train, cfg.batch_size, dist.rank, dist.world_size, cfg.seed,
                               max_batches=cfg.max_steps_per_epoch)
        per_epoch = self.per_epoch = batches.batches_per_epoch()
        if dist.is_main and cfg.warmup_steps > per_epoch * cfg.epochs:
            # not refused: a `helm upgrade` to more nodes shortens the epochs of a run under way
            log.warning("training.config.warmupSteps %d is more than the whole run's %d steps (%d epochs of %d on %d "
                        "process(es)): the learning rate never reaches learningRate", cfg.warmup_steps,
                        per_epoch * cfg.epochs, cfg.epochs, per_epoch, dist.world_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, per_epoch * cfg.epochs))

        (in_mean, in_std), (out_mean, out_std) = self.scan_data(data)
        # the data is fetched, verified and scanned: progress, for the stall alert that
        # otherwise counts from the start (a long load is not a hang)
        self.metrics.last_progress.set(time.time())
        resumed = self.resume(model, optimizer, scheduler)
        st = self.state
        # the configured learning rate and weight decay apply from here on, also when they
        # changed since the checkpoint (loading the optimiser restored the checkpoint's)
        scheduler.base_lrs = [lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay
        if resumed:
            # The schedule's length is per_epoch * epochs of this world size; the restored
            # last_epoch counts the checkpoint's steps, which differ when the world size (or the
            # batches per epoch) changed. Put the schedule at the same point of the run and apply
            # its learning rate now, not only from the next step.
            scheduler.last_epoch = st.epoch * per_epoch + st.batch_in_epoch  # within the epoch (resume checks it)
            lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, group_lr in zip(optimizer.param_groups, lrs):
                group["lr"] = group_lr
            scheduler._last_lr = lrs
        if not resumed:
            model.set_normalization(in_mean, in_std, out_mean, out_std)
            torch.manual_seed(cfg.seed + 1000 * dist.rank + 1)  # dropout differs per rank
        if dist.is_main and not (resumed and self.finished()):  # it describes the model, which nothing retrains
            artifacts.write_config(self.storage, self.resolved_config())
        self._log("model ready", type=spec.type, parameters=parameter_count(model), world_size=dist.world_size,
                  device=str(self.device), steps_per_epoch=per_epoch, learning_rate=lr)

        ddp: nn.Module = model
        if dist.distributed:
            ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # iter(loader) draws a seed from this generator (the global RNG without one): reseeded per
        # epoch, it keeps the dropout RNG stream of a mid-epoch resume identical to an uninterrupted run's
        loader_rng = torch.Generator()
        loader = DataLoader(data.train, batch_size=None, sampler=batches, num_workers=cfg.num_workers,
                            pin_memory=self.device.type == "cuda", generator=loader_rng,
                            worker_init_fn=_leave_process_group, timeout=LOADER_TIMEOUT_S if cfg.num_workers else 0)
        if st.initial_val_loss is None:
            st.initial_val_loss = self.evaluate(model, data.val)
            self._log("initial validation loss", initial_val_loss=st.initial_val_loss)
        m = self.metrics
        m.restarts.set(dist.restart_count)
        m.learning_rate.set(scheduler.get_last_lr()[0])  # known before the first step logs it
        if resumed:
            self._restore_gauges()

        with self._signals_stop_at_a_step():
            while not self.finished():
                epoch = st.epoch
                m.epoch.set(epoch)
                batches.set_epoch(epoch, skip_batches=st.batch_in_epoch)
                loader_rng.manual_seed(cfg.seed + epoch)
                model.train()
                window_start, window_samples = time.perf_counter(), 0
                fetch_start = time.perf_counter()
                for x, y in self._batches(loader):
                    step_start = time.perf_counter()
                    with self._autocast():
                        pred = ddp(x)
                    loss = nn.functional.mse_loss(pred.float(), model.normalize_target(y))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip > 0:
                        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    else:
                        norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                    n = x.shape[0]
                    bad = (~torch.isfinite(loss.detach())) | (~torch.isfinite(norm))
                    # one small all-reduce per step: the loss for the logs, and a divergence flag
                    # and a stop request every rank sees at the same step
                    reduced = torch.cat([torch.stack([loss.detach().double() * n, bad.double()]),
                                         torch.tensor([n, self._stop_signal is not None], dtype=torch.float64,
                                                      device=self.device)])
                    loss_sum, bad_ranks, samples, stopping_ranks = self.dist.all_reduce_sum(reduced).tolist()
                    if bad_ranks > 0:
                        raise self._diverged(loss_sum / max(samples, 1), epoch, "train")
                    optimizer.step()
                    scheduler.step()
                    now = time.perf_counter()
                    st.step += 1
                    st.batch_in_epoch += 1
                    st.epoch_loss_sum += loss_sum
                    st.epoch_samples += samples
                    st.epoch_train_seconds += now - fetch_start
                    window_samples += samples
                    m.step_seconds.observe(now - step_start)
                    m.steps.inc()
                    m.last_progress.set(time.time())
                    if st.step % cfg.log_every_steps == 0:
                        rate = window_samples / max(now - window_start, 1e-9)
                        m.samples_per_second.set(rate)
                        m.learning_rate.set(scheduler.get_last_lr()[0])
                        if self.device.type == "cuda":
                            m.gpu_memory.set(torch.cuda.max_memory_allocated(self.device))
                        self._log("training", epoch=epoch, step=st.step, loss=loss_sum / max(samples, 1),
                                  samples_per_second=round(rate, 1))
                        window_start, window_samples = time.perf_counter(), 0
                    # at an epoch's last batch, the epoch's end checkpoints (with its validation) and
                    # the next step stops: two checkpoints of one step would share their file names
                    if stopping_ranks > 0 and st.batch_in_epoch < per_epoch:
                        self.stop_with_checkpoint(model, optimizer, scheduler, int(stopping_ranks))
                    every = cfg.checkpoints.every_steps
                    if every and st.step % every == 0 and st.batch_in_epoch < per_epoch:
                        self.checkpoint(model, optimizer, scheduler, val_loss=None)
                    fetch_start = time.perf_counter()
                self.end_epoch(model, optimizer, scheduler, data)
            return self.finish(model, data)

    @contextlib.contextmanager
    def _signals_stop_at_a_step(self) -> Iterator[None]:
        """While the epochs run, a stop signal (`STOP_SIGNALS`) is noted, not raised: the next
        step's all-reduce tells every rank, and the group checkpoints that step and stops
        (`stop_with_checkpoint`), so neither a preemption nor Ctrl-C loses steps. A later
        signal raises at once; a run that finishes first exits as finished. A SIGINT this
        process ignores (started in the background) stays ignored; torch's agent handles
        SIGINT whatever it inherited and passes it on. (The agent signals each worker's
        process group: DataLoader workers leave it, see `_leave_process_group`.)"""
        if threading.current_thread() is not threading.main_thread():  # only it may set handlers
            yield
            return

        noted_at = 0.0

        def note(signum: int, frame: object) -> None:
            nonlocal noted_at
            if self._stop_signal is None:
                self._stop_signal, noted_at = signum, time.monotonic()
            elif time.monotonic() - noted_at >= REPEATED_STOP_S:
                raise Terminated(signum)

        # None: a handler installed outside Python, which cannot be put back
        previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS
                    if signal.getsignal(sig) not in (signal.SIG_IGN, None)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_with_checkpoint(self, model: TrajectoryModel, optimizer: torch.optim.Optimizer, scheduler: Any,
                             signalled_ranks: int) -> None:
        """Every rank, at the same step: checkpoint it, then stop as a terminated run (a rerun resumes here)."""
        self.checkpoint(model, optimizer, scheduler, val_loss=None)
        st = self.state
        here = f" (this one {signal.Signals(self._stop_signal).name})" if self._stop_signal else ""
        log.warning("stopping: %d rank(s) got a stop signal%s; the group checkpointed step %d (epoch %d) and stops",
                    signalled_ranks, here, st.step, st.epoch)
        raise Terminated(self._stop_signal or signal.SIGTERM)

    def _restore_gauges(self) -> None:
        """A resumed run's gauges say where the run stands from its first push on, also when
        the checkpoint is the final one and no epoch is left to set them."""
        st, m = self.state, self.metrics
        if self.checkpoint_written_at > 0:
            m.checkpoint_time.set(self.checkpoint_written_at)
        m.epoch.set(st.history[-1]["epoch"] if self.finished() and st.history else st.epoch)
        if st.best_val_loss is not None:
            m.best_val_loss.set(st.best_val_loss)
        if st.history:
            m.loss.labels(split="train").set(st.history[-1]["train_loss"])
            m.loss.labels(split="val").set(st.history[-1]["val_loss"])

    def end_epoch(self, model: TrajectoryModel, optimizer: torch.optim.Optimizer, scheduler: Any, data: TrainData) -> None:
        cfg, st, m = self.config, self.state, self.metrics
        val_loss = self.evaluate(model, data.val)
        train_loss = st.epoch_loss_sum / max(st.epoch_samples, 1)
        rate = st.epoch_samples / max(st.epoch_train_seconds, 1e-9)
        if not math.isfinite(val_loss):
            raise self._diverged(val_loss, st.epoch, "val")
        # the same choice as CheckpointStore.best: the lowest loss, the earliest on a tie
        if st.best_val_loss is None or val_loss < st.best_val_loss:
            st.best_val_loss, st.best_epoch = val_loss, st.epoch
        reference = st.early_stopping_reference
        if reference is None or val_loss < reference - cfg.early_stopping.min_delta:
            st.early_stopping_reference, st.epochs_without_improvement = val_loss, 0
        else:
            st.epochs_without_improvement += 1
        st.history.append({
            "epoch": st.epoch,
            "step": st.step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "learning_rate": scheduler.get_last_lr()[0],
            "samples_per_second": rate,
            "train_seconds": st.epoch_train_seconds,
        })
        m.loss.labels(split="train").set(train_loss)
        m.loss.labels(split="val").set(val_loss)
        m.best_val_loss.set(st.best_val_loss)
        m.samples_per_second.set(rate)
        m.learning_rate.set(scheduler.get_last_lr()[0])
        if self.device.type == "cuda":
            m.gpu_memory.set(torch.cuda.max_memory_allocated(self.device))
        self._log("epoch done", epoch=st.epoch, train_loss=train_loss, val_loss=val_loss,
                  best_val_loss=st.best_val_loss, samples_per_second=round(rate, 1))
        st.epoch += 1
        st.batch_in_epoch = 0
        st.epoch_loss_sum = st.epoch_samples = st.epoch_train_seconds = 0.0
        self.checkpoint(model, optimizer, scheduler, val_loss=val_loss)
        if self.dist.is_main:
            self.write_progress(model.spec)

    # ---- artifacts ----------------------------------------------------------------------

    def resolved_config(self) -> dict[str, Any]:
        return {
            "global": self.settings.global_.model_dump(mode="json", by_alias=True),
            "config": self.config.model_dump(mode="json", by_alias=True),
        }

    def summary(self, spec: ModelSpec) -> dict[str, Any]:
        st = self.state
        last = st.history[-1] if st.history else {}
        rates = [h["samples_per_second"] for h in st.history if h.get("samples_per_second")]
        return {
            "status": self.status,
            "run_id": self.settings.global_.run_id,
            "task": self.config.task,
            "model": spec.to_json(),
            "config_hash": self.hash,
            "world_size": self.dist.world_size,
            "device": self.device.type,
            "epochs_completed": st.epoch,
            "steps": st.step,
            "initial_val_loss": st.initial_val_loss,
            "best_val_loss": st.best_val_loss,
            "best_epoch": st.best_epoch,
            "final_train_loss": last.get("train_loss"),
            "final_val_loss": last.get("val_loss"),
            "samples_per_second": float(np.median(rates)) if rates else None,
            "history": st.history,
            "resumed_from": st.resumed_from,
            "restarts": self.dist.restart_count,
        }

    def write_progress(self, spec: ModelSpec, extra: dict[str, Any] | None = None, curve: bool = False) -> None:
        """metrics.json after every epoch; the loss curve (a second of matplotlib) at the end."""
        doc = {**self.summary(spec), **(extra or {})}
        artifacts.write_metrics(self.storage, doc)
        if curve:
            title = f"{self.settings.global_.run_id}: {self.config.task}, {spec.type}"
            artifacts.write_loss_curve(self.storage, self.state.history, self.state.initial_val_loss, title)

    def finish(self, model: TrajectoryModel, data: TrainData) -> dict[str, Any]:
        st = self.state
        self.status = "completed" if st.epoch >= self.config.epochs else "early_stopped"
        digests = self.dist.gather_objects(parameter_digest(model))
        in_sync = len(set(digests)) == 1
        if not in_sync:
            log.error("model parameters differ between ranks after training", extra={"digests": digests})
        extra = {"parameter_digests": digests, "ranks_in_sync": in_sync, "data": data.describe()}
        summary = {**self.summary(model.spec), **extra}
        # Rank 0 writes the model after the last training collective; the final all-reduce
        # keeps every rank alive until it is written, so a failure there fails all ranks
        # together (the launcher restarts the group, resume takes the final checkpoint)
        # instead of leaving rank 0 alone with its peers gone and the Job without a model.
        failure: BaseException | None = None
        if self.dist.is_main:
            try:
                weights, epoch = model.state_dict(), st.epoch - 1
                val_loss = st.history[-1]["val_loss"] if st.history else None  # the final weights' own loss
                best = self.store.best()
                while best is not None:  # resume verifies only the newest checkpoint: the best may be corrupt
                    try:
                        weights, epoch, val_loss = self.store.load(best)["model"], best.epoch - 1, best.val_loss
                        break
                    except CheckpointError as exc:  # really corrupt (CheckpointUnreadable stops the run)
                        log.warning("best checkpoint unusable, taking the next best: %s", exc)
                        self.store.discard([best])
                        best = self.store.best()
                description = artifacts.model_description(
                    model.spec,
                    task=self.config.task,
                    input_stream=data.train.input_stream,
                    target_stream=data.train.target_stream,
                    rate_hz=data.shards.rate_hz,
                    epoch=epoch,
                    val_loss=val_loss,
                    config_hash=self.hash,
                    run_id=self.settings.global_.run_id,
                )
                artifacts.write_model(self.storage, weights, description)
                self.write_progress(model.spec, extra, curve=True)
                self._log("training finished", status=self.status, best_val_loss=st.best_val_loss,
                          epochs=st.epoch, steps=st.step)
            except BaseException as exc:  # re-raised below, after the peers know
                failure = exc
        self._fail_together(failure, "writing the model artifacts after training")
        self.metrics.success.set(1)
        return summary


class MetricsEndpoint:
    """`/metrics` of this rank on `metricsPort + LOCAL_RANK`, stopped when training ends."""

    def __init__(self, metrics: StageMetrics, config: TrainConfig, dist: DistContext):
        self.port = config.metrics_port + dist.local_rank if config.metrics_port else 0
        self._server: Any = None
        if not self.port:
            return
        from prometheus_client import start_http_server

        addr = os.environ.get(METRICS_ADDR_ENV) or "0.0.0.0"
        try:
            self._server, _ = start_http_server(self.port, addr=addr, registry=metrics.registry)
            log.debug("serving /metrics", extra={"port": self.port, "rank": dist.rank})
        except (OSError, OverflowError) as exc:  # metrics must never stop training (a port past 65535 overflows)
            log.warning("cannot serve /metrics on port %d: %s (training goes on)", self.port, exc)
            self.port = 0

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _leave_process_group(worker_id: int) -> None:
    """DataLoader worker start: a session of its own. The elastic agent (or a terminal's
    Ctrl-C) signals the rank's whole process group, and a loader worker dies of a stop
    signal not sent by its parent: the rank would fail on its next batch instead of
    checkpointing. A signal that reached the group before this is pending (the worker starts
    with the stop signals blocked) and is dropped. The parent still stops its workers as
    usual, and they exit when it dies."""
    os.setsid()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # discards a pending one
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # SIGINT stays ignored: only its parent stops a worker
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def metrics_shard(dist: DistContext, env: Mapping[str, str] | None = None) -> str:
    """The shard label of this rank's pushed series, the one the PodMonitor gives its
    scraped series (with local_rank beside it): the pod's completion index in an Indexed
    Job, ``<replica type>-<index>`` in a PyTorchJob (TRAJFLOW_METRICS_SHARD, set by the
    chart); outside a cluster the node rank."""
    env = os.environ if env is None else env
    for name in ("TRAJFLOW_METRICS_SHARD", "JOB_COMPLETION_INDEX", "GROUP_RANK"):
        if env.get(name):
            return env[name]
    return str(dist.rank // max(dist.local_world_size, 1))


def train(settings: StageSettings, dist: DistContext | None = None) -> dict[str, Any]:
    """Run training for this rank; returns the run summary (the same on every rank)."""
    config: TrainConfig = settings.config
    dist = dist or DistContext.from_env()
    trajflow_log.set_context(run=settings.global_.run_id, stage="train", rank=dist.rank)
    metrics = train_metrics()
    metrics.start_time.set(time.time())
    endpoint = MetricsEndpoint(metrics, config, dist)
    pusher = Pusher(settings.global_.metrics.pushgateway_url, metrics, run=settings.global_.run_id,
                    shard=metrics_shard(dist), labels={"local_rank": str(dist.local_rank)})
    success = interrupted = False
    trainer: Trainer | None = None
    try:
        dist.setup(config.device)
        if pusher.url:
            # training pushes at its end only: what this process's earlier attempt pushed
            # last would stand (an infinite loss alerting) until this one ends
            pusher.forget()
            # the groups of a run with more nodes or processes per node would stay on the
            # Pushgateway with their last values (a failed shard, an infinite loss)
            groups = dist.gather_objects(pusher.grouping)
            if dist.is_main:
                pusher.drop_groups_but(groups)
        storage = open_run_root(settings.global_)
        trainer = Trainer(settings, dist, storage, metrics)
        summary = trainer.run()
        success = True
        return summary
    except TrainingDiverged as exc:
        # first: once the peers have stopped, a launcher that loses them stops this worker too
        record_final_failure(exc)
        if trainer is not None and trainer.spec is not None and dist.is_main:
            trainer.status = "diverged"
            with contextlib.suppress(Exception):  # the divergence is the error to report
                trainer.write_progress(trainer.spec, curve=True)
        raise
    except KeyboardInterrupt:  # SIGTERM (Terminated, checkpointed) or Ctrl-C: resumed by a retry, not failed
        interrupted = True
        raise
    finally:
        pusher.stop(success, interrupted=interrupted)
        endpoint.close()
        try:
            dist.close()
        except Exception:
            if success:
                raise
            # after a failure the peers may be gone already: their closed connections must
            # not take the place of the error that stopped this rank
            log.debug("process group teardown after a failure", exc_info=True)


def same_data(saved: Any, current: np.ndarray | None) -> bool:
    """Whether a checkpoint's training-split moments (`local_moments`: the frame count
    first) are the current data's: the same number of frames, and sums equal to within
    rounding. The tolerance admits the same recordings resampled again by another kernel or
    summed in another order (another world size), not other recordings. Checkpoints written
    without moments pass."""
    if saved is None or current is None:
        return True
    saved = np.asarray(saved, dtype=np.float64)
    if saved.shape != current.shape or (saved.size and saved[0] != current[0]):
        return False
    scale = float(np.abs(current).max(initial=0.0))
    return bool(np.allclose(saved, current, rtol=1e-4, atol=1e-5 * scale))
