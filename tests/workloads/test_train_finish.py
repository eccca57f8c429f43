"""finish(): rank 0 writes the model after the last training collective; a failure there
must fail every rank together (a final all-reduce), so the group is restarted and the
resumed run writes the model, instead of the peers exiting 0 and leaving rank 0 alone."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from trajflow.storage import LocalStorage, read_train_metrics
from trajflow.train import artifacts
from trajflow.train.synthetic import local_settings, write_config_file, write_synthetic_shards

pytestmark = pytest.mark.slow

CONFIG = {
    "window": 8,
    "epochs": 2,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "metrics_port": 0,
    "model": {"type": "gru", "hidden_size": 16, "num_layers": 1},
}

# Rank 0's first write of the model fails (an S3 throttle, a full volume) after every rank
# has passed the last training collective.
SITECUSTOMIZE = '''
import os
flag = os.environ.get("TEST_FAIL_WRITE_MODEL_ONCE")
if flag and os.environ.get("RANK") == "0" and not os.path.exists(flag):
    import trajflow.train.artifacts as _a
    from trajflow.errors import TransientError
    def _boom(*args, **kwargs):
        open(flag, "w").close()
        raise TransientError("injected: write of model.safetensors failed")
    _a.write_model = _boom
'''


def test_rank0_failure_writing_the_model_fails_all_ranks_and_the_restart_writes_it(tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = tmp_path / "failed-once"
    settings = local_settings(tmp_path, "finish", **CONFIG)
    root = tmp_path / "finish"
    storage = LocalStorage(root)
    write_synthetic_shards(storage, shards=2, episodes_per_shard=4, length=80)
    config_file = write_config_file(tmp_path / "finish.yaml", settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEST_FAIL_WRITE_MODEL_ONCE": str(flag),
           "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "trajflow.cli", "train", "--config", str(config_file),
         "--nproc-per-node", "2", "--max-restarts", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    log = proc.stdout
    assert flag.exists(), log[-4000:]  # the injected failure happened
    assert "rank 0 failed writing the model artifacts" in log, log[-4000:]  # rank 1 failed with it
    assert proc.returncode == 0, log[-4000:]
    assert storage.exists(artifacts.MODEL_KEY)
    assert read_train_metrics(storage)["restarts"] == 1
