"""Sharding: 4 and 7 shards partition the same items exactly, and re-sharding reuses every
verified item instead of downloading it again."""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from download_helpers import FaultyServer, hidden_files, payload, visible_files
from test_download_http import make_config

from trajflow.download.shard import ShardDownloader
from trajflow.plan import shard_items
from trajflow.storage import LocalStorage, read_manifest


@pytest.fixture
def server() -> Iterator[FaultyServer]:
    with FaultyServer() as srv:
        yield srv


def _objects(server: FaultyServer) -> tuple[dict[str, bytes], list[str]]:
    objects = {f"/d{i:02d}.bin": payload(1000 + (i * 7919) % 150_000, seed=i) for i in range(40)}
    return objects, [server.add(path, data) for path, data in objects.items()]


def _run_all(root: Path, config: object, shards: int) -> list[object]:
    """Every shard at once, as the Job's pods would run them."""
    with ThreadPoolExecutor(max_workers=shards) as pool:
        return list(pool.map(lambda s: ShardDownloader(LocalStorage(root), config, s, shards).run(), range(shards)))  # type: ignore[arg-type]


def test_four_and_seven_shards_cover_the_items_exactly_once(server: FaultyServer, tmp_path: Path) -> None:
    objects, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    storage = LocalStorage(tmp_path)
    all_keys = {f"web{p}" for p in objects}
    for shards in (4, 7):
        plan, _ = ShardDownloader(storage, config, 0, shards).plan()
        parts = [{i.key for i in shard_items(storage, plan, s)} for s in range(shards)]
        assert set().union(*parts) == all_keys
        for a, b in itertools.combinations(parts, 2):
            assert not a & b
        loads = [sum(i.size for i in shard_items(storage, plan, s)) for s in range(shards)]
        assert max(loads) - min(loads) <= max(len(d) for d in objects.values())  # byte-balanced


def test_resharding_reuses_every_verified_item(server: FaultyServer, tmp_path: Path) -> None:
    objects, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    storage = LocalStorage(tmp_path)

    first = _run_all(tmp_path, config, 4)
    assert all(s.exit_code == 0 for s in first)  # type: ignore[attr-defined]
    assert len(server.requests()) == len(objects)

    server.clear_log()
    second = _run_all(tmp_path, config, 7)
    assert all(s.exit_code == 0 for s in second)  # type: ignore[attr-defined]
    assert server.requests() == []  # nothing downloaded again (only HEADs to plan)
    assert sum(s.count("fetched") for s in second) == 0  # type: ignore[attr-defined]
    assert sum(s.count("reused") + s.count("skipped") for s in second) == len(objects)  # type: ignore[attr-defined]

    plan, _ = ShardDownloader(storage, config, 0, 7).plan()
    for shard in range(7):
        expected = {i.key: objects[i.key[len("web"):]] for i in shard_items(storage, plan, shard)}
        assert visible_files(tmp_path / "raw" / f"{shard:05d}") == expected
        manifest = read_manifest(storage, "download", shard)
        assert manifest is not None and manifest["shards"] == 7  # the 4-shard manifests were replaced
        assert {e["item"] for e in manifest["items"]} == set(expected)
    assert hidden_files(tmp_path / "raw") == []


def test_rerun_with_a_new_plan_generation_lists_again_but_fetches_nothing(server: FaultyServer, tmp_path: Path) -> None:
    objects, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    assert ShardDownloader(LocalStorage(tmp_path), config, 0, 1).run().exit_code == 0
    server.clear_log()
    bumped = make_config([{"type": "https", "name": "web", "urls": urls}], planGeneration="2")
    summary = ShardDownloader(LocalStorage(tmp_path), bumped, 0, 1).run()
    assert summary.exit_code == 0 and summary.count("skipped") == len(objects)
    assert server.requests() == [] and len(server.requests(method="HEAD")) == len(objects)


def test_a_manifest_of_the_previous_plan_does_not_open_the_gate(server: FaultyServer, tmp_path: Path) -> None:
    """Same shard count, new plan generation: shard 0 of the new plan moves items out of
    shard 1's directory; shard 1's old manifest must not count until shard 1 reruns."""
    from trajflow.errors import WaitTimeout
    from trajflow.storage.wait import wait_for_shards

    urls = [server.add(f"/f{i}.bin", payload(size, seed=i)) for i, size in enumerate([5000, 4000, 3000, 2000])]
    for shard in range(2):
        assert ShardDownloader(LocalStorage(tmp_path), make_config([{"type": "https", "name": "web", "urls": urls}]),
                               shard, 2).run().exit_code == 0
    urls.append(server.add("/f4.bin", payload(4500, seed=4)))
    gen2 = make_config([{"type": "https", "name": "web", "urls": urls}], planGeneration="2")
    assert ShardDownloader(LocalStorage(tmp_path), gen2, 0, 2).run().exit_code == 0
    no_sleep: list[float] = []
    with pytest.raises(WaitTimeout, match="shard 1 records generation="):
        wait_for_shards(LocalStorage(tmp_path), "download", {0, 1}, 0, sleep=no_sleep.append, expect_shards=2)
    assert ShardDownloader(LocalStorage(tmp_path), gen2, 1, 2).run().exit_code == 0
    wait_for_shards(LocalStorage(tmp_path), "download", {0, 1}, 0, sleep=no_sleep.append, expect_shards=2)
    manifest = read_manifest(LocalStorage(tmp_path), "download", 1)
    assert manifest is not None and all((tmp_path / e["key"]).is_file() for e in manifest["items"])


def test_shard_0_sweeps_partial_downloads_in_the_directories_of_dropped_shards(server: FaultyServer,
                                                                               tmp_path: Path) -> None:
    objects, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    assert all(s.exit_code == 0 for s in _run_all(tmp_path, config, 4))  # type: ignore[attr-defined]
    # what a kill of the 4-shard run's shard 3 mid-download leaves (nobody holds its lock)
    for dropped in ("00002", "00003"):  # the first directory beyond the new count too
        left = tmp_path / "raw" / dropped / "web"
        (left / ".trajflow-tmp-dl-huge.bin").write_bytes(b"x" * 1000)
        (left / ".trajflow-tmp-dlj-huge.bin").write_text("{}\n")
    assert all(s.exit_code == 0 for s in _run_all(tmp_path, config, 2))  # type: ignore[attr-defined]
    assert hidden_files(tmp_path / "raw") == []  # no one resumes those: nothing stays behind


def test_an_old_temporary_a_live_process_holds_is_not_swept(server: FaultyServer, tmp_path: Path) -> None:
    """A stream stalled for over an hour is still its writer's: the sweep goes by the lock
    for download temporaries, never by age alone."""
    import fcntl
    import os

    objects, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    held = tmp_path / "raw" / "00000" / "web" / ".trajflow-tmp-dl-stalled.bin"
    held.parent.mkdir(parents=True)
    held.write_bytes(b"x" * 1000)
    journal = held.with_name(".trajflow-tmp-dlj-stalled.bin")
    journal.write_text("{}\n")
    for path in (held, journal):
        os.utime(path, (0, 0))  # written to long ago
    fd = os.open(journal, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the live writer's lock
        assert _run_all(tmp_path, config, 1)[0].exit_code == 0  # type: ignore[attr-defined]
        assert held.exists() and journal.exists()
    finally:
        os.close(fd)


def _assert_the_plan_in_use_is_whole(root: Path, shards: int) -> None:
    """Plan `shards` is in use, and each of its manifests lists files that exist."""
    from trajflow.plan import read_plan_in_use

    storage = LocalStorage(root)
    in_use = read_plan_in_use(storage)
    assert in_use is not None and in_use["shards"] == shards
    for shard in range(shards):
        manifest = read_manifest(storage, "download", shard)
        assert manifest is not None and manifest["shards"] == shards
        assert manifest["items"] and all((root / e["key"]).is_file() for e in manifest["items"])


def _release_changes(old: ShardDownloader, now: tuple[int, str], after: int) -> ShardDownloader:
    """`old` is the release's download for its first `after` looks (at its start, after it has
    planned, before each item); from then on the release names `now`."""
    looks = itertools.count(1)

    def wanted() -> tuple[int, str]:
        return (old.shards, old.generation) if next(looks) <= after else now

    old.wanted = wanted
    return old


def test_a_pod_of_a_replaced_job_stops_before_it_starts(server: FaultyServer, tmp_path: Path) -> None:
    """Argo CD prunes the old download Job only after the new preprocessing Job completes: its
    pods still start meanwhile, and must not pull the new download's files into their shards."""
    from trajflow.download.shard import Superseded

    _, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    assert all(s.exit_code == 0 for s in _run_all(tmp_path, config, 2))  # type: ignore[attr-defined]
    assert all(s.exit_code == 0 for s in _run_all(tmp_path, config, 3))  # type: ignore[attr-defined]
    now = (3, config.generation_id())
    with pytest.raises(Superseded, match="the release now downloads 3 shards of generation .*this pod's Job 2 of"):
        ShardDownloader(LocalStorage(tmp_path), config, 1, 2, wanted=lambda: now).run()
    _assert_the_plan_in_use_is_whole(tmp_path, 3)
    # the release's own download goes on
    assert ShardDownloader(LocalStorage(tmp_path), config, 1, 3, wanted=lambda: now).run().exit_code == 0


def test_a_pod_of_a_replaced_job_moves_no_file_of_the_new_download(server: FaultyServer, tmp_path: Path) -> None:
    """An old pod, still fetching when the upgrade came, finds its items verified where the new
    Job put them: it stops instead of moving them back into its shard."""
    from trajflow.download.shard import Superseded

    _, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    assert ShardDownloader(LocalStorage(tmp_path), config, 0, 2).run().exit_code == 0
    old = _release_changes(ShardDownloader(LocalStorage(tmp_path), config, 1, 2), (3, config.generation_id()), after=2)
    already_done = old._already_done

    def new_job_meanwhile(*args: object) -> bool:  # the old pod has planned; the new Job runs to its end
        done = already_done(*args)  # type: ignore[arg-type]
        assert all(s.exit_code == 0 for s in _run_all(tmp_path, config, 3))  # type: ignore[attr-defined]
        return done

    old._already_done = new_job_meanwhile  # type: ignore[method-assign]
    with pytest.raises(Superseded):
        old.run()
    _assert_the_plan_in_use_is_whole(tmp_path, 3)  # no file of the new download moved


def test_a_pod_of_a_replaced_job_deletes_no_manifest_of_the_new_download(server: FaultyServer,
                                                                           tmp_path: Path) -> None:
    """The release changes while an old pod plans: it would delete the new shard's manifest
    (of another plan) as its own shard's."""
    from trajflow.download.shard import Superseded

    _, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    assert all(s.exit_code == 0 for s in _run_all(tmp_path, config, 3))  # type: ignore[attr-defined]
    new = read_manifest(LocalStorage(tmp_path), "download", 1)
    old = _release_changes(ShardDownloader(LocalStorage(tmp_path), config, 1, 2), (3, config.generation_id()), after=1)
    with pytest.raises(Superseded):
        old.run()
    assert read_manifest(LocalStorage(tmp_path), "download", 1) == new


def test_a_pod_of_a_replaced_job_writes_no_manifest(server: FaultyServer, tmp_path: Path) -> None:
    """The release changes while an old pod fetches its last item: its last look, before the
    manifest, stops it, and its shard stays not done."""
    from trajflow.download.shard import Superseded

    _, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    old = ShardDownloader(LocalStorage(tmp_path), config, 0, 2)
    _, items = old.plan()
    old = _release_changes(old, (3, config.generation_id()), after=2 + len(items))  # start, planned, each item
    with pytest.raises(Superseded):
        old.run()
    assert read_manifest(LocalStorage(tmp_path), "download", 0) is None


def test_the_releases_download_puts_its_plan_back_in_use(server: FaultyServer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod of the replaced Job that started before its ConfigMap changed put its plan in use;
    the release's pods put theirs back before their manifests count on it."""
    import trajflow.download.shard as shard_module
    from trajflow.plan import PLAN_KEY, read_plan_in_use

    _, urls = _objects(server)
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    assert all(s.exit_code == 0 for s in _run_all(tmp_path, config, 2))  # type: ignore[attr-defined]
    old_plan = LocalStorage(tmp_path).read_bytes(PLAN_KEY)
    run = shard_module.Scheduler.run

    def old_pod_meanwhile(self: object) -> None:
        run(self)  # type: ignore[arg-type]
        LocalStorage(tmp_path).write_bytes(PLAN_KEY, old_plan)

    monkeypatch.setattr(shard_module.Scheduler, "run", old_pod_meanwhile)
    now = (3, config.generation_id())
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda s: ShardDownloader(LocalStorage(tmp_path), config, s, 3, wanted=lambda: now).run(),
                             range(3)))
    assert all(s.exit_code == 0 for s in done)
    assert read_plan_in_use(LocalStorage(tmp_path))["shards"] == 3
    _assert_the_plan_in_use_is_whole(tmp_path, 3)


def test_a_running_download_sees_the_release_change_its_configmap(tmp_path: Path) -> None:
    """The kubelet swaps the mounted file in: the cached answer must follow it."""
    import os

    import yaml

    from trajflow.config.loader import wanted_download

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    path, sources = tmp_path / "dataset.yaml", [{"type": "file", "name": "ds", "path": str(src)}]
    env = {"TRAJFLOW_DATASET_CONFIG": str(path)}
    path.write_text(yaml.safe_dump({"config": {"sources": sources}, "shards": 2}))
    first = wanted_download(env)
    assert first is not None and first[0] == 2
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"config": {"sources": sources}, "shards": 3}))
    os.replace(new, path)
    assert wanted_download(env) == (3, first[1])


def test_new_sources_alone_supersede_a_running_download() -> None:
    from trajflow.download.shard import Superseded, check_release

    with pytest.raises(Superseded):
        check_release((2, "new-generation"), 2, "old-generation")


def test_a_stop_ends_the_wait_for_the_release_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import trajflow.download.shard as shard_module

    monkeypatch.setattr(shard_module, "RELEASE_PATIENCE_S", 60.0)
    pauses: list[float] = []
    with pytest.raises(shard_module.Superseded):
        shard_module.wait_for_release(lambda: (2, "g"), 3, "g", pause=lambda s: pauses.append(s) or True)
    assert len(pauses) == 1  # the SIGTERM's pause ended the wait, not the patience


def test_a_stop_swallowed_while_planning_fetches_nothing(tmp_path: Path) -> None:
    """A SIGTERM whose exception a broad except caught during planning still stops the shard."""
    from trajflow.config.download import DownloadConfig
    from trajflow.download.failures import STOPPING
    from trajflow.errors import TransientError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"a")
    config = DownloadConfig.model_validate({"sources": [{"type": "file", "name": "ds", "path": str(src)}]})
    downloader = ShardDownloader(LocalStorage(tmp_path / "root"), config, 0, 1)
    plan = downloader.plan

    def planned_then_signalled():  # type: ignore[no-untyped-def]
        out = plan()
        STOPPING.set()
        return out

    downloader.plan = planned_then_signalled  # type: ignore[method-assign]
    try:
        with pytest.raises(TransientError):
            downloader.run()
    finally:
        STOPPING.clear()
    assert not (tmp_path / "root" / "raw" / "00000").exists()

