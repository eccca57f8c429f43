"""Learnable synthetic shards for tests and benchmarks: controlled damped oscillators.

Each episode is `joints` damped oscillators (state: positions then velocities) driven by
a PD controller plus a smooth random disturbance. The action is the controller output,
a fixed function of the last few observations, so behaviour cloning can drive the loss
close to zero; the disturbance is small, so next-step forecasting is learnable too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trajflow.config import GlobalConfig, StageSettings, TrainConfig
from trajflow.preprocess.shards import Episode, shard_key, write_shard
from trajflow.storage import Storage, shard_name, write_manifest


@dataclass(frozen=True)
class System:
    joints: int = 3
    rate_hz: float = 50.0
    kp: float = 4.0
    kd: float = 1.5
    lag: int = 3  # the controller's velocity estimate spans this many steps
    disturbance: float = 0.3

    @property
    def dt(self) -> float:
        return 1.0 / self.rate_hz


def simulate(system: System, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One episode: `observation.state` [length, 2*joints] and `action` [length, joints]."""
    j, dt = system.joints, system.dt
    omega = np.linspace(2.0, 5.0, j)
    zeta = 0.05
    pos = rng.normal(0.0, 1.0, j)
    vel = rng.normal(0.0, 1.0, j)
    drift = np.zeros(j)
    states = np.empty((length, 2 * j))
    actions = np.empty((length, j))
    for t in range(length):
        states[t, :j], states[t, j:] = pos, vel
        past = states[max(t - system.lag, 0), :j]
        velocity_estimate = (pos - past) / (dt * max(min(t, system.lag), 1))
        action = -system.kp * pos - system.kd * velocity_estimate
        actions[t] = action
        drift = 0.98 * drift + system.disturbance * rng.normal(0.0, 1.0, j) * np.sqrt(dt)
        accel = -(omega**2) * pos - 2 * zeta * omega * vel + action + drift * omega
        vel = vel + dt * accel
        pos = pos + dt * vel
    return {"observation.state": states, "action": actions}


def write_synthetic_shards(storage: Storage, shards: int = 2, episodes_per_shard: int = 8, length: int = 200,
                           seed: int = 0, dtype: str = "float32", system: System | None = None) -> list[str]:
    """Write done shards (file + manifest) under `<root>/resampled/`; returns their keys."""
    system = system or System()
    keys = []
    for shard in range(shards):
        rng = np.random.default_rng([seed, shard])
        episodes = []
        for e in range(episodes_per_shard):
            # a spread of lengths, as real recordings have
            n = int(length * rng.uniform(0.75, 1.25))
            episodes.append(Episode(data=simulate(system, n, rng), source=f"raw/{shard_name(shard)}/synthetic.npz",
                                    episode=str(e), robot="oscillator", original_rate_hz=system.rate_hz,
                                    raw_length=n))
        written = write_shard(storage, shard_key(shard), episodes, dtype=dtype, rate_hz=system.rate_hz)
        write_manifest(storage, "preprocess", shard, shards, [written.item()],
                       num_episodes=len(episodes), num_frames=written.index["num_frames"])
        keys.append(written.key)
    return keys


def local_settings(path: str | Path, run_id: str = "test", **config: Any) -> StageSettings:
    """Training settings for a run root under a local directory (`config` in snake_case or camelCase)."""
    glob = GlobalConfig.model_validate(
        {"runId": run_id, "storage": {"type": "filesystem", "filesystem": {"path": str(path)}}}
    )
    return StageSettings(glob, TrainConfig.model_validate(config), 0, 1)


def write_config_file(path: str | Path, settings: StageSettings) -> Path:
    """The `{global, config}` file the chart mounts at /etc/trajflow/config.yaml."""
    import yaml

    doc = {
        "global": settings.global_.model_dump(mode="json", by_alias=True),
        "config": settings.config.model_dump(mode="json", by_alias=True),
    }
    path = Path(path)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
