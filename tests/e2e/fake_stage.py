"""A stand-in for `trajflow download|preprocess|train` that keeps the stage contract
(config file, shard env, manifests written last, JSON logs, exit codes) but does no real
work, so the runner's scheduling, skipping, retries and signal handling can be tested
in seconds. Behaviour is steered by environment variables:

    FAKE_SECONDS=0.3              time each shard "works"
    FAKE_SECONDS_preprocess_2=3   ... or this one shard
    FAKE_AFTER_download_2=preprocess:0  this shard works on until that stage:shard has started (60 s at most)
    FAKE_FAIL=preprocess:1:3      stage:shard:exit code (stage may be *)
    FAKE_FAIL_TIMES=1             fail only the first N attempts (counted in FAKE_STATE_DIR)
    FAKE_STATE_DIR=DIR            where attempts and starts are recorded (required)
    FAKE_IGNORE_SIGINT=1          ignore SIGINT, as a program that swallows KeyboardInterrupt does
    FAKE_RECEIVED=0               bytes a download shard says it received (default: its item's size)
    FAKE_KILL=download:0          stage:shard that dies of SIGKILL (as an OOM kill)
    FAKE_NO_MANIFEST=download:0   stage:shard that exits 0 without writing its manifest
    FAKE_ALREADY_FINISHED=1       training logs that it resumed its final checkpoint, as trajflow train does

A preprocess shard records its config's output settings and, as the real stage does, keeps a
done shard made with other settings, saying how they differ.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from trajflow import log as tlog
from trajflow.config import load_config_file
from trajflow.storage import open_run_root, read_manifest, write_manifest

STAGE_NAMES = {"download": "downloader", "preprocess": "preprocessing", "train": "training"}


def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_IGNORE_SIGINT") == "1":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    tlog.setup()
    logger = logging.getLogger("fake")
    command = argv[0]
    config_path = argv[argv.index("--config") + 1]
    if Path(config_path).resolve() != Path(os.environ["TRAJFLOW_CONFIG"]).resolve():
        logger.error("TRAJFLOW_CONFIG and --config disagree")
        return 2
    glob, config = load_config_file(config_path, STAGE_NAMES[command])
    shard = int(os.environ.get("RANK", os.environ["JOB_COMPLETION_INDEX"])) if command == "train" else int(os.environ["JOB_COMPLETION_INDEX"])
    shards = int(os.environ["TRAJFLOW_SHARDS"])
    state = Path(os.environ["FAKE_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    with (state / "starts.jsonl").open("a") as fh:
        fh.write(json.dumps({"stage": command, "shard": shard, "shards": shards, "t": time.time(), "pid": os.getpid()}) + "\n")
    attempts_file = state / f"attempts-{command}-{shard}"
    attempts = int(attempts_file.read_text()) + 1 if attempts_file.exists() else 1
    attempts_file.write_text(str(attempts))
    logger.info("%s shard %d of %d started", command, shard, shards, extra={"attempt": attempts})
    history = []
    if command == "train" and shard == 0:  # what a training logs while it runs, before it can fail
        if os.environ.get("FAKE_ALREADY_FINISHED") == "1":
            msg = "training had already finished at epoch 3 of 3 (checkpoint train/checkpoints/ckpt-0000000009.pt, step 9)"
            logger.warning(msg, extra={"already_finished": msg, "epoch": 2, "epochs": 3})
        logger.info("initial validation loss", extra={"initial_val_loss": 1.5})
        for epoch in range(3):
            row = {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_loss": 1.2 / (epoch + 1)}
            history.append(row)
            logger.info("epoch done", extra=row)
    time.sleep(float(os.environ.get(f"FAKE_SECONDS_{command}_{shard}", os.environ.get("FAKE_SECONDS", "0.3"))))
    after = os.environ.get(f"FAKE_AFTER_{command}_{shard}")
    if after:
        other_stage, other_shard = after.split(":")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                (s["stage"], s["shard"]) == (other_stage, int(other_shard))
                for s in map(json.loads, (state / "starts.jsonl").read_text().splitlines())):
            time.sleep(0.05)
    fail = os.environ.get("FAKE_FAIL", "")
    if fail:
        stage, fail_shard, code = fail.split(":")
        if stage in (command, "*") and int(fail_shard) == shard and attempts <= int(os.environ.get("FAKE_FAIL_TIMES", "1000")):
            logger.error("failing on purpose with exit code %s", code)
            return int(code)
    if os.environ.get("FAKE_KILL") == f"{command}:{shard}":
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("FAKE_NO_MANIFEST") == f"{command}:{shard}":
        return 0
    storage = open_run_root(glob)
    if command == "train":
        if shard == 0:
            # the shape of trajflow.train.artifacts' metrics.json
            doc = {"status": "completed", "initial_val_loss": 1.5, "final_val_loss": 0.4, "history": history}
            storage.write_bytes("train/artifacts/metrics.json", json.dumps(doc).encode())
        return 0
    stage_key = {"download": "download", "preprocess": "preprocess"}[command]
    existing = read_manifest(storage, stage_key, shard)
    already_done = existing is not None
    recorded = {}
    if command == "preprocess":
        recorded["settings"] = config.output_settings(())
        if existing is not None:
            from trajflow.preprocess.stage import stale_settings

            stale = stale_settings(existing, config)
            if stale:
                logger.info("preprocess shard %d kept", shard, extra={"summary": {"skipped": True, "stale": stale}})
                return 0
    storage.write_bytes(f"{'raw' if command == 'download' else 'resampled'}/{shard:05d}/item.bin", b"x" * (100 + shard))
    write_manifest(storage, stage_key, shard, shards, [{"key": f"item-{shard}", "size": 100 + shard}], trajectories=2,
                   num_frames=10, **recorded)
    # the downloader's final line carries its summary: what it received (nothing when every item was in place)
    # (preprocessing's, whether it found the shard done)
    summary = ({"bytes_received": int(os.environ.get("FAKE_RECEIVED", 100 + shard))} if command == "download"
               else {"skipped": already_done})
    logger.info("%s shard %d done", command, shard, extra={"summary": summary})
    with (state / "ends.jsonl").open("a") as fh:
        fh.write(json.dumps({"stage": command, "shard": shard, "t": time.time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
