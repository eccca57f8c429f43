"""file:// sources: the tree as a user reads it (symlinked directories included); a file
changed since planning, or while being copied, is never stored, and is copied again once a
new plan lists it."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from test_download_http import make_config, raw_files, run

from trajflow.errors import ConfigError, ExitCode, TransientError


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
    (src / "l1").symlink_to(src / "l2")  # links to each other: ELOOP
    (src / "l2").symlink_to(src / "l1")

    with caplog.at_level(logging.WARNING, logger="trajflow.download.sources"):
        summary = run(tmp_path / "root", _file_source(src))

    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path / "root") == {"ds/meta.json": b"{}", "ds/episodes/ep0.bin": b"zero",
                                            "ds/episodes/ep1.bin": b"one"}
    assert "episodes/up: it links back to a directory that contains it" in caplog.text
    assert "gone.bin: it does not exist" in caplog.text
    assert "l1: a loop of symbolic links" in caplog.text and "l2: a loop of symbolic links" in caplog.text


def test_filters_apply_to_a_path_naming_one_file_as_to_a_directory(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "solo.bin").write_bytes(b"solo")
    with caplog.at_level(logging.WARNING, logger="trajflow.download.sources"):
        for path, filters in [(tmp_path / "src" / "solo.bin", {"exclude": ["*.bin"]}),
                              (tmp_path / "src", {"include": ["*.parquet"]})]:
            source = {"type": "file", "name": "ds", "path": str(path), **filters}
            with pytest.raises(ConfigError, match="the sources list no items"):
                run(tmp_path / "root", make_config([source]))
    assert f"{tmp_path}/src/solo.bin does not match include=['**'] exclude=['*.bin']" in caplog.text
    assert f"nothing under {tmp_path}/src matches include=['*.parquet']" in caplog.text


def test_a_source_path_that_is_a_loop_of_links_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match=f"source 'ds': cannot resolve {tmp_path}/a: "):
        run(tmp_path / "root", _file_source(tmp_path / "a"))


@pytest.mark.parametrize("uri_tail", ["dir#1", "dir?x", "dir#"])
def test_a_file_uri_with_a_fragment_or_query_is_refused_not_cut(tmp_path: Path, uri_tail: str) -> None:
    """Cut at '#' or '?', the URI would name `dir`, another directory: it is refused."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "wrong.bin").write_bytes(b"not asked for")
    literal = tmp_path / uri_tail
    literal.mkdir()
    (literal / "x.bin").write_bytes(b"x")
    source = {"type": "file", "name": "ds", "path": f"file://{literal}"}
    with pytest.raises(ConfigError, match=r"'\?' and '#' start a query or a fragment: percent-encode them"):
        run(tmp_path / "root", make_config([source]))
    encoded = {**source, "path": f"file://{tmp_path}/{uri_tail.replace('#', '%23').replace('?', '%3F')}"}
    assert run(tmp_path / "root", make_config([encoded])).exit_code == 0
    assert raw_files(tmp_path / "root") == {"ds/x.bin": b"x"}


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


def test_a_stored_file_modified_since_its_verification_is_hashed_again(tmp_path: Path) -> None:
    """A shard fetched again (its manifest gone) trusts a stored file's record without hashing
    it, unless the file was modified since: one changed in place (same size) is fetched
    again, one only touched is kept."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.npy").write_bytes(b"A" * 4096)
    (src / "b.npy").write_bytes(b"B" * 4096)
    root = tmp_path / "root"
    assert run(root, _file_source(src)).exit_code == 0
    stored = {p.name: p for p in (root / "raw").rglob("*.npy")}
    stored["a.npy"].write_bytes(b"X" * 4096)  # bit rot, or a tool writing where it should not
    for path in stored.values():
        os.utime(path, ns=(10**18, 10**18))
    done = root / "raw" / "_done" / "00000.json"
    done.unlink()

    summary = run(root, _file_source(src))

    assert summary.exit_code == 0 and summary.count("fetched") == 1 and summary.count("adopted") == 1
    assert raw_files(root) == {"ds/a.npy": b"A" * 4096, "ds/b.npy": b"B" * 4096}
    done.unlink()
    again = run(root, _file_source(src))  # both records now note the files' times: nothing is hashed
    assert again.count("skipped") == 2


def test_a_re_shard_moves_a_touched_file_and_fetches_a_changed_one_again(tmp_path: Path) -> None:
    """A stored file modified since its record (a copy without times, a tool writing into the
    run root) is hashed again before a re-shard moves it: touched, it is moved; changed, it is
    removed and fetched again, so each item stays in one shard directory."""
    from trajflow.download.shard import ShardDownloader
    from trajflow.storage import LocalStorage

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"ep{i}.npy").write_bytes(bytes([65 + i]) * 4096 * (i + 1))
    root = tmp_path / "root"
    config = _file_source(src)
    for shard in (0, 1):
        assert ShardDownloader(LocalStorage(root), config, shard, 2).run().exit_code == 0
    moving = sorted((root / "raw" / "00001").rglob("*.npy"))
    assert len(moving) >= 2
    moving[0].write_bytes(b"X" * moving[0].stat().st_size)
    for path in moving:
        os.utime(path, ns=(10**18, 10**18))

    summary = ShardDownloader(LocalStorage(root), config, 0, 1).run()

    assert summary.exit_code == 0
    outcomes = {r.item.key: r.outcome for r in summary.results}
    assert outcomes.pop(f"ds/{moving[0].name}") == "fetched"
    assert all(outcomes[f"ds/{p.name}"] == "reused" for p in moving[1:])
    assert not list((root / "raw" / "00001").rglob("*.npy"))
    assert raw_files(root) == {f"ds/ep{i}.npy": bytes([65 + i]) * 4096 * (i + 1) for i in range(6)}


def test_a_record_from_before_modification_times_notes_one_on_its_next_skip(tmp_path: Path) -> None:
    import json

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.npy").write_bytes(b"A" * 4096)
    root = tmp_path / "root"
    assert run(root, _file_source(src)).exit_code == 0
    [record] = (root / "raw" / ".trajflow-verified").rglob("*.json")
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({k: v for k, v in doc.items() if k != "modified_ns"}))  # an older version's
    done = root / "raw" / "_done" / "00000.json"
    done.unlink()
    assert run(root, _file_source(src)).count("skipped") == 1
    [stored] = (root / "raw").rglob("a.npy")
    assert json.loads(record.read_text())["modified_ns"] == stored.stat().st_mtime_ns
    stored.write_bytes(b"X" * 4096)
    os.utime(stored, ns=(10**18, 10**18))
    done.unlink()
    assert run(root, _file_source(src)).count("fetched") == 1
    assert raw_files(root) == {"ds/a.npy": b"A" * 4096}


def test_a_file_rewritten_while_being_copied_is_never_stored_spliced(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.download import sources

    src = tmp_path / "src"
    src.mkdir()
    episode = src / "episode.npy"
    episode.write_bytes(b"A" * (3 << 20))
    os.utime(episode, ns=(10**18, 10**18))
    real_read = sources._FileSlice.read

    def read_then_rewrite(self, n):  # a writer rewrites the file in place after the first read
        data = real_read(self, min(n, 1 << 20))
        if data[:1] == b"A" and episode.read_bytes()[:1] == b"A":
            with open(episode, "r+b") as fh:
                fh.write(b"B" * (3 << 20))
        return data

    monkeypatch.setattr(sources._FileSlice, "read", read_then_rewrite)
    summary = run(tmp_path / "root", _file_source(src))

    # not the version planned any more, which no retry changes: nothing is stored, and a new
    # plan copies the new one
    assert summary.exit_code == ExitCode.PERMANENT
    assert summary.failed[0].reason == "changed" and "episode.npy: modified while being copied" in summary.failed[0].error
    assert "planGeneration" in summary.failed[0].error
    assert raw_files(tmp_path / "root") == {}
    monkeypatch.setattr(sources._FileSlice, "read", real_read)
    rerun = run(tmp_path / "root", _file_source(src, planGeneration="2"))
    assert rerun.exit_code == 0
    assert raw_files(tmp_path / "root") == {"ds/episode.npy": b"B" * (3 << 20)}


def test_a_file_that_grew_since_planning_is_not_cut_to_the_planned_size(tmp_path: Path) -> None:
    from trajflow.download.shard import ShardDownloader
    from trajflow.storage import LocalStorage

    src = tmp_path / "src"
    src.mkdir()
    log_file = src / "log.bin"
    log_file.write_bytes(b"x" * 1000)
    config = _file_source(src)
    ShardDownloader(LocalStorage(tmp_path / "root"), config, 0, 1).plan()
    with open(log_file, "ab") as fh:
        fh.write(b"y" * 500)

    summary = run(tmp_path / "root", config)

    assert summary.exit_code == ExitCode.PERMANENT and summary.failed[0].reason == "changed"
    assert "log.bin: modified since it was listed" in summary.failed[0].error
    assert raw_files(tmp_path / "root") == {}


def test_turning_gunzip_on_plans_again_and_refuses_names_that_would_collide(tmp_path: Path) -> None:
    import gzip

    src = tmp_path / "src"
    src.mkdir()
    (src / "expr.tsv.gz").write_bytes(gzip.compress(b"gene\tvalue\n"))
    (src / "sub").mkdir()
    for odd in (".gz", "..gz", "...gz"):  # nothing would be left of the name without .gz
        (src / "sub" / odd).write_bytes(b"a file named " + odd.encode())
    assert run(tmp_path / "root", _file_source(src)).exit_code == 0
    assert set(raw_files(tmp_path / "root")) == {"ds/expr.tsv.gz", "ds/sub/.gz", "ds/sub/..gz", "ds/sub/...gz"}

    summary = run(tmp_path / "root", _file_source(src, gunzip=True))  # the old plan must not count as done
    assert summary.exit_code == 0 and not summary.already_done
    assert raw_files(tmp_path / "root")["ds/expr.tsv"] == b"gene\tvalue\n"
    assert raw_files(tmp_path / "root")["ds/sub/..gz"] == b"a file named ..gz"  # kept as it is

    (src / "expr.tsv").write_bytes(b"plain")  # would land where expr.tsv.gz is decompressed to
    with pytest.raises(ConfigError, match="would both be stored as 'ds/expr.tsv'"):
        run(tmp_path / "root", _file_source(src, gunzip=True, planGeneration="2"))


def test_a_directory_that_cannot_be_listed_fails_the_plan_instead_of_being_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    (src / "secret").mkdir(parents=True)
    (src / "ok.csv").write_bytes(b"1")
    (src / "secret" / "important.csv").write_bytes(b"2")
    real_scandir = os.scandir

    def scandir(path=".", errno_=13):  # as a pod's non-root user sees a directory of mode 700
        if os.fspath(path).endswith("secret"):
            raise OSError(errno_, os.strerror(errno_), os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ConfigError, match=r"cannot list .*secret: Permission denied"):
        run(tmp_path / "root", _file_source(src))
    monkeypatch.setattr(os, "scandir", lambda path=".": scandir(path, errno_=5))  # EIO: worth a retry
    with pytest.raises(TransientError, match=r"cannot list .*secret: Input/output error"):
        run(tmp_path / "root", _file_source(src))


def test_names_with_newlines_are_fetched_and_names_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.csv").write_bytes(b"1")
    (src / "a\nb.csv").write_bytes(b"2")
    assert run(tmp_path / "root", _file_source(src)).exit_code == 0
    assert raw_files(tmp_path / "root") == {"ds/ok.csv": b"1", "ds/a\nb.csv": b"2"}

    with open(os.path.join(os.fsencode(src), b"caf\xe9.csv"), "wb") as fh:  # Latin-1 bytes in a name
        fh.write(b"3")
    with pytest.raises(ConfigError, match=r"1 file name\(s\) under .* are not valid UTF-8: 'caf\\udce9.csv'"):
        run(tmp_path / "root", _file_source(src, planGeneration="2"))
    excluded = make_config([{"type": "file", "name": "ds", "path": str(src), "exclude": ["caf*"]}], planGeneration="3")
    assert run(tmp_path / "root", excluded).exit_code == 0


def test_an_item_whose_path_in_the_run_root_would_exceed_path_max_fails_alone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = "/".join(["d" * 200] * 19) + "/x.bin"  # fits under src/, not under the longer run root below
    (src / deep).parent.mkdir(parents=True)
    (src / deep).write_bytes(b"deep")
    (src / "ok.bin").write_bytes(b"ok")
    short, long = tmp_path / "r", tmp_path / ("r" * 250)
    assert run(short, _file_source(src)).exit_code == ExitCode.OK
    # the same volume mounted at a longer path, with the plan made at the short one: each pod
    # checks the paths under its own mount
    shutil.copytree(short / "plan", long / "plan")
    summary = run(long, _file_source(src))
    assert summary.exit_code == ExitCode.PERMANENT  # that item alone, not the run root failing (exit 1) on every retry
    assert [(r.item.key, r.kind) for r in summary.failed] == [(f"ds/{deep}", "permanent")]
    assert "would exceed the 4096-byte PATH_MAX of the filesystem" in summary.failed[0].error
    assert raw_files(long) == {"ds/ok.bin": b"ok"}


def test_an_unexpected_error_for_one_item_fails_the_shard_instead_of_leaving_the_item_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.download.shard import ShardDownloader, raise_for
    from trajflow.download.transfer import ItemTransfer
    from trajflow.errors import TrajflowError

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.bin", "b.bin"):
        (src / name).write_bytes(name.encode())
    real_begin = ItemTransfer.begin

    def broken_begin(self):
        if self.item.key.endswith("b.bin"):
            raise RuntimeError("a bug")
        return real_begin(self)

    monkeypatch.setattr(ItemTransfer, "begin", broken_begin)
    summary = run(tmp_path / "root", _file_source(src))
    assert summary.exit_code == 1 and not summary.manifest_written
    # a.bin, if still in flight when b.bin stopped the shard, is stopped with it (a rerun takes it up again)
    assert [(r.item.key, r.outcome) for r in summary.failed if r.reason != "stopped"] == [("ds/b.bin", "failed")]
    assert all(r.kind == "transient" for r in summary.failed if r.reason == "stopped")
    (broken,) = [r for r in summary.failed if r.reason != "stopped"]
    assert "unexpected RuntimeError: a bug" in broken.error
    assert summary.failures_by_reason == {"storage": 1}  # counted in trajflow_download_failures_total too
    with pytest.raises(TrajflowError, match=r"^the run root failed: ds/b\.bin: ds/b\.bin: unexpected RuntimeError"):
        raise_for(summary)  # the item that stopped the shard is named first
    monkeypatch.undo()

    def broken_conclude(self):
        raise RuntimeError("a bug at the end")

    monkeypatch.setattr(ItemTransfer, "_conclude", broken_conclude)
    summary = run(tmp_path / "root2", _file_source(src))
    assert summary.exit_code == 1 and not summary.manifest_written
    assert summary.failed and all("unexpected RuntimeError: a bug at the end" in r.error for r in summary.failed)
    monkeypatch.undo()

    real_prepare = ShardDownloader._prepare_item
    monkeypatch.setattr(ShardDownloader, "_prepare_item",
                        lambda self, item: None if item.key.endswith("b.bin") else real_prepare(self, item))
    summary = run(tmp_path / "root3", _file_source(src))  # an item that silently got no outcome
    assert summary.exit_code == 1 and not summary.manifest_written
    assert [(r.item.key, r.error) for r in summary.failed] == [("ds/b.bin", "ds/b.bin: no outcome")]


def test_adopting_many_touched_files_logs_a_few_lines_not_one_each(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # a volume copied without its modification times: every stored file is re-hashed and
    # adopted, and 10^6 items must not mean 10^6 log lines (the summary counts them all)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"e{i:02d}.npy").write_bytes(bytes([i]) * 64)
    root = tmp_path / "root"
    assert run(root, _file_source(src)).exit_code == 0
    for path in (root / "raw").rglob("*.npy"):
        os.utime(path, ns=(10**18, 10**18))
    (root / "raw" / "_done" / "00000.json").unlink()
    with caplog.at_level(logging.INFO, logger="trajflow"):
        summary = run(root, _file_source(src))
    assert summary.exit_code == 0 and summary.count("adopted") == 50
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "adopted" in r.getMessage()]
    assert len(lines) == 21 and "further ones are logged at DEBUG" in lines[-1], lines[-3:]
