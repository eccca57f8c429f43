"""file:// sources: the tree as a user reads it (symlinked directories included), and a
file rewritten in place is copied again once a new plan lists it."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from test_download_http import make_config, raw_files, run


def _file_source(path: Path, **overrides: object):
    return make_config([{"type": "file", "name": "ds", "path": str(path)}], **overrides)


def test_symlinked_directories_are_followed_and_loops_are_not(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "ep0.bin").write_bytes(b"zero")
    (elsewhere / "ep1.bin").write_bytes(b"one")
    src = tmp_path / "src"
    src.mkdir()
    (src / "meta.json").write_bytes(b"{}")
    (src / "episodes").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(src, target_is_directory=True)  # back into the tree: a loop
    (src / "gone.bin").symlink_to(tmp_path / "missing.bin")

    with caplog.at_level(logging.WARNING, logger="trajflow.download.sources"):
        summary = run(tmp_path / "root", _file_source(src))

    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path / "root") == {"ds/meta.json": b"{}", "ds/episodes/ep0.bin": b"zero",
                                            "ds/episodes/ep1.bin": b"one"}
    assert "episodes/up: it links back to a directory that contains it" in caplog.text
    assert "gone.bin: it does not exist" in caplog.text


def test_a_file_rewritten_with_the_same_size_is_copied_again_under_a_new_plan(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    episode = src / "episode.npy"
    episode.write_bytes(b"A" * 4096)
    os.utime(episode, ns=(10**18, 10**18))
    assert run(tmp_path / "root", _file_source(src)).exit_code == 0

    episode.write_bytes(b"B" * 4096)  # regenerated in place: same size, new mtime
    summary = run(tmp_path / "root", _file_source(src, planGeneration="2"))

    assert summary.exit_code == 0 and summary.count("fetched") == 1
    assert raw_files(tmp_path / "root") == {"ds/episode.npy": b"B" * 4096}
