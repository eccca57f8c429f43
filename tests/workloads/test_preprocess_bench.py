"""Smoke test of the preprocessing benchmark in quick mode, and of the decode-only figure:
each format's library really decodes every file. No timing assertions."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("h5py")
pytest.importorskip("pyarrow")

from trajflow.bench import preprocess as bench  # noqa: E402


@pytest.mark.parametrize("fmt", ["lerobot", "robomimic", "npz"])
def test_decode_only_reads_every_value(fmt, tmp_path):
    files = bench._write_dataset(fmt, tmp_path / "scratch", episodes=7, seconds=1.0)
    decode, _ = bench._DECODE_ONLY[fmt]
    values = 0
    for rel, data in files.items():
        path = tmp_path / "raw" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        values += sum(a.size for a in decode(str(path)))
    # time, 14 state and 7 action values per frame of the generated episodes
    frames = sum(t.shape[0] for t, _ in bench._episodes(7, 1.0, seed=0))
    per_frame = 1 + sum(bench.DIMS.values()) + (2 if fmt == "lerobot" else 0)  # parquet: episode and frame index
    assert values == frames * per_frame


def test_quick_run_reports_every_format_against_its_bounds():
    result, summary = bench.run(quick=True)
    assert set(result["formats"]) == {"lerobot", "robomimic", "npz"}
    for fmt, r in result["formats"].items():
        assert r["raw_bytes"] > 0 and r["files"] >= 1
        run = r["runs"]["cpu-float32"]
        assert run["cold_seconds"] > 0 and run["cold_ratio_to_io_bound"] > 0 and run["shard_bytes"] > 0
        assert r["io_bound"]["cold_seconds"] > 0
        assert r["decode_only"]["cold_seconds"] > 0 and r["decode_only"]["cold_ratio_ceiling"] > 0
        assert f"| {fmt} |" in summary
    assert "ratio ceiling" in summary
