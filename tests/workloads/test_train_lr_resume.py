"""A run resumed on another world size continues the LR schedule at the same point of the
run, not at the checkpoint's step count (which would exhaust the new, shorter schedule)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trajflow.storage import LocalStorage, read_train_metrics
from trajflow.train import artifacts
from trajflow.train.checkpoint import CheckpointStore
from trajflow.train.loop import train
from trajflow.train.synthetic import local_settings, write_config_file, write_synthetic_shards

pytestmark = pytest.mark.slow

CONFIG = {"window": 8, "epochs": 4, "batch_size": 32, "learning_rate": 3e-3, "metrics_port": 0,
          "log_every_steps": 1000, "scale_lr_with_world_size": False,
          "model": {"type": "gru", "hidden_size": 16, "num_layers": 1}, "checkpoints": {"keep_last": 50}}


def test_resume_on_two_processes_follows_the_schedule_of_the_run(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    settings = local_settings(tmp_path, "run", **CONFIG)
    storage = LocalStorage(tmp_path / "run")
    write_synthetic_shards(storage, shards=2, episodes_per_shard=6, length=120)
    reference = [h["learning_rate"] for h in train(settings)["history"]]  # 1 process, uninterrupted
    assert reference[2] > 0
    # as if the 1-process run had stopped after 2 epochs
    store = CheckpointStore(storage, keep_last=50)
    store.discard([c for c in store.list() if c.epoch > 2])
    storage.delete(artifacts.MODEL_KEY)
    config_file = write_config_file(tmp_path / "run.yaml", settings)
    proc = subprocess.run([sys.executable, "-m", "trajflow.cli", "train", "--config", str(config_file),
                           "--nproc-per-node", "2"], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    resumed = [h["learning_rate"] for h in read_train_metrics(storage)["history"]]
    # the schedule is a function of the fraction of the run done: the same on any world size
    assert resumed[2:] == pytest.approx(reference[2:], rel=1e-6, abs=1e-12)
    # the 1-process checkpoint had no generator for rank 1: each rank got a stream of its own
    # again (the same stream on every rank would give every rank the same dropout)
    newest = store.load(store.list()[-1])
    assert newest["world_size"] == 2
    assert not torch.equal(newest["rng"][0]["torch"], newest["rng"][1]["torch"])


def test_a_resume_applies_the_configured_weight_decay(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    settings = local_settings(tmp_path, "run", **{**CONFIG, "epochs": 1})
    storage = LocalStorage(tmp_path / "run")
    write_synthetic_shards(storage, shards=1, episodes_per_shard=6, length=60)
    train(settings)
    train(local_settings(tmp_path, "run", **{**CONFIG, "epochs": 2, "weight_decay": 0.5}))
    store = CheckpointStore(storage, keep_last=50)
    groups = store.load(store.list()[-1])["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.5}
