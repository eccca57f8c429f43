"""`trajflow demo-data`: a synthetic multi-rate robot dataset in LeRobot-style parquet.

Each "robot" is a two-link planar arm in a vertical plane (gravity acts on it) driven by a
PD controller with gravity compensation toward piecewise-constant joint targets. Robots
differ in their recording rate (30 to 333 Hz), in timestamp jitter and dropped frames, and
slightly in their link masses; they all run the same control law, so a policy mapping
the observed state (joint angles, velocities and the current target) to the commanded
torque is learnable across robots — which is what behaviour cloning has to find.

Layout, one LeRobot v2-style dataset per robot:

    <out>/trajflow-demo.json                         what was generated (parameters, seed)
    <out>/<robot>/meta/info.json                     fps, features, totals
    <out>/<robot>/meta/episodes.jsonl, tasks.jsonl
    <out>/<robot>/data/chunk-000/episode_000123.parquet

Parquet columns: observation.state (fixed-size list<float32>[6]), action (fixed-size
list<float32>[2]), timestamp (float32 seconds from the episode start, jittered),
frame_index, episode_index, index, task_index (int64).

Everything is a function of the parameters and the seed: the same command writes the
same bytes (for a given pyarrow version).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trajflow.errors import ConfigError
from trajflow.files import replace_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "trajflow-demo.json"
# Written before anything else: a rerun that finds it knows an earlier run was interrupted
# and which robot directories that run was writing.
PARTIAL_MARKER = "trajflow-demo.partial.json"
CHUNK_SIZE = 1000  # episodes per chunk directory, as LeRobot does
MIN_RATE_HZ, MAX_RATE_HZ = 30.0, 333.0
SIM_DT = 1e-3  # integration step; every recording rate is far below 1 kHz

STATE_NAMES = ["shoulder.pos", "elbow.pos", "shoulder.vel", "elbow.vel", "shoulder.target", "elbow.target"]
ACTION_NAMES = ["shoulder.torque", "elbow.torque"]
TASK = "reach the commanded joint configuration"


@dataclass(frozen=True)
class ArmParams:
    """Point masses at the link ends; SI units."""

    l1: float = 0.5
    l2: float = 0.4
    m1: float = 1.2
    m2: float = 0.8
    gravity: float = 9.81
    friction: float = 0.05  # viscous, N·m·s/rad


@dataclass(frozen=True)
class Controller:
    """tau = clip(Kp (target - q) - Kd qd + G_nominal(q)); the same law on every robot."""

    kp: tuple[float, float] = (40.0, 20.0)
    kd: tuple[float, float] = (8.0, 3.0)
    torque_limit: tuple[float, float] = (25.0, 12.0)
    nominal: ArmParams = field(default_factory=ArmParams)


@dataclass(frozen=True)
class DemoSpec:
    episodes: int = 96
    seed: int = 0
    rates_hz: tuple[float, ...] = ()
    min_seconds: float = 6.0
    max_seconds: float = 12.0
    jitter: float = 0.08  # timestamp noise, std as a fraction of the sample period
    drop_probability: float = 0.01  # frames lost by the recorder

    def robot_rates(self) -> list[float]:
        return list(self.rates_hz)

    def identity(self) -> dict[str, Any]:
        """What decides the bytes written; a marker with the same identity means done."""
        return {"formatVersion": FORMAT_VERSION, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}}


def default_rates(robots: int) -> list[float]:
    """`robots` rates spread geometrically over 30..333 Hz, e.g. 4 -> 30, 69, 156, 333."""
    if robots < 1:
        raise ConfigError(f"--robots must be at least 1, got {robots}")
    if robots == 1:
        return [MAX_RATE_HZ]
    ratio = MAX_RATE_HZ / MIN_RATE_HZ
    return [float(round(MIN_RATE_HZ * ratio ** (i / (robots - 1)))) for i in range(robots)]


def robot_name(index: int, rate_hz: float) -> str:
    return f"arm{index:02d}-{rate_hz:g}hz".replace(".", "p")


# ---- physics --------------------------------------------------------------------------


def _gravity_torque(np: Any, q1: Any, q2: Any, p: ArmParams) -> tuple[Any, Any]:
    c1, c12 = np.cos(q1), np.cos(q1 + q2)
    g2 = p.m2 * p.gravity * p.l2 * c12
    return (p.m1 + p.m2) * p.gravity * p.l1 * c1 + g2, g2


def _control(np: Any, q1: Any, q2: Any, v1: Any, v2: Any, t1: Any, t2: Any, ctl: Controller) -> tuple[Any, Any]:
    g1, g2 = _gravity_torque(np, q1, q2, ctl.nominal)
    tau1 = ctl.kp[0] * (t1 - q1) - ctl.kd[0] * v1 + g1
    tau2 = ctl.kp[1] * (t2 - q2) - ctl.kd[1] * v2 + g2
    return (np.clip(tau1, -ctl.torque_limit[0], ctl.torque_limit[0]), np.clip(tau2, -ctl.torque_limit[1], ctl.torque_limit[1]))


def _accelerations(np: Any, q1: Any, q2: Any, v1: Any, v2: Any, tau1: Any, tau2: Any, p: ArmParams) -> tuple[Any, Any]:
    """Forward dynamics of the two-link arm: M(q) qdd = tau - C(q, qd) qd - G(q) - b qd."""
    cos2, sin2 = np.cos(q2), np.sin(q2)
    m11 = (p.m1 + p.m2) * p.l1**2 + p.m2 * p.l2**2 + 2 * p.m2 * p.l1 * p.l2 * cos2
    m12 = p.m2 * p.l2**2 + p.m2 * p.l1 * p.l2 * cos2
    m22 = p.m2 * p.l2**2
    h = p.m2 * p.l1 * p.l2 * sin2
    g1, g2 = _gravity_torque(np, q1, q2, p)
    r1 = tau1 + h * (2 * v1 * v2 + v2 * v2) - g1 - p.friction * v1
    r2 = tau2 - h * v1 * v1 - g2 - p.friction * v2
    det = m11 * m22 - m12 * m12
    return (m22 * r1 - m12 * r2) / det, (m11 * r2 - m12 * r1) / det


def simulate(np: Any, rng: Any, durations: Any, params: ArmParams, ctl: Controller) -> dict[str, Any]:
    """Integrate every episode of one robot together on a 1 kHz grid.

    Returns arrays [steps, episodes]: q1, q2, v1, v2 (true state), t1, t2 (targets in
    force at each step) and tau1, tau2 (commanded torque, held until the next step).
    """
    n_eps = len(durations)
    steps = int(math.ceil(float(durations.max()) / SIM_DT)) + 2
    grid = np.arange(steps) * SIM_DT
    # Piecewise-constant targets: a new reachable configuration every 1-2.5 s.
    targets = np.empty((2, steps, n_eps))
    for e in range(n_eps):
        switches = np.cumsum(rng.uniform(1.0, 2.5, size=int(durations[e] / 1.0) + 2))
        goals = np.stack([rng.uniform(-1.0, 1.0, len(switches) + 1), rng.uniform(-1.5, 1.5, len(switches) + 1)])
        segment = np.searchsorted(switches, grid, side="right")
        targets[:, :, e] = goals[:, segment]
    q1 = targets[0, 0] + rng.normal(0, 0.3, n_eps)
    q2 = targets[1, 0] + rng.normal(0, 0.3, n_eps)
    v1, v2 = np.zeros(n_eps), np.zeros(n_eps)
    out = {name: np.empty((steps, n_eps)) for name in ("q1", "q2", "v1", "v2", "tau1", "tau2")}
    for k in range(steps):
        tau1, tau2 = _control(np, q1, q2, v1, v2, targets[0, k], targets[1, k], ctl)
        out["q1"][k], out["q2"][k], out["v1"][k], out["v2"][k] = q1, q2, v1, v2
        out["tau1"][k], out["tau2"][k] = tau1, tau2
        a1, a2 = _accelerations(np, q1, q2, v1, v2, tau1, tau2, params)
        # semi-implicit Euler: stable for these stiff-ish gains at 1 kHz
        v1, v2 = v1 + SIM_DT * a1, v2 + SIM_DT * a2
        q1, q2 = q1 + SIM_DT * v1, q2 + SIM_DT * v2
    out["t1"], out["t2"] = targets[0], targets[1]
    return out


def record_times(np: Any, rng: Any, duration: float, rate_hz: float, jitter: float, drop_probability: float) -> Any:
    """Sample instants of one episode: nominal period plus bounded jitter, some frames lost.

    Strictly increasing by construction (jitter stays within ±0.35 of a period)."""
    period = 1.0 / rate_hz
    n = int(duration * rate_hz)
    noise = np.clip(rng.normal(0.0, jitter * period, n), -0.35 * period, 0.35 * period)
    noise[0] = abs(noise[0])  # episodes start at t >= 0
    times = np.arange(n) * period + noise
    keep = rng.random(n) >= drop_probability
    keep[0] = True
    times = times[keep]
    return times[times < duration]


# ---- writing --------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data)


def _episode_table(pa: Any, np: Any, state: Any, action: Any, times: Any, episode: int, first_index: int) -> Any:
    n = len(times)
    state_type = pa.list_(pa.float32(), len(STATE_NAMES))
    action_type = pa.list_(pa.float32(), len(ACTION_NAMES))
    columns = {
        "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.astype(np.float32).ravel()), type=state_type),
        "action": pa.FixedSizeListArray.from_arrays(pa.array(action.astype(np.float32).ravel()), type=action_type),
        "timestamp": pa.array(times.astype(np.float32)),
        "frame_index": pa.array(np.arange(n, dtype=np.int64)),
        "episode_index": pa.array(np.full(n, episode, dtype=np.int64)),
        "index": pa.array(np.arange(first_index, first_index + n, dtype=np.int64)),
        "task_index": pa.array(np.zeros(n, dtype=np.int64)),
    }
    return pa.table(columns)


def _info(robot: str, rate_hz: float, episodes: int, frames: int, spec: DemoSpec, params: ArmParams) -> dict[str, Any]:
    def vector(names: list[str]) -> dict[str, Any]:
        return {"dtype": "float32", "shape": [len(names)], "names": names}

    return {
        "codebase_version": "v2.1",
        "robot_type": "planar_2link_arm",
        "total_episodes": episodes,
        "total_frames": frames,
        "total_tasks": 1,
        "total_chunks": max(1, math.ceil(episodes / CHUNK_SIZE)),
        "chunks_size": CHUNK_SIZE,
        "fps": rate_hz,
        "splits": {"train": f"0:{episodes}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "features": {
            "observation.state": vector(STATE_NAMES),
            "action": vector(ACTION_NAMES),
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
        "trajflow": {
            "robot": robot,
            "timestamp_jitter_fraction": spec.jitter,
            "drop_probability": spec.drop_probability,
            "link_masses": [params.m1, params.m2],
        },
    }


def generate_robot(out: Path, robot_index: int, rate_hz: float, episodes: int, seed_seq: Any, spec: DemoSpec) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed_seq)
    name = robot_name(robot_index, rate_hz)
    base = ArmParams()
    # Each arm is built a little differently; the controller only knows the nominal model.
    params = ArmParams(m1=round(base.m1 * rng.uniform(0.92, 1.08), 4), m2=round(base.m2 * rng.uniform(0.92, 1.08), 4))
    durations = rng.uniform(spec.min_seconds, spec.max_seconds, episodes)
    sim = simulate(np, rng, durations, params, Controller())
    root = out / name
    frames_total = 0
    episode_lines = []
    for e in range(episodes):
        times = record_times(np, rng, float(durations[e]), rate_hz, spec.jitter, spec.drop_probability)
        pos = times / SIM_DT
        i = np.floor(pos).astype(np.int64)
        w = pos - i

        def at(key: str) -> Any:
            series = sim[key][:, e]
            return series[i] * (1 - w) + series[i + 1] * w

        state = np.stack([at("q1"), at("q2"), at("v1"), at("v2"), sim["t1"][i, e], sim["t2"][i, e]], axis=1)
        # encoders are not perfect
        state[:, :2] += rng.normal(0, 1e-3, (len(times), 2))
        state[:, 2:4] += rng.normal(0, 5e-3, (len(times), 2))
        action = np.stack([at("tau1"), at("tau2")], axis=1)
        table = _episode_table(pa, np, state, action, times, e, frames_total)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        path = root / "data" / f"chunk-{e // CHUNK_SIZE:03d}" / f"episode_{e:06d}.parquet"
        _atomic_write_bytes(path, sink.getvalue().to_pybytes())
        frames_total += len(times)
        episode_lines.append(json.dumps({"episode_index": e, "tasks": [TASK], "length": len(times)}))
    meta = root / "meta"
    _atomic_write_bytes(meta / "tasks.jsonl", (json.dumps({"task_index": 0, "task": TASK}) + "\n").encode())
    _atomic_write_bytes(meta / "episodes.jsonl", ("\n".join(episode_lines) + "\n").encode() if episode_lines else b"")
    info = _info(name, rate_hz, episodes, frames_total, spec, params)
    _atomic_write_bytes(meta / "info.json", (json.dumps(info, indent=2) + "\n").encode())
    return {"robot": name, "fps": rate_hz, "episodes": episodes, "frames": frames_total}


def _read_marker(out: Path, name: str = MARKER) -> dict[str, Any] | None:
    try:
        doc = json.loads((out / name).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{out / name}: unreadable demo marker ({exc}); remove {out} and run again") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{out / name}: unreadable demo marker (not a JSON object); remove {out} and run again")
    return doc


def _robot_dirs(*markers: dict[str, Any] | None) -> list[str]:
    """The robot directory names the markers list (only plain names: never a path)."""
    names: list[str] = []
    for marker in markers:
        for robot in (marker or {}).get("robots", []) or []:
            name = str(robot.get("robot", "")) if isinstance(robot, dict) else ""
            if name and "/" not in name and "\\" not in name and name not in (".", "..") and name not in names:
                names.append(name)
    return names


def _write_partial(out: Path, spec: DemoSpec, names: list[str]) -> None:
    doc = {"spec": spec.identity(), "state": "in-progress", "robots": [{"robot": n} for n in names]}
    _atomic_write_bytes(out / PARTIAL_MARKER, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def _remove_demo(out: Path, names: list[str]) -> None:
    """Remove what a demo-data run wrote: its robot directories and marker temporaries.
    The markers themselves are removed by the caller, the in-progress one last."""
    for name in names:
        shutil.rmtree(out / name, ignore_errors=True)
    for tmp in out.glob(".trajflow-demo*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _prepare_out_dir(out: Path, spec: DemoSpec, planned: list[str]) -> dict[str, Any] | None:
    """Return the existing marker when this exact dataset is already there; otherwise make
    `out` ready for writing, removing only what an earlier demo-data run wrote (a
    directory holding neither marker is never touched)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    marker = _read_marker(out)
    partial = _read_marker(out, PARTIAL_MARKER)
    if partial is not None:
        if marker is not None and marker.get("spec") == partial.get("spec"):
            # finished, stopped just before removing the in-progress marker
            (out / PARTIAL_MARKER).unlink(missing_ok=True)
        else:
            log.info("%s holds a demo dataset an interrupted run left unfinished; removing it and starting over", out)
            _remove_demo(out, _robot_dirs(partial, marker))
            if marker is not None:
                (out / MARKER).unlink(missing_ok=True)
            (out / PARTIAL_MARKER).unlink(missing_ok=True)  # last: until here a rerun redoes this cleanup
            return None
    if marker is None:
        if any(out.iterdir()):
            raise ConfigError(
                f"--out {out}: directory is not empty and holds no {MARKER}; refusing to write a demo dataset "
                "into it (choose an empty or new directory)"
            )
        return None
    if marker.get("spec") == spec.identity():
        return marker
    log.info("replacing the demo dataset in %s (generated with other parameters)", out)
    # the in-progress marker first, naming the old robots too: an interrupted replacement
    # is cleaned up by the next run
    _write_partial(out, spec, _robot_dirs(marker, {"robots": [{"robot": n} for n in planned]}))
    (out / MARKER).unlink()
    _remove_demo(out, _robot_dirs(marker))
    return None


MAX_EPISODES = 10000


def generate(out: str | Path, spec: DemoSpec) -> dict[str, Any]:
    """Write the dataset (or find it already written); returns the marker document."""
    import numpy as np

    rates = spec.robot_rates()
    if not rates:
        raise ConfigError("no robots: give --robots N or --rates")
    for rate in rates:
        if not MIN_RATE_HZ <= rate <= MAX_RATE_HZ:
            raise ConfigError(f"--rates: {rate:g} Hz is outside {MIN_RATE_HZ:g}..{MAX_RATE_HZ:g} Hz")
    if spec.episodes < len(rates):
        raise ConfigError(f"--episodes {spec.episodes}: need at least one episode per robot ({len(rates)} robots)")
    if spec.episodes > MAX_EPISODES:
        # a robot's episodes are simulated together, in memory
        raise ConfigError(f"--episodes {spec.episodes}: a demo dataset has at most {MAX_EPISODES} episodes")
    if not 0 < spec.min_seconds <= spec.max_seconds:
        raise ConfigError(f"episode length range {spec.min_seconds:g}..{spec.max_seconds:g} s is empty or not positive")
    if spec.max_seconds > 600:
        raise ConfigError(f"--max-seconds {spec.max_seconds:g}: episodes longer than 10 minutes are not supported")
    out = Path(out)
    planned = [robot_name(r, rate) for r, rate in enumerate(rates)]
    existing = _prepare_out_dir(out, spec, planned)
    if existing is not None:
        log.info("demo dataset already in %s (%d episodes, seed %d); nothing to do", out, spec.episodes, spec.seed)
        return existing
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    _write_partial(out, spec, planned)
    seeds = np.random.SeedSequence(spec.seed).spawn(len(rates))
    robots = []
    for r, rate in enumerate(rates):
        count = spec.episodes // len(rates) + (1 if r < spec.episodes % len(rates) else 0)
        summary = generate_robot(out, r, rate, count, seeds[r], spec)
        log.info("wrote %s: %d episodes, %d frames at %g Hz", summary["robot"], count, summary["frames"], rate)
        robots.append(summary)
    marker = {"spec": spec.identity(), "robots": robots}
    # Written last: its presence means the whole dataset is in place.
    _atomic_write_bytes(out / MARKER, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
    (out / PARTIAL_MARKER).unlink(missing_ok=True)
    size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    log.info(
        "demo dataset ready in %s: %d robots, %d episodes, %d frames, %.1f MiB in %.1fs",
        out, len(robots), spec.episodes, sum(r["frames"] for r in robots), size / 2**20, time.monotonic() - started,
    )
    return marker


def _rates(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates in Hz, e.g. 30,100,333; got {text!r}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=".trajflow/demo-source", help="dataset directory (default .trajflow/demo-source)")
    parser.add_argument("--episodes", type=int, default=96, help="episodes over all robots (default 96, at most 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument("--robots", type=int, default=None, help="robots, rates spread over 30..333 Hz (default 4)")
    parser.add_argument("--rates", type=_rates, default=None, metavar="HZ,HZ,...",
                        help="explicit recording rates, one robot each (instead of --robots)")
    parser.add_argument("--min-seconds", type=float, default=6.0, help="shortest episode (default 6)")
    parser.add_argument("--max-seconds", type=float, default=12.0, help="longest episode (default 12)")


def run(args: argparse.Namespace) -> int:
    if args.rates and args.robots is not None:
        raise ConfigError(f"--robots {args.robots} and --rates: give one (--rates names one robot per rate)")
    rates = args.rates if args.rates else default_rates(4 if args.robots is None else args.robots)
    spec = DemoSpec(
        episodes=args.episodes,
        seed=args.seed,
        rates_hz=tuple(float(r) for r in rates),
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
    )
    try:
        generate(args.out, spec)
    except OSError as exc:
        raise ConfigError(f"--out {args.out}: cannot write {exc.filename or args.out}: {exc.strerror or exc}") from None
    return 0
