"""Storage contract: both backends (file://, s3:// on a real SeaweedFS) behave the same."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from s3_proxy import Reply, S3Proxy

from trajflow.errors import ConfigError, ExitCode, InvalidURI, TransientError
from trajflow.storage import (
    LocalStorage,
    ObjectInfo,
    done_shards,
    manifest_key,
    open_run_root,
    open_storage,
    read_manifest,
    read_manifest_fields,
    shard_name,
    write_manifest,
)
from trajflow.storage.s3 import S3Storage, _conditional_support
from trajflow.storage.wait import is_storage_error

MiB = 1024 * 1024


def _keys(storage, prefix: str = "") -> list[str]:
    return [info.key for info in storage.list(prefix)]


# ---- reading and writing ---------------------------------------------------------------


def test_round_trip_overwrite_and_empty(storage):
    storage.write_bytes("a/b/c.bin", b"first")
    assert storage.read_bytes("a/b/c.bin") == b"first"
    storage.write_bytes("a/b/c.bin", b"second, longer")
    assert storage.read_bytes("a/b/c.bin") == b"second, longer"
    storage.write_bytes("empty", b"")
    assert storage.read_bytes("empty") == b""
    info = storage.stat("empty")
    assert (info.key, info.size) == ("empty", 0)
    assert (info.modified_ns > 0) == isinstance(storage, LocalStorage)  # a filesystem tells when it was written


def test_stat_exists_and_missing(storage):
    storage.write_bytes("dir/obj", b"12345")
    info = storage.stat("dir/obj")
    assert info is not None and info.key == "dir/obj" and info.size == 5
    assert storage.exists("dir/obj")
    assert storage.stat("dir/missing") is None
    assert not storage.exists("dir/missing")
    # a "directory" is no object on either backend
    assert storage.stat("dir") is None
    assert not storage.exists("dir")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("dir/missing")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("dir")


@pytest.mark.parametrize(
    "start,end",
    [(0, None), (0, 10), (3, 7), (7, 3), (5, 5), (9, None), (9, 10), (10, None), (10, 20), (25, None), (25, 30), (0, 1000)],
)
def test_ranged_reads_behave_like_slices(storage, start, end):
    data = bytes(range(10))
    storage.write_bytes("r", data)
    with storage.open_read("r", start, end) as fh:
        got = fh.read()
    assert got == data[start:end]
    assert storage.read_range("r", start, end) == data[start:end]


def test_a_ranged_file_reads_like_the_bytes_it_views(storage, monkeypatch):
    """Seeks and reads of every size, through the block cache and around it, as io.BytesIO."""
    import io
    import random

    from trajflow.storage.base import RangedFile

    monkeypatch.setattr(RangedFile, "BLOCK", 64)
    monkeypatch.setattr(RangedFile, "CACHED_BLOCKS", 3)
    data = random.Random(1).randbytes(5000)
    storage.write_bytes("f", data)
    ours, ref = RangedFile(storage, "f", len(data)), io.BytesIO(data)
    rng = random.Random(2)
    for _ in range(300):
        where = rng.choice([rng.randrange(0, 5100), None])
        if where is not None:
            assert ours.seek(where) == ref.seek(where)
        n = rng.choice([0, 1, 7, 63, 64, 65, 200, 300, 6000, -1])
        assert ours.read(n) == ref.read(n) and ours.tell() == ref.tell()
    # a typed buffer takes as many bytes as it holds, not as many items
    import array

    ours.seek(0)
    doubles = array.array("d", bytes(64))
    assert ours.readinto(doubles) == 64 and doubles.tobytes() == data[:64]


def test_ranged_read_of_missing_object_raises(storage):
    with pytest.raises(FileNotFoundError):
        storage.read_range("nope", 2, 5)
    with pytest.raises(FileNotFoundError):
        storage.read_range("nope", 5, 2)


def test_negative_range_is_rejected(storage):
    storage.write_bytes("r", b"abc")
    with pytest.raises(ValueError, match="non-negative"):
        storage.open_read("r", -1, 2)


def test_streaming_writer_accepts_bytes_like_chunks(storage):
    chunks = [b"abc", bytearray(b"def"), memoryview(b"ghijkl")[1:4]]
    with storage.writer("stream/out") as fh:
        for chunk in chunks:
            fh.write(chunk)
    assert storage.read_bytes("stream/out") == b"abcdefhij"


def test_writer_is_invisible_until_it_closes(storage):
    storage.write_bytes("v/old", b"old")
    with storage.writer("v/new") as fh:
        fh.write(b"x" * 1000)
        assert not storage.exists("v/new")
        assert _keys(storage, "v/") == ["v/old"]
    assert storage.read_bytes("v/new") == b"x" * 1000


def test_failed_writer_leaves_nothing_and_keeps_the_old_version(storage):
    storage.write_bytes("keep", b"old version")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.writer("keep") as fh:
            fh.write(b"half of the new vers")
            raise RuntimeError("boom")
    assert storage.read_bytes("keep") == b"old version"
    with pytest.raises(RuntimeError):
        with storage.writer("fresh") as fh:
            fh.write(b"partial")
            raise RuntimeError("boom")
    assert not storage.exists("fresh")
    assert _keys(storage) == ["keep"]


def test_multipart_upload_streams_several_parts(s3_server):
    bucket = s3_server.make_bucket()
    store = S3Storage(f"s3://{bucket}/mp", client=s3_server.client(), part_size=5 * MiB)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    with store.writer("big.bin") as fh:
        for i in range(12):  # 12 MiB: two full parts and a tail
            piece = bytes([i]) + block[1:]
            fh.write(piece)
            digest.update(piece)
        assert not store.exists("big.bin")
    assert store.stat("big.bin").size == 12 * MiB
    assert store.stat("big.bin").etag.endswith("-3")  # a multipart ETag names its parts
    assert store.sha256("big.bin") == (digest.hexdigest(), 12 * MiB)
    assert store.read_range("big.bin", 5 * MiB - 2, 5 * MiB + 2) == block[-2:] + bytes([5]) + block[1:2]


def test_parts_grow_so_an_object_of_unknown_size_fits_in_s3s_part_limit(s3_server, monkeypatch):
    from trajflow.storage import s3

    monkeypatch.setattr(s3._MultipartWriter, "PARTS_PER_SIZE", 2)  # 1,000 parts of each size, in small
    bucket = s3_server.make_bucket()
    client = s3_server.client()
    sizes: list[int] = []
    upload_part = client.upload_part
    monkeypatch.setattr(client, "upload_part", lambda **kw: sizes.append(len(kw["Body"])) or upload_part(**kw))
    store = S3Storage(f"s3://{bucket}/grow", client=client, part_size=5 * MiB, upload_concurrency=1)
    data = os.urandom(MiB) * 36
    with store.writer("big.bin") as fh:
        for i in range(0, len(data), MiB):
            fh.write(data[i:i + MiB])
    assert [size // MiB for size in sizes] == [5, 5, 10, 10, 6]  # two of each size, then the tail
    assert store.read_bytes("big.bin") == data


def test_the_largest_object_is_what_max_parts_of_growing_sizes_hold(monkeypatch):
    from trajflow.storage import s3

    # S3's 10,000 parts: 1,000 each of 16 MiB doubling to 4 GiB, then 1,000 of 5 GiB
    assert S3Storage("s3://bucket/x", client=object()).largest_object() == 13_296_000 * MiB
    monkeypatch.setattr(s3._MultipartWriter, "PARTS_PER_SIZE", 2)
    monkeypatch.setattr(s3._MultipartWriter, "MAX_PARTS", 5)
    store = S3Storage("s3://bucket/x", client=object(), part_size=5 * MiB)
    assert store.largest_object() == (5 + 5 + 10 + 10 + 20) * MiB  # two parts of each size, then the fifth


def test_small_part_size_is_rejected():
    with pytest.raises(ValueError, match="5 MiB"):
        S3Storage("s3://bucket/x", client=object(), part_size=1024)


def test_sha256_streams_the_whole_object(storage):
    data = os.urandom(3 * MiB + 17)
    storage.write_bytes("h/blob", data)
    assert storage.sha256("h/blob") == (hashlib.sha256(data).hexdigest(), len(data))


def test_delete(storage):
    storage.write_bytes("d/x", b"1")
    storage.write_bytes("d/y", b"2")
    storage.delete("d/x")
    assert not storage.exists("d/x")
    assert _keys(storage) == ["d/y"]
    storage.delete("d/x")  # absent: no error
    storage.delete("d")  # a "directory": no object, no error
    assert _keys(storage) == ["d/y"]


# ---- listing ---------------------------------------------------------------------------

LAYOUT = {
    "raw/00001/a.bin": 3,
    "raw/00001/sub/b.bin": 4,
    "raw/00012/c.bin": 5,
    "raw/0001.json": 6,
    "raw/_done/00001.json": 7,
    "raw2/d": 8,
    "rawfile": 9,
    "resampled/00000.safetensors": 10,
    "top": 11,
}
PREFIX_CASES = ["", "raw", "raw/", "raw/0001", "raw/00001", "raw/00001/", "raw/00001/sub/b.bin", "raw/_done/", "r", "x", "raw/00001/s", "top"]


def _expected(prefix: str) -> list[ObjectInfo]:
    return [(k, s) for k, s in sorted(LAYOUT.items()) if k.startswith(prefix)]


@pytest.mark.parametrize("prefix", PREFIX_CASES)
def test_list_is_a_sorted_string_prefix_match_with_sizes(storage, prefix):
    for key, size in LAYOUT.items():
        storage.write_bytes(key, b"x" * size)
    assert [(i.key, i.size) for i in storage.list(prefix)] == _expected(prefix)


def test_both_backends_list_the_same(local_storage, s3_storage):
    for store in (local_storage, s3_storage):
        for key, size in LAYOUT.items():
            store.write_bytes(key, b"y" * size)
    for prefix in PREFIX_CASES:
        local = [(i.key, i.size) for i in local_storage.list(prefix)]
        remote = [(i.key, i.size) for i in s3_storage.list(prefix)]
        assert local == remote, prefix


def test_list_sorts_by_key_not_by_directory(storage):
    for key in ["a/b", "a-c", "a.d", "a/a/z", "b"]:
        storage.write_bytes(key, b"")
    assert _keys(storage) == sorted(["a/b", "a-c", "a.d", "a/a/z", "b"])


def test_list_hides_backend_internals(storage):
    storage.write_bytes("p/visible", b"1")
    if isinstance(storage, LocalStorage):
        hidden_dir = storage.root / "p"
        (hidden_dir / ".trajflow-tmp-0123456789abcdef-visible").write_bytes(b"partial")
    else:
        storage.client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/p/.trajflow-claims-x/abc", Body=b"")
    assert _keys(storage) == ["p/visible"]
    assert _keys(storage, "p/") == ["p/visible"]


def test_an_unreadable_directory_fails_the_listing_instead_of_looking_empty(local_storage, monkeypatch):
    local_storage.write_bytes("raw/_done/00000.json", b"{}")
    local_storage.write_bytes("raw/00000/item.bin", b"1")
    denied = str(local_storage.root / "raw" / "_done")
    real_scandir = os.scandir

    def scandir(path="."):  # tests run as root, which no mode bits keep out
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=f"cannot list {denied}: Permission denied"):
        _keys(local_storage, "raw/")
    assert _keys(local_storage, "raw/00000/") == ["raw/00000/item.bin"]


@pytest.mark.parametrize("bad", ["", "/abs", "a//b", "../x", "a/../b", "a/./b", "a\\b", "."])
def test_invalid_keys_are_rejected(storage, bad):
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.write_bytes(bad, b"1")
    with pytest.raises(ValueError):
        storage.exists(bad)


@pytest.mark.parametrize("bad", ["/abs", "a//", "../", "a/../"])
def test_invalid_prefixes_are_rejected(storage, bad):
    with pytest.raises(ValueError, match="invalid storage prefix"):
        list(storage.list(bad))


def test_child_is_rooted_below_the_parent(storage):
    child = storage.child("runs/r1")
    child.write_bytes("raw/x", b"123")
    assert storage.read_bytes("runs/r1/raw/x") == b"123"
    assert _keys(child) == ["raw/x"]
    assert _keys(storage) == ["runs/r1/raw/x"]
    assert child.uri.endswith("/runs/r1")


def test_a_filesystem_root_holds_at_most_its_volume_and_says_nothing_where_statvfs_knows_nothing(tmp_path, monkeypatch):
    st = os.statvfs(tmp_path)
    # a root not made yet is on the volume of its nearest existing directory
    assert LocalStorage(tmp_path / "not" / "yet").largest_object() == st.f_blocks * st.f_frsize
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 0, 0, 0, 0, 0, 0, 0, 255)))
    assert LocalStorage(tmp_path).largest_object() is None  # a FUSE mount of an object store


def test_local_path_only_on_the_filesystem(storage):
    storage.write_bytes("m/file", b"abc")
    path = storage.local_path("m/file")
    if isinstance(storage, LocalStorage):
        assert path is not None and path.read_bytes() == b"abc"
    else:
        assert path is None


# ---- write-if-absent -------------------------------------------------------------------


def test_write_if_absent_first_writer_wins(storage):
    assert storage.write_if_absent("plan/p.json", b"first") is True
    assert storage.write_if_absent("plan/p.json", b"second") is False
    assert storage.read_bytes("plan/p.json") == b"first"
    assert _keys(storage) == ["plan/p.json"]


def test_write_if_absent_threads_have_one_winner(storage):
    results: dict[int, bool] = {}
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        results[i] = storage.write_if_absent("race/key", f"writer-{i}".encode())

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1
    assert storage.read_bytes("race/key") == f"writer-{winners[0]}".encode()


def _no_hard_links(*args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")  # as on vfat, exFAT and some FUSE mounts


def test_write_if_absent_without_hard_links_has_one_winner(local_storage, monkeypatch):
    monkeypatch.setattr(os, "link", _no_hard_links)
    assert local_storage.write_if_absent("plan/p.json", b"first")
    assert not local_storage.write_if_absent("plan/p.json", b"second")
    assert local_storage.read_bytes("plan/p.json") == b"first"
    assert [p.name for p in (local_storage.root / "plan").iterdir()] == ["p.json"]


def test_write_if_absent_without_hard_links_leaves_no_part_behind(local_storage, monkeypatch):
    monkeypatch.setattr(os, "link", _no_hard_links)
    real_fdopen = os.fdopen

    class DiskFull(io.BufferedWriter):
        def write(self, data):
            super().write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: DiskFull(io.FileIO(fd, "w")))
    with pytest.raises(OSError, match="No space left") as failed:
        local_storage.write_if_absent("plan/p.json", b"x" * 1000)
    assert failed.value.filename == str(local_storage.root / "plan" / "p.json")
    assert not local_storage.exists("plan/p.json")
    monkeypatch.setattr(os, "fdopen", real_fdopen)  # space freed, the pod retried
    assert local_storage.write_if_absent("plan/p.json", b"x" * 1000)
    assert local_storage.read_bytes("plan/p.json") == b"x" * 1000


def test_a_write_the_kernel_refuses_names_the_file(tmp_path):
    # a file size limit makes the kernel fail write() with EFBIG, as a full disk fails it
    # with ENOSPC: neither error carries a file name of its own
    script = """
import resource, signal, sys
from trajflow.storage import LocalStorage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
storage = LocalStorage(sys.argv[1])
try:
    with storage.writer("resampled/00001.safetensors") as out:
        out.write(b"x" * 100_000)
except OSError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "File too large" in done.stdout and str(tmp_path / "resampled" / "00001.safetensors") in done.stdout
    assert not list((tmp_path / "resampled").iterdir())  # no temporary left behind


def test_seaweedfs_enforces_conditional_writes(s3_storage):
    assert s3_storage._supports_conditional_put() is True


@pytest.fixture
def s3_without_conditional_writes(s3_server, monkeypatch):
    """An S3Storage that must use the claim election, as on servers that ignore If-None-Match."""
    bucket = s3_server.make_bucket()
    store = S3Storage(f"s3://{bucket}/root", client=s3_server.client(), elect_settle_s=1.5)
    monkeypatch.setitem(_conditional_support, (str(store.client.meta.endpoint_url), bucket), False)
    return store


def test_claim_election_has_one_winner_whatever_the_timing(s3_without_conditional_writes):
    store = s3_without_conditional_writes
    results: dict[int, bool] = {}
    start = threading.Barrier(6)

    def contend(i: int) -> None:
        start.wait()
        # staggered starts: early contenders decide before late ones have claimed
        import time

        time.sleep(0.4 * (i % 3))
        results[i] = store.write_if_absent("plan/download.json", f"plan-{i}".encode())

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1, results
    assert store.read_bytes("plan/download.json") == f"plan-{winners[0]}".encode()
    # a contender arriving after the decision loses at once
    assert store.write_if_absent("plan/download.json", b"late") is False
    # the claims stay hidden
    assert _keys(store) == ["plan/download.json"]


def test_a_claim_made_after_the_first_contender_decided_loses(s3_without_conditional_writes):
    """The race the earliest-claim rule exists for: B found no key, but claims only after A
    listed the claims (seeing A's alone) and decided. B must lose, though it sees both."""
    store = s3_without_conditional_writes
    a_listed = threading.Event()
    list_raw, write_bytes = store._list_raw, store.write_bytes

    def listing(prefix):
        found = list_raw(prefix)
        if threading.current_thread().name == "A":
            a_listed.set()
        return found

    def writing(key, data):
        if threading.current_thread().name == "B" and "claims-" in key and not key.endswith(".data"):
            assert a_listed.wait(30)  # B's claim marker lands after A's decision
        return write_bytes(key, data)

    store._list_raw, store.write_bytes = listing, writing
    results: dict[str, bool] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, store.write_if_absent("plan/p.json", n.encode())),
                                name=n) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"A": True, "B": False}
    assert store.read_bytes("plan/p.json") == b"A"


def test_probe_detects_a_server_that_ignores_conditional_writes(s3_server, monkeypatch, caplog):
    bucket = s3_server.make_bucket()
    client = s3_server.client()

    # a client that drops If-None-Match, as a server without support would ignore it
    class IgnoringClient:
        def __init__(self, inner):
            self._inner = inner
            self.meta = inner.meta

        def put_object(self, **kwargs):
            kwargs.pop("IfNoneMatch", None)
            return self._inner.put_object(**kwargs)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    store = S3Storage(f"s3://{bucket}/root", client=IgnoringClient(client), elect_settle_s=1.0)
    monkeypatch.delitem(_conditional_support, (str(client.meta.endpoint_url), bucket), raising=False)
    with caplog.at_level("WARNING"):
        assert store._supports_conditional_put() is False
    assert "does not enforce conditional writes" in caplog.text
    assert store.write_if_absent("k", b"one") is True
    assert store.write_if_absent("k", b"two") is False
    assert store.read_bytes("k") == b"one"


# ---- manifests -------------------------------------------------------------------------


def test_manifests_mark_shards_done(storage):
    assert done_shards(storage, "download") == set()
    assert read_manifest(storage, "download", 3) is None
    items = [{"key": "a", "size": 1, "sha256": "00"}]
    doc = write_manifest(storage, "download", 3, 8, items, bytes=1)
    assert manifest_key("download", 3) == "raw/_done/00003.json"
    assert storage.exists("raw/_done/00003.json")
    assert read_manifest(storage, "download", 3) == doc
    assert doc["items"] == items and doc["shards"] == 8 and doc["bytes"] == 1
    write_manifest(storage, "preprocess", 0, 1, [])
    storage.write_bytes("raw/_done/notes.txt", b"ignored")
    assert done_shards(storage, "download") == {3}
    assert done_shards(storage, "preprocess") == {0}
    assert shard_name(12) == "00012"


def test_corrupt_manifest_is_named(storage):
    storage.write_bytes(manifest_key("download", 1), b"{not json")
    with pytest.raises(ValueError, match=r"raw/_done/00001\.json: corrupt manifest"):
        read_manifest(storage, "download", 1)
    storage.write_bytes(manifest_key("download", 2), json.dumps({"version": 99}).encode())
    with pytest.raises(ValueError, match="unsupported manifest"):
        read_manifest(storage, "download", 2)


def test_manifest_fields_are_read_without_the_items(storage, monkeypatch):
    """`read_manifest_fields` gives the manifest with its lists and objects as None, however
    the chunks cut its strings (brackets, quotes, escapes and multibyte characters in them)."""
    from trajflow.storage import manifest

    odd = 'a "quoted" [bracket] {brace} back\\slash \\" é 漢 \\u005b'
    items = [{"key": f"{odd} {i}", "checks": [odd, {"nested": [odd, []]}], "size": i} for i in range(40)]
    doc = write_manifest(storage, "download", 0, 2, items, generation=odd, missing=[{"item": odd}], bytes=7, note=None)
    expected = {**doc, "items": None, "missing": None}
    for chunk in (1, 2, 3, 7, 64, 1 << 20):
        monkeypatch.setattr(manifest, "_FIELDS_CHUNK", chunk)
        assert read_manifest_fields(storage, "download", 0) == expected
    assert read_manifest_fields(storage, "download", 1) is None


@pytest.mark.parametrize("text,problem", [
    (b"", "no document"),
    (b'{"version": 1, "items": [{"a": "]"}', "the document ends early"),  # cut after an item
    (b'{"version": 1, "items": [{"a": "x]', "the document ends early"),  # cut within a string
    (b'{"version": 1, "items": [{"a": 1]]}', "unexpected ']'"),
    (b'{"version": 1, "items": []', "the document ends early"),
    (b'{"version": 1 "shards": 2}', "Expecting ',' delimiter"),
])
def test_a_torn_manifest_is_named_when_its_fields_are_read(storage, text, problem):
    storage.write_bytes(manifest_key("download", 1), text)
    with pytest.raises(ValueError, match=rf"raw/_done/00001\.json: corrupt manifest: {re.escape(problem)}"):
        read_manifest_fields(storage, "download", 1)
    storage.write_bytes(manifest_key("download", 2), json.dumps({"version": 99, "items": [1]}).encode())
    with pytest.raises(ValueError, match=r"unsupported manifest \(version 99\)"):
        read_manifest_fields(storage, "download", 2)


def test_reading_a_manifests_fields_holds_one_chunk_not_its_items(local_storage, peak_in_small_chunks):
    """A manifest of many items is read in the memory of a few chunks: `trajflow wait`, in an
    init container of 1Gi, reads manifests of hundreds of MB."""
    items = [{"key": f"raw/00000/episode_{i:09d}.parquet", "sha256": f"{i:064x}", "size": i} for i in range(20000)]
    # and what costs a regex that backtracks: long runs of strings, and of escapes (é is \u00e9)
    items += [{"checks": ["size"] * 2000, "path": "é" * 8000} for _ in range(40)]
    write_manifest(local_storage, "download", 0, 1, items, generation="g")
    size = local_storage.stat(manifest_key("download", 0)).size
    fields, peak = peak_in_small_chunks(lambda: read_manifest_fields(local_storage, "download", 0))
    assert fields["generation"] == "g" and fields["items"] is None
    assert size > 5_000_000 and peak < 8 * 64 * 1024, (size, peak)  # a few chunks


def test_a_string_longer_than_many_chunks_is_read_on_not_again(local_storage, peak_in_small_chunks):
    """A string that many chunks cut (a corrupt or hand-written manifest) is read on from
    where each chunk ended: read again from its quote, it was held whole and rescanned at
    every chunk (30 s for a string of 32 MiB)."""
    long_item = {"path": 'x\\"é' * 500_000}  # 3 MB in JSON, escapes astride the chunks' ends
    write_manifest(local_storage, "download", 0, 1, [long_item], generation="g", note='n\\"' * 100_000)
    fields, peak = peak_in_small_chunks(lambda: read_manifest_fields(local_storage, "download", 0))
    assert fields["note"] == 'n\\"' * 100_000 and fields["items"] is None and fields["generation"] == "g"
    # the top-level note is the document's to hold (about 1 MB as text and as JSON); the
    # item's string is not
    assert peak < 1_600_000 + 8 * 64 * 1024, peak


# ---- URIs and configuration ----------------------------------------------------------


def test_open_storage_uris(tmp_path):
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(f"file://{tmp_path}").root == tmp_path.resolve()
    assert open_storage(str(tmp_path / "x")).root == (tmp_path / "x").resolve()
    assert open_storage(tmp_path).root == tmp_path.resolve()
    s3 = open_storage("s3://my-bucket/some/prefix", endpoint="http://127.0.0.1:1", region="eu-west-1")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix")
    assert s3.client.meta.region_name == "eu-west-1"


@pytest.mark.parametrize(
    "uri,match",
    [
        ("http://example.com/x", "unsupported storage URI"),
        ("file://host/x", "with a host"),
        ("s3://", "not an s3:// URI"),
        ("s3://Bad_Bucket/x", "invalid bucket name"),
        ("s3://ab/x", "invalid bucket name"),
        ("s3://bucket/a//b", "invalid key prefix"),
        ("s3://bucket/../b", "invalid key prefix"),
        ("", "empty storage URI"),
    ],
)
def test_bad_uris_give_one_clear_error(uri, match):
    with pytest.raises(InvalidURI, match=match) as info:
        open_storage(uri)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_open_run_root_reaches_s3_through_the_default_credential_chain(s3_server):
    from trajflow.config import GlobalConfig

    bucket = s3_server.make_bucket()
    glob = GlobalConfig.model_validate(
        {
            "runId": "r-1",
            "storage": {"type": "s3", "s3": {"endpoint": s3_server.endpoint, "bucket": bucket, "prefix": "/runs/"}},
        }
    )
    root = open_run_root(glob)
    assert root.uri == f"s3://{bucket}/runs/r-1"
    root.write_bytes("raw/x", b"via env credentials")
    direct = s3_server.client().get_object(Bucket=bucket, Key="runs/r-1/raw/x")["Body"].read()
    assert direct == b"via env credentials"


def test_wrong_credentials_fail_loudly(s3_server, monkeypatch):
    bucket = s3_server.make_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    from botocore.exceptions import ClientError

    store = open_storage(f"s3://{bucket}/x", endpoint=s3_server.endpoint)
    with pytest.raises(ClientError, match=r"\(SignatureDoesNotMatch\) when calling the PutObject operation") as info:
        store.write_bytes("k", b"1")
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    listed = s3_server.client().list_objects_v2(Bucket=bucket)  # (the server's own keys)
    assert listed.get("KeyCount", 0) == 0  # refused, not written


def test_open_run_root_on_the_filesystem(tmp_path):
    from trajflow.config import GlobalConfig

    glob = GlobalConfig.model_validate({"runId": "demo", "storage": {"filesystem": {"path": str(tmp_path)}}})
    root = open_run_root(glob)
    assert isinstance(root, LocalStorage) and root.root == tmp_path / "demo"


def test_a_run_root_is_one_releases(storage):
    """Two releases given the same runId and storage (a values file pins both) would replace
    each other's plan, manifests and checkpoints: the second is refused, naming the first."""
    from trajflow.storage import OWNER_KEY, claim_run_root

    claim_run_root(storage, "ml", "exp-a")
    claim_run_root(storage, "ml", "exp-a")  # its other pods, its upgrades
    for namespace, release in (("ml", "exp-b"), ("other", "exp-a")):
        with pytest.raises(ConfigError, match=f"is the run root of release 'exp-a' in namespace 'ml' .*, not of "
                                              f"'{release}' in '{namespace}'.*its own global.runId"):
            claim_run_root(storage, namespace, release)
    assert OWNER_KEY not in _keys(storage)  # the run root's listings never show it
    with pytest.raises(ConfigError, match="global.storage.takeOverFrom=ml/exp-a"):  # only from the release named
        claim_run_root(storage, "ml", "exp-b", take_over_from="other/exp-a")
    claim_run_root(storage, "ml", "exp-b", take_over_from="ml/exp-a")  # an install under another name, on purpose
    claim_run_root(storage, "ml", "exp-b", take_over_from="ml/exp-a")  # the setting can stay
    with pytest.raises(ConfigError, match="release 'exp-b'.*global.storage.takeOverFrom=ml/exp-b"):
        claim_run_root(storage, "ml", "exp-a")


def test_pods_claim_the_run_root_they_open_and_a_store_that_cannot_say_stops_nothing(tmp_path, monkeypatch, caplog):
    from trajflow.config import GlobalConfig
    from trajflow.metrics import NAMESPACE_ENV, RELEASE_ENV
    from trajflow.storage import claim_run_root

    glob = GlobalConfig.model_validate({"runId": "demo", "storage": {"filesystem": {"path": str(tmp_path)}}})
    open_run_root(glob)  # outside a pod (trajflow run, a shell): nothing is claimed
    monkeypatch.setenv(NAMESPACE_ENV, "ml")
    monkeypatch.setenv(RELEASE_ENV, "exp-a")
    open_run_root(glob)
    monkeypatch.setenv(RELEASE_ENV, "exp-b")
    with pytest.raises(ConfigError, match="release 'exp-a'"):
        open_run_root(glob)

    class ReadOnly(LocalStorage):
        def write_if_absent(self, key, data):
            raise PermissionError("read-only credentials")

    claim_run_root(ReadOnly(tmp_path / "elsewhere"), "ml", "exp-b")
    assert "cannot tell which release" in caplog.text


@pytest.mark.parametrize("upload_threads", [0, 2])  # each writer's own threads, or threads the writers share
def test_failed_part_upload_aborts_the_whole_upload(s3_server, upload_threads):
    bucket = s3_server.make_bucket()
    real = s3_server.client()

    class FailingThirdPart:
        def __init__(self, inner):
            self._inner, self.meta = inner, inner.meta

        def upload_part(self, **kwargs):
            if kwargs["PartNumber"] == 3:
                raise ConnectionError("network dropped")
            return self._inner.upload_part(**kwargs)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    store = S3Storage(f"s3://{bucket}/x", client=FailingThirdPart(real), part_size=5 * MiB, upload_concurrency=2,
                      upload_threads=upload_threads)
    with pytest.raises(ConnectionError, match="network dropped"):
        with store.writer("obj") as fh:
            for _ in range(6):
                fh.write(b"z" * MiB * 3)
    assert not store.exists("obj")
    assert real.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with store.writer("next") as fh:  # a shared pool outlives the failed writer
        fh.write(b"y" * MiB * 7)  # two parts, neither the third
    assert store.read_bytes("next") == b"y" * MiB * 7


def test_an_abort_does_not_wait_for_other_writers_parts_in_a_shared_pool() -> None:
    """Its own parts still queued are cancelled; only those already uploading are waited for."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from trajflow.storage.s3 import _MultipartWriter

    release = threading.Event()
    uploaded: list[int] = []

    class Client:
        def create_multipart_upload(self, **kwargs):  # type: ignore[no-untyped-def]
            return {"UploadId": "u"}

        def upload_part(self, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs["Key"] == "slow":
                release.wait(30)
            uploaded.append(kwargs["PartNumber"])
            return {"ETag": "e"}

        def abort_multipart_upload(self, **kwargs):  # type: ignore[no-untyped-def]
            pass

        def complete_multipart_upload(self, **kwargs):  # type: ignore[no-untyped-def]
            pass

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        slow = _MultipartWriter(Client(), "b", "slow", 5 * MiB, pool=pool)
        slow.write(b"s" * 5 * MiB)  # holds the pool's one thread
        dropped = _MultipartWriter(Client(), "b", "dropped", 5 * MiB, pool=pool)
        dropped.write(b"d" * 15 * MiB)  # three parts queued behind it
        aborted = threading.Thread(target=dropped.abort)
        aborted.start()
        aborted.join(10)
        assert not aborted.is_alive()  # before the other writer's part finished
        release.set()
        slow.commit()
        assert uploaded == [1]  # none of the aborted writer's parts ever ran
    finally:
        release.set()
        pool.shutdown(wait=True)


@pytest.mark.parametrize("upload_threads", [0, 2])  # a pool of the writer's own, or the storage's
def test_a_stop_drops_an_upload_without_waiting_on_a_stalled_store(upload_threads: int) -> None:
    """A SIGTERM (Terminated) while a part's upload is stalled on a dead store (up to 9 x 60 s
    in botocore) ends the writer at once: no wait for the part, and no abort request to that
    store; the upload is left to `abort_uploads` or the bucket's lifecycle rule. The threads
    are daemons, which the process does not wait for at its exit either."""
    import threading

    from trajflow.errors import Terminated
    from trajflow.storage.s3 import S3Storage

    release = threading.Event()
    safety = threading.Timer(60, release.set)  # unblocks the stalled upload whatever happens
    safety.daemon = True
    safety.start()
    calls: list[str] = []
    uploading: list[threading.Thread] = []

    class Client:
        def create_multipart_upload(self, **kwargs):  # type: ignore[no-untyped-def]
            return {"UploadId": "u"}

        def upload_part(self, **kwargs):  # type: ignore[no-untyped-def]
            uploading.append(threading.current_thread())
            release.wait()
            return {"ETag": "e"}

        def abort_multipart_upload(self, **kwargs):  # type: ignore[no-untyped-def]
            calls.append("abort")

    storage = S3Storage("s3://bucket/p", client=Client(), part_size=5 * MiB, upload_threads=upload_threads)
    try:
        with pytest.raises(Terminated):
            with storage.writer("k") as w:
                w.write(b"x" * 5 * MiB)
                while not uploading:
                    time.sleep(0.01)
                raise Terminated(15)
        assert not release.is_set(), "the stop waited for the stalled part"
        assert calls == [] and uploading[0].daemon
    finally:
        release.set()
        safety.cancel()
    # an error that is no stop still aborts the upload, once its parts are done
    with pytest.raises(OSError):
        with storage.writer("k") as w:
            w.write(b"x" * 5 * MiB)
            raise OSError("the source failed")
    assert calls == ["abort"]
    if storage._uploads["pool"] is not None:
        storage._uploads["pool"].shutdown(wait=True)  # its threads are counted by other tests
    for thread in uploading:
        thread.join(10)
        assert not thread.is_alive()  # each ends with its part


def test_a_writer_holds_at_most_its_parts_in_flight_and_one_more() -> None:
    import threading

    from trajflow.storage.s3 import _MultipartWriter

    gate = threading.Event()
    peak = [0]

    class Client:
        def create_multipart_upload(self, **kwargs):  # type: ignore[no-untyped-def]
            return {"UploadId": "u"}

        def upload_part(self, **kwargs):  # type: ignore[no-untyped-def]
            gate.wait(30)
            return {"ETag": "e"}

        def complete_multipart_upload(self, **kwargs):  # type: ignore[no-untyped-def]
            pass

    writer = _MultipartWriter(Client(), "b", "k", 5 * MiB, concurrency=2)
    send = writer._send_part

    def counting(body: bytes) -> None:
        # parts held: those not yet uploaded, the copy being sent, and whole parts in the buffer
        peak[0] = max(peak[0], sum(not f.done() for f in writer._inflight) + 1 + len(writer._buf) // (5 * MiB))
        send(body)

    def produce() -> None:
        for _ in range(25):
            writer.write(b"x" * MiB)  # as a download's stream feeds it
        writer.commit()

    writer._send_part = counting  # type: ignore[method-assign]
    done = threading.Thread(target=produce)
    done.start()
    threading.Timer(1.0, gate.set).start()
    done.join(30)
    assert not done.is_alive() and peak[0] <= 2 + 1


def test_prefetch_is_a_hint_that_never_fails_or_changes_anything(storage):
    storage.write_bytes("a/b", b"payload")
    storage.prefetch("a/b")
    storage.prefetch("a/missing")  # the read that follows reports a missing key, not the hint
    assert storage.read_bytes("a/b") == b"payload"
    assert [o.key for o in storage.list("a/")] == ["a/b"]


class _CuttingProxy(S3Proxy):
    """Drops the connection halfway through the next `cuts` object bodies; `on_cut` runs
    after each cut (to change the object before the reader comes back)."""

    def __init__(self, upstream: str, cuts: int, on_cut=None):  # type: ignore[no-untyped-def]
        super().__init__(upstream)
        self.cuts, self.on_cut, self.ranges = cuts, on_cut, []

    def answer(self, method: str, path: str, request_headers: dict[str, str], reply: Reply) -> None:
        if method != "GET" or "list-type" in path or reply.status not in (200, 206):
            return
        self.ranges.append(request_headers.get("Range"))
        if self.cuts > 0:
            self.cuts -= 1
            reply.cut_at = len(reply.body) // 2
            if self.on_cut is not None:
                self.on_cut()


def _through(proxy: S3Proxy, bucket: str) -> S3Storage:
    return open_storage(f"s3://{bucket}/cut", endpoint=proxy.endpoint, addressing_style="path")


def test_a_body_cut_short_is_resumed_not_read_as_a_shorter_object(s3_server, s3_shared_bucket):
    data = os.urandom(3 * MiB)
    direct = open_storage(f"s3://{s3_shared_bucket}/cut", endpoint=s3_server.endpoint, addressing_style="path")
    direct.write_bytes("obj.bin", data)
    with _CuttingProxy(s3_server.endpoint, cuts=1) as proxy:
        store = _through(proxy, s3_shared_bucket)
        assert store.sha256("obj.bin") == (hashlib.sha256(data).hexdigest(), len(data))
        assert proxy.ranges == [None, f"bytes={len(data) // 2}-{len(data) - 1}"]

        proxy.cuts = 2
        with store.open_read("obj.bin") as fh:  # the way callers stream: sized reads until b""
            got = b"".join(iter(lambda: fh.read(MiB), b""))
        assert got == data

        proxy.cuts = 1
        assert store.read_range("obj.bin", 1000, 2 * MiB) == data[1000:2 * MiB]


def test_a_body_that_keeps_breaking_fails_as_transient(s3_server, s3_shared_bucket):
    from trajflow.storage.s3 import _ObjectReader

    direct = open_storage(f"s3://{s3_shared_bucket}/cut", endpoint=s3_server.endpoint, addressing_style="path")
    direct.write_bytes("flaky.bin", os.urandom(MiB))
    with _CuttingProxy(s3_server.endpoint, cuts=_ObjectReader.RESUMES + 1) as proxy:
        with pytest.raises(TransientError, match=r"cut/flaky\.bin: the connection ended at byte \d+ of 1048576 4 times") as caught:
            _through(proxy, s3_shared_bucket).read_bytes("flaky.bin")
    assert caught.value.exit_code == ExitCode.TRANSIENT
    # the store's failure, for the callers that tolerate one (the run's report read metrics.json)
    assert is_storage_error(caught.value)


def test_an_object_replaced_before_the_resume_is_not_spliced(s3_server, s3_shared_bucket):
    direct = open_storage(f"s3://{s3_shared_bucket}/cut", endpoint=s3_server.endpoint, addressing_style="path")
    direct.write_bytes("moving.bin", b"a" * MiB)
    with _CuttingProxy(s3_server.endpoint, cuts=1, on_cut=lambda: direct.write_bytes("moving.bin", b"b" * MiB)) as proxy:
        with pytest.raises(TransientError, match=r"cut/moving\.bin: the object was replaced while it was being "
                                                 r"read") as caught:
            _through(proxy, s3_shared_bucket).read_bytes("moving.bin")
    assert is_storage_error(caught.value)


class _Throttling(S3Proxy):
    """Answers every `every`-th PUT with 503 SlowDown, as S3 does under load."""

    def __init__(self, upstream: str, every: int):
        super().__init__(upstream)
        self.every, self.puts, self.throttled = every, 0, 0

    def answer(self, method: str, path: str, request_headers: dict[str, str], reply: Reply) -> None:
        if method != "PUT":
            return
        self.puts += 1
        if self.puts % self.every == 0:
            self.throttled += 1
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            reply.status, reply.headers, reply.body = 503, [("Content-Type", "application/xml")], body


class _LostReplies(S3Proxy):
    """Answers 500 to the first conditional PUT of each key after the store applied it, as a
    reply lost on the way does: the client retries what is already written. `keep_metadata`
    False: a store that keeps no x-amz-meta-* (none comes back)."""

    def __init__(self, upstream: str, keep_metadata: bool = True):
        super().__init__(upstream)
        self.lost: set[str] = set()
        self.keep_metadata = keep_metadata

    def answer(self, method: str, path: str, request_headers: dict[str, str], reply: Reply) -> None:
        if not self.keep_metadata:
            reply.headers = [(k, v) for k, v in reply.headers if not k.lower().startswith("x-amz-meta-")]
        if method == "PUT" and request_headers.get("If-None-Match") == "*" and path not in self.lost:
            self.lost.add(path)
            reply.status, reply.headers, reply.body = 500, [("Content-Type", "application/xml")], \
                b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_a_conditional_write_whose_reply_was_lost_is_still_its_writers(s3_server, monkeypatch, keep_metadata):
    """The retry meets the object its first try wrote: that is a win (the planning lease was
    taken for another pod's, and every pod waited for it to go stale), and the probe of the
    store's conditional writes is no error; another writer's object is still a loss. On a
    store that keeps no metadata the bytes tell."""
    bucket = s3_server.make_bucket()
    with _LostReplies(s3_server.endpoint, keep_metadata) as proxy:
        store = open_storage(f"s3://{bucket}/root", endpoint=proxy.endpoint, addressing_style="path")
        monkeypatch.delitem(_conditional_support, (str(store.client.meta.endpoint_url), bucket), raising=False)
        assert store._supports_conditional_put() is True
        assert store.write_if_absent("plan/lease.json", b"mine") is True
        assert store.write_if_absent("plan/lease.json", b"them") is False  # as long: the bytes are compared
        assert store.read_bytes("plan/lease.json") == b"mine"
        assert len(proxy.lost) == 2  # the probe's first PUT and the lease's


def test_throttled_writes_are_retried_without_client_side_rate_limiting(s3_server, s3_shared_bucket):
    with _Throttling(s3_server.endpoint, every=5) as proxy:
        store = _through(proxy, s3_shared_bucket)
        for i in range(20):
            store.write_bytes(f"t/{i:02d}", b"x")
        assert proxy.throttled >= 4 and proxy.puts == 20 + proxy.throttled
        assert [info.key for info in store.list("t/")] == [f"t/{i:02d}" for i in range(20)]
    # botocore's adaptive mode, once throttled, slows every later request of the client
    # (300 small PUTs took 20 s instead of 1 s with one request in 50 throttled)
    assert store.client.meta.config.retries["mode"] == "standard"


def test_an_s3_error_names_the_object_or_prefix_it_was_about(s3_server, s3_shared_bucket):
    """botocore's own text names the operation only, so a stage's storage error said that a
    PutObject failed, not which object."""
    with _Throttling(s3_server.endpoint, every=1) as proxy:
        store = open_storage(f"s3://{s3_shared_bucket}/named", endpoint=proxy.endpoint, addressing_style="path",
                             attempts=0)
        with pytest.raises(Exception, match=re.escape(
                "An error occurred (SlowDown) when calling the PutObject operation (reached max retries: 0): Please "
                f"reduce your request rate. (s3://{s3_shared_bucket}/named/resampled/00003.safetensors)")):
            store.write_bytes("resampled/00003.safetensors", b"x")
        assert store.stat("absent") is None  # a 404 is still told by its code


def test_an_s3_timeout_or_dropped_connection_surfaces_as_itself(s3_storage, monkeypatch):
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    for error in (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
                  ConnectionClosedError(endpoint_url="http://127.0.0.1:9")):
        def fail(**_):
            raise error
        monkeypatch.setattr(s3_storage.client, "head_object", fail)
        with pytest.raises(type(error)):  # not AttributeError: these carry no response
            s3_storage.stat("a")


def test_an_s3_endpoint_that_never_answers_is_told_at_each_retry(caplog):
    """A store that accepts connections and never answers (or a policy dropping packets)
    would otherwise mean attempts x timeout seconds of silence per call."""
    import logging
    import socket

    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    from trajflow.storage.s3 import make_client

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = make_client(endpoint, timeout=0.3, attempts=3, anonymous=True)  # nothing to sign with here
        with caplog.at_level(logging.WARNING, logger="trajflow.storage.s3"):
            with pytest.raises((ReadTimeoutError, ConnectTimeoutError)):
                client.head_bucket(Bucket="b")
    told = [r.getMessage() for r in caplog.records]
    # botocore's max_attempts counts the retries: four attempts in all, each retry told once
    assert [t.rsplit("(", 1)[-1] for t in told] == ["attempt 2 of 4)", "attempt 3 of 4)", "attempt 4 of 4)"], told
    assert told[0].startswith(f"{endpoint} did not answer (")
    assert client.meta.config.connect_timeout == 0.3 and make_client(endpoint, anonymous=True).meta.config.connect_timeout == 10.0
    from trajflow.errors import InvalidURI

    with pytest.raises(InvalidURI, match="S3 endpoint 'http://bad host:9000': Invalid endpoint"):  # not a ValueError traceback
        make_client("http://bad host:9000")
    # presigned links (how S3 sources are fetched) are SigV4 in every region: botocore's own
    # choice is SigV2 in us-east-1, which R2, B2 and newer AWS buckets refuse
    signed = make_client(endpoint, credentials={"aws_access_key_id": "AKIAX", "aws_secret_access_key": "s"})
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in signed.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})


def test_a_manifest_opening_with_a_closer_is_named_corrupt(tmp_path):
    """An IndexError would get past the callers' `except ValueError` as a traceback."""
    from trajflow.storage import LocalStorage, manifest_key, read_manifest_fields

    storage = LocalStorage(tmp_path)
    storage.write_bytes(manifest_key("download", 0), b"]")
    with pytest.raises(ValueError, match="corrupt manifest: unexpected ']'"):
        read_manifest_fields(storage, "download", 0)


@pytest.mark.parametrize("upload_threads", [0, 2])
def test_an_error_aborts_the_upload_only_once_its_parts_are_done(upload_threads):
    """A part still uploading after the abort would be stored, and billed, for good."""
    calls: list[str] = []

    class Client:
        def create_multipart_upload(self, **kw):
            return {"UploadId": "u"}

        def upload_part(self, **kw):
            time.sleep(0.3)
            calls.append("part")
            return {"ETag": "e"}

        def abort_multipart_upload(self, **kw):
            calls.append("abort")

    storage = S3Storage("s3://bucket/p", client=Client(), part_size=5 << 20, upload_threads=upload_threads)
    with pytest.raises(OSError):
        with storage.writer("k") as w:
            w.write(b"x" * (5 << 20))
            raise OSError("the source failed")
    assert calls == ["part", "abort"]
