"""`trajflow demo-data`: deterministic, LeRobot-style, multi-rate, jittered, learnable."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trajflow.errors import ConfigError
from trajflow.local.demo_data import MARKER, DemoSpec, default_rates, generate

SMALL = DemoSpec(episodes=6, seed=3, rates_hz=(30.0, 120.0, 333.0), min_seconds=2.0, max_seconds=3.0)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load(root: Path) -> list[tuple[dict, pa.Table, Path]]:
    out = []
    for info_path in sorted(root.glob("*/meta/info.json")):
        info = json.loads(info_path.read_text())
        for path in sorted(info_path.parent.parent.glob("data/chunk-*/episode_*.parquet")):
            out.append((info, pq.read_table(path), path))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "source"
    generate(out, SMALL)
    return out


def test_same_seed_same_bytes_other_seed_other_data(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, SMALL)
    assert files(again) == files(dataset)
    other = tmp_path / "other"
    generate(other, DemoSpec(**{**SMALL.__dict__, "seed": 4}))
    assert files(other).keys() == files(dataset).keys()
    assert files(other) != files(dataset)


def test_lerobot_layout_and_schema(dataset: Path) -> None:
    robots = sorted(p.name for p in dataset.iterdir() if p.is_dir())
    assert robots == ["arm00-30hz", "arm01-120hz", "arm02-333hz"]
    episodes = load(dataset)
    assert len(episodes) == SMALL.episodes
    for info, table, path in episodes:
        assert table.schema.field("observation.state").type == pa.list_(pa.float32(), 6)
        assert table.schema.field("action").type == pa.list_(pa.float32(), 2)
        assert table.schema.field("timestamp").type == pa.float32()
        for column in ("frame_index", "episode_index", "index", "task_index"):
            assert table.schema.field(column).type == pa.int64()
        episode = int(path.stem.split("_")[1])
        assert set(table["episode_index"].to_pylist()) == {episode}
        assert table["frame_index"].to_pylist() == list(range(table.num_rows))
        assert path.parent.name == "chunk-000"
        assert info["features"]["observation.state"]["shape"] == [6]
        assert info["data_path"].format(episode_chunk=0, episode_index=episode) == str(path.relative_to(path.parents[2]))
    marker = json.loads((dataset / MARKER).read_text())
    assert sum(r["episodes"] for r in marker["robots"]) == SMALL.episodes
    for robot in marker["robots"]:
        info = json.loads((dataset / robot["robot"] / "meta" / "info.json").read_text())
        assert info["fps"] == robot["fps"] and info["total_frames"] == robot["frames"]


def test_timestamps_are_multi_rate_jittered_and_increasing(dataset: Path) -> None:
    for info, table, _ in load(dataset):
        t = table["timestamp"].to_numpy().astype(np.float64)
        period = 1.0 / info["fps"]
        steps = np.diff(t)
        assert t[0] >= 0 and (steps > 0).all()
        # jitter: intervals vary around the nominal period, some frames are lost
        assert steps.std() > 0.02 * period
        assert abs(np.median(steps) - period) < 0.1 * period
        assert steps.max() < 4 * period  # at worst two lost frames in a row
    rates = {info["fps"] for info, _, _ in load(dataset)}
    assert rates == {30.0, 120.0, 333.0}


def test_the_policy_is_learnable_from_the_observation(dataset: Path) -> None:
    """A model that is told nothing about the controller recovers the action from the state:
    a linear fit on the state and two generic gravity features explains most of it."""
    states, actions = [], []
    for _, table, _ in load(dataset):
        states.append(np.asarray(table["observation.state"].combine_chunks().flatten()).reshape(-1, 6))
        actions.append(np.asarray(table["action"].combine_chunks().flatten()).reshape(-1, 2))
    s, a = np.concatenate(states).astype(np.float64), np.concatenate(actions).astype(np.float64)
    assert a.std(axis=0).min() > 0.5  # the torques actually move
    features = np.c_[s, np.cos(s[:, 0]), np.cos(s[:, 0] + s[:, 1]), np.ones(len(s))]
    weights, *_ = np.linalg.lstsq(features, a, rcond=None)
    r2 = 1 - (a - features @ weights).var(axis=0) / a.var(axis=0)
    assert (r2 > 0.8).all(), r2
    # while the state without its target is not enough: the target carries information
    no_target = np.c_[s[:, :4], np.cos(s[:, 0]), np.cos(s[:, 0] + s[:, 1]), np.ones(len(s))]
    weights, *_ = np.linalg.lstsq(no_target, a, rcond=None)
    r2_blind = 1 - (a - no_target @ weights).var(axis=0) / a.var(axis=0)
    assert (r2_blind < r2 - 0.2).all(), (r2_blind, r2)


def test_rerun_is_a_no_op_and_new_parameters_replace_the_dataset(tmp_path: Path) -> None:
    out = tmp_path / "src"
    generate(out, SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    generate(out, SMALL)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == stamps
    fewer = DemoSpec(**{**SMALL.__dict__, "episodes": 2, "rates_hz": (50.0, 100.0)})
    generate(out, fewer)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["arm00-50hz", "arm01-100hz"]
    assert len(list(out.rglob("*.parquet"))) == 2


def test_refuses_a_foreign_directory_and_bad_parameters(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        generate(foreign, SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="500 Hz is outside 30..333 Hz"):
        generate(tmp_path / "a", DemoSpec(episodes=2, rates_hz=(500.0,)))
    with pytest.raises(ConfigError, match="at least one episode per robot"):
        generate(tmp_path / "b", DemoSpec(episodes=1, rates_hz=(30.0, 60.0)))
    with pytest.raises(ConfigError, match="at most 10000 episodes"):  # not a MemoryError hours later
        generate(tmp_path / "c", DemoSpec(episodes=10**9, rates_hz=(30.0,)))
    assert default_rates(4) == [30.0, 67.0, 149.0, 333.0]
    assert min(default_rates(7)) == 30.0 and max(default_rates(7)) == 333.0


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "trajflow.cli", "demo-data", "--out", str(out), "--episodes", "4", "--robots", "2",
         "--min-seconds", "1", "--max-seconds", "2", "--seed", "7"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.rglob("*.parquet"))) == 4
    assert json.loads((out / MARKER).read_text())["spec"]["seed"] == 7
    bad = subprocess.run([sys.executable, "-m", "trajflow.cli", "demo-data", "--out", str(out), "--rates", "10,20"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "10 Hz is outside" in bad.stderr
    both = subprocess.run([sys.executable, "-m", "trajflow.cli", "demo-data", "--out", str(out), "--rates", "30,60",
                           "--robots", "3"], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "--robots 3 and --rates: give one" in both.stderr  # not one silently ignored
    # a directory the OS refuses (root writes through file modes; a name too long is refused to all)
    unwritable = tmp_path / ("x" * 300)
    bad = subprocess.run([sys.executable, "-m", "trajflow.cli", "demo-data", "--out", str(unwritable), "--episodes", "1",
                          "--robots", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and f"--out {unwritable}: cannot write" in bad.stderr and "Traceback" not in bad.stderr


def test_an_interrupted_generation_is_redone(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped part way (Ctrl-C during `make demo`) leaves its in-progress marker;
    the next run removes what it wrote and produces the same bytes as a clean run."""
    from trajflow.local import demo_data

    out = tmp_path / "interrupted"
    calls = {"n": 0}
    real = demo_data.generate_robot

    def stop_after_one(*args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_data, "generate_robot", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        generate(out, SMALL)
    monkeypatch.undo()
    assert (out / demo_data.PARTIAL_MARKER).is_file() and not (out / MARKER).exists()
    # a half-written episode of the next robot, and a marker temporary
    partial_robot = out / "arm01-120hz" / "data" / "chunk-000"
    partial_robot.mkdir(parents=True)
    (partial_robot / ".episode_000003.parquet.tmp-1").write_bytes(b"half")
    (out / f".{MARKER}.tmp-1").write_bytes(b"{")
    generate(out, SMALL)
    assert files(out) == files(dataset)


def test_an_interrupted_replacement_is_redone(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.local import demo_data

    out = tmp_path / "replaced"
    generate(out, DemoSpec(episodes=2, seed=1, rates_hz=(60.0, 90.0), min_seconds=1.0, max_seconds=2.0))
    monkeypatch.setattr(demo_data, "generate_robot", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        generate(out, SMALL)
    monkeypatch.undo()
    generate(out, SMALL)
    assert files(out) == files(dataset)


def test_an_in_progress_marker_never_removes_other_files(tmp_path: Path) -> None:
    from trajflow.local import demo_data

    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "arm00-30hz").mkdir()
    (out / demo_data.PARTIAL_MARKER).write_text(json.dumps({"spec": {}, "robots": [{"robot": "../x"}, {"robot": "arm00-30hz"}]}))
    (tmp_path / "x").mkdir()
    generate(out, SMALL)
    assert (out / "notes.txt").read_text() == "keep me" and (tmp_path / "x").is_dir()
    assert not (out / demo_data.PARTIAL_MARKER).exists() and (out / MARKER).is_file()
