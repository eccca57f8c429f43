"""The downloader with real S3 (SeaweedFS on 127.0.0.1): S3 sources, an S3 run root, ETag
verification, per-source credentials, re-sharding with server-side copies."""
from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path
from typing import Any, Iterator

import pytest
from download_helpers import FaultyServer, payload, visible_files
from s3_proxy import Reply, S3Proxy
from test_download_http import make_config

from trajflow.download.shard import ShardDownloader
from trajflow.download.verify import read_record
from trajflow.errors import ConfigError, ExitCode
from trajflow.plan import shard_items
from trajflow.storage import LocalStorage, read_manifest

MiB = 1 << 20


@pytest.fixture
def server() -> Iterator[FaultyServer]:
    with FaultyServer(stall_s=2.5) as srv:
        yield srv


@pytest.fixture
def source_bucket(s3_server: Any) -> tuple[str, dict[str, bytes]]:
    """A bucket with single-part and multipart objects under data/, and one outside it."""
    from boto3.s3.transfer import TransferConfig

    client = s3_server.client()
    bucket = s3_server.make_bucket("src")
    objects = {
        "data/a.parquet": payload(200_000, seed=1),
        "data/sub/b.parquet": payload(300_000, seed=2),
        "data/sub/skip.tmp": payload(10, seed=3),
        "data/empty.bin": b"",
        "other/outside.bin": payload(10, seed=4),
    }
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    big = payload(12 * MiB + 7, seed=5)
    client.upload_fileobj(io.BytesIO(big), bucket, "data/big.bin",
                          Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    objects["data/big.bin"] = big
    return bucket, objects


def s3_source(s3_server: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    return {"type": "s3", "name": "lake", "url": f"s3://{bucket}/data", "endpoint": s3_server.endpoint, **extra}


def test_s3_source_to_a_filesystem_root(s3_server: Any, source_bucket: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    bucket, objects = source_bucket
    config = make_config([s3_source(s3_server, bucket, exclude=["*.tmp"])])
    summary = ShardDownloader(LocalStorage(tmp_path), config, 0, 1).run()
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    files = visible_files(tmp_path / "raw" / "00000")
    expected = {f"lake/{k[len('data/'):]}": v for k, v in objects.items() if k.startswith("data/") and not k.endswith(".tmp")}
    assert files == expected
    checks = {r.item.key: r.record.checks for r in summary.results}  # type: ignore[union-attr]
    assert "md5:s3-etag" in checks["lake/a.parquet"]  # single-part ETag = MD5 of the content
    assert not any(c.startswith("md5") for c in checks["lake/big.bin"])  # a multipart ETag is not
    # a rerun lists nothing and fetches nothing
    again = ShardDownloader(LocalStorage(tmp_path), config, 0, 1).run()
    assert again.already_done and again.bytes_received == 0


def test_bytes_that_do_not_match_the_etag_are_fetched_again(s3_server: Any, source_bucket: tuple[str, dict[str, bytes]],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes altered on the way (one flipped bit) fail the ETag's MD5 and never land."""
    from trajflow.download import sources

    bucket, objects = source_bucket
    original = sources.S3SourceRuntime.open
    opened = []

    def corrupting_open(self: Any, item: Any, start: int, end: Any, validator: Any) -> Any:
        body = original(self, item, start, end, validator)
        opened.append(item.key)
        if len(opened) == 1:
            read, state = body.read, {"flipped": False}

            def flipped(n: int) -> bytes:
                data = read(n)
                if data and not state["flipped"]:
                    state["flipped"] = True
                    return bytes([data[0] ^ 1]) + data[1:]
                return data

            body.read = flipped
        return body

    monkeypatch.setattr(sources.S3SourceRuntime, "open", corrupting_open)
    config = make_config([s3_source(s3_server, bucket, include=["a.parquet"])])
    summary = ShardDownloader(LocalStorage(tmp_path), config, 0, 1).run()
    assert summary.exit_code == 0
    assert summary.failures_by_reason == {"checksum": 1}
    assert opened == ["lake/a.parquet", "lake/a.parquet"]
    assert visible_files(tmp_path / "raw" / "00000") == {"lake/a.parquet": objects["data/a.parquet"]}


def test_per_source_credentials_from_prefixed_environment(s3_server: Any, source_bucket: tuple[str, dict[str, bytes]],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket, _ = source_bucket
    # the default chain now holds wrong keys: only the prefixed ones can work
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    source = s3_source(s3_server, bucket, credentialsEnvPrefix="LAKE_", include=["a.parquet"])
    with pytest.raises(ConfigError, match="LAKE_AWS_ACCESS_KEY_ID"):
        ShardDownloader(LocalStorage(tmp_path), make_config([source]), 0, 1)
    monkeypatch.setenv("LAKE_AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("LAKE_AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    summary = ShardDownloader(LocalStorage(tmp_path), make_config([source]), 0, 1).run()
    assert summary.exit_code == 0 and summary.count("fetched") == 1
    # without the prefix the wrong default keys are used and the listing is refused
    with pytest.raises(ConfigError, match="listing"):
        ShardDownloader(LocalStorage(tmp_path / "other"), make_config([s3_source(s3_server, bucket)]), 0, 1).run()


def test_missing_bucket_is_a_configuration_error(s3_server: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NoSuchBucket|404"):
        ShardDownloader(LocalStorage(tmp_path), make_config([s3_source(s3_server, "no-such-bucket-here")]), 0, 1).run()


def test_s3_run_root_streams_verified_objects_and_reshards_with_server_side_copies(
    s3_storage: Any, server: FaultyServer
) -> None:
    big = payload(12 * MiB + 5, seed=8)
    text = b"gene\tvalue\n" * 5000
    items = {"/big.bin": big, "/table.tsv.gz": gzip.compress(text, mtime=0)}
    items.update({f"/f{i}.bin": payload(1000 * (i + 1), seed=20 + i) for i in range(6)})
    urls = [server.add(path, data) for path, data in items.items()]
    server.script("/big.bin", "ok", "reset", "truncate")  # faults in the middle of parts
    server.script("/f0.bin", "503")
    config = make_config([{"type": "https", "name": "web", "urls": urls}], gunzip=True)

    summary = ShardDownloader(s3_storage, config, 0, 1).run()
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    listed = {info.key: info.size for info in s3_storage.list("raw/")}
    expected_keys = {f"raw/00000/web{p}" for p in items if not p.endswith(".gz")} | {"raw/00000/web/table.tsv"}
    assert set(listed) == expected_keys | {"raw/_done/00000.json"}  # no temporaries, records hidden
    assert s3_storage.read_bytes("raw/00000/web/big.bin") == big
    assert s3_storage.read_bytes("raw/00000/web/table.tsv") == text
    record = read_record(s3_storage, "web/table.tsv.gz")
    assert record is not None and record.location == "raw/00000/web/table.tsv"
    assert record.sha256 == hashlib.sha256(text).hexdigest()

    # re-shard 1 -> 3: every item is reused by a server-side copy, none fetched again
    server.clear_log()
    for shard in range(3):
        resharded = ShardDownloader(s3_storage, config, shard, 3).run()
        assert resharded.exit_code == 0
        assert resharded.count("fetched") == 0
    assert server.requests() == []
    plan = __import__("json").loads(s3_storage.read_bytes("plan/download.json"))
    for shard in range(3):
        manifest = read_manifest(s3_storage, "download", shard)
        assert manifest is not None and manifest["shards"] == 3
        assert {e["item"] for e in manifest["items"]} == {i.key for i in shard_items(s3_storage, plan, shard)}
        for entry in manifest["items"]:
            assert hashlib.sha256(s3_storage.read_bytes(entry["key"])).hexdigest() == entry["sha256"]
    # moved, not copied: each item lies in exactly one shard directory
    data_keys = sorted(i.key for i in s3_storage.list("raw/") if not i.key.startswith("raw/_done/"))
    manifest_keys = sorted(e["key"] for s in range(3) for e in read_manifest(s3_storage, "download", s)["items"])  # type: ignore[index]
    assert data_keys == manifest_keys


def test_early_bytes_of_all_items_together_stay_bounded_when_the_store_is_slower_than_the_source(
        s3_storage: Any, server: FaultyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts ahead of each item's frontier wait in memory; with every item in flight doing so,
    a pod with a fast source and a slow store ran past its memory limit."""
    import threading
    import time

    from trajflow.download import transfer

    files = {f"/f{i}.bin": payload(40 * MiB, seed=30 + i) for i in range(6)}  # 8 parts of 5 MiB each
    urls = [server.add(path, data) for path, data in files.items()]
    emit = transfer.StreamSink._emit

    def slow_store(self: Any, data: bytes) -> None:
        time.sleep(len(data) / (64 * MiB))  # the store takes 64 MiB/s; the source serves far faster
        emit(self, data)

    monkeypatch.setattr(transfer.StreamSink, "_emit", slow_store)
    peak, lock, downloader = [0], threading.Lock(), None
    deliver = transfer.ItemTransfer._deliver

    def measured(self: Any, part: Any, data: bytes) -> None:
        deliver(self, part, data)
        with lock:
            early = sum(len(block) for t in downloader.scheduler.in_progress() for p in t.parts for block in p.buffer)
            peak[0] = max(peak[0], early)

    monkeypatch.setattr(transfer.ItemTransfer, "_deliver", measured)
    config = make_config([{"type": "https", "name": "web", "urls": urls}], concurrency=4, timeoutSeconds=30.0)
    downloader = ShardDownloader(s3_storage, config, 0, 1)
    summary = downloader.run()
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert all(s3_storage.read_bytes(f"raw/00000/web{path}") == data for path, data in files.items())
    # at most concurrency parts' worth, and the parts that were running when that was reached
    assert 0 < peak[0] <= (4 + 3) * 5 * MiB, peak[0] / MiB


def test_s3_run_root_never_shows_an_unverified_object(s3_storage: Any, server: FaultyServer) -> None:
    data = payload(9 * MiB, seed=11)
    url = server.add("/x.bin", data)
    source = {"type": "https", "name": "web", "urls": [{"url": url, "sha256": "0" * 64}]}
    summary = ShardDownloader(s3_storage, make_config([source], retries={"attempts": 2, "backoffSeconds": 0.01}), 0, 1).run()
    assert summary.exit_code == ExitCode.PERMANENT
    assert [i.key for i in s3_storage.list("raw/")] == []
    client = s3_storage.client
    uploads = client.list_multipart_uploads(Bucket=s3_storage.bucket, Prefix=f"{s3_storage.prefix}/").get("Uploads", [])
    assert uploads == []  # the aborted upload leaves nothing behind


def test_settings_that_may_need_more_memory_than_the_pod_has_are_said_at_the_start(
        s3_storage: Any, server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An OOM kill logs nothing: early parts and uploads waiting in memory on an object-store
    run root are weighed against the pod's limit first (a filesystem root writes them out)."""
    import logging

    from trajflow.download import shard as shard_module

    monkeypatch.setattr(shard_module, "memory_limit", lambda: 1 << 30)
    sources = [{"type": "https", "name": "web", "urls": [server.add("/a.bin", payload(1000, seed=1))]}]
    config = make_config(sources, concurrency=8, partSizeMib=64)
    for root in (s3_storage, LocalStorage(tmp_path)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trajflow.download"):
            assert ShardDownloader(root, config, 0, 1).run().exit_code == ExitCode.OK
        said = [r.getMessage() for r in caplog.records if "or more in memory" in r.getMessage()]
        assert said == ([] if isinstance(root, LocalStorage) else [
            "downloader.config.concurrency 8 and partSizeMib 64 may hold 1.6 GiB or more in memory on an object-store "
            "run root, more than the 1.0 GiB this pod may use: lower them, or raise downloader.resources.limits.memory"])
    with caplog.at_level(logging.WARNING, logger="trajflow.download"):
        caplog.clear()
        s3_storage.delete("raw/_done/00000.json")
        ShardDownloader(s3_storage, make_config(sources), 0, 1).run()
    assert not any("or more in memory" in r.getMessage() for r in caplog.records)  # the defaults fit 1 GiB


def test_a_run_root_failing_a_read_again_and_again_is_retryable(s3_storage: Any) -> None:
    """The storage layer's own account of a store cutting a read short four times: exit 4
    (retried), as the store's own errors, not 1 (an unexpected error)."""
    from trajflow.errors import StorageUnavailable

    config = make_config([{"type": "https", "name": "web", "urls": ["https://example.invalid/a"]}])
    downloader = ShardDownloader(s3_storage, config, 0, 1)
    error = downloader._root_error(StorageUnavailable("plan/download.json: the connection ended at byte 7 of 9 4 times"),
                                   "cannot read or write the plan")
    assert error.exit_code == ExitCode.TRANSIENT and "the connection ended" in str(error)


def test_s3_run_root_starts_a_broken_stream_over_when_the_source_ignores_ranges(s3_storage: Any,
                                                                               server: FaultyServer) -> None:
    data = payload(3 * MiB, seed=12)
    url = server.add("/norange.bin", data, accept_ranges=False)
    server.script("/norange.bin", "truncate")
    summary = ShardDownloader(s3_storage, make_config([{"type": "https", "name": "web", "urls": [url]}]), 0, 1).run()
    assert summary.exit_code == ExitCode.OK, [r.error for r in summary.failed]
    with s3_storage.open_read("raw/00000/web/norange.bin") as fh:
        assert fh.read() == data  # the aborted upload's half is not part of it
    assert [r.range for r in server.requests("/norange.bin")] == ["", ""]


def test_credentials_the_run_root_refuses_are_a_config_error(s3_server: Any, s3_shared_bucket: str,
                                                             server: FaultyServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 (the Job fails) as in `trajflow wait`, not an unexpected error retried in vain."""
    from trajflow.storage import open_storage

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    root = open_storage(f"s3://{s3_shared_bucket}/badcreds", endpoint=s3_server.endpoint, region=s3_server.region,
                        addressing_style="path")
    config = make_config([{"type": "https", "name": "web", "urls": [server.add("/x.bin", payload(10))]}])
    with pytest.raises(ConfigError, match=f"cannot read s3://{s3_shared_bucket}/badcreds: .*check the credentials") as caught:
        ShardDownloader(root, config, 0, 1).run()
    assert caught.value.exit_code == ExitCode.CONFIG


def test_read_only_credentials_on_the_run_root_are_a_config_error_naming_the_write(
        s3_server: Any, s3_shared_bucket: str, server: FaultyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.storage import open_storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.reader_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.reader_secret)
    root = open_storage(f"s3://{s3_shared_bucket}/readonly", endpoint=s3_server.endpoint, region=s3_server.region,
                        addressing_style="path")
    config = make_config([{"type": "https", "name": "web", "urls": [server.add("/x.bin", payload(10))]}])
    with pytest.raises(ConfigError) as caught:
        ShardDownloader(root, config, 0, 1).run()
    assert caught.value.exit_code == ExitCode.CONFIG
    message = str(caught.value)
    assert message.startswith(f"cannot write s3://{s3_shared_bucket}/readonly: AccessDenied (")
    assert "the credentials need s3:PutObject (refused here) among s3:ListBucket, s3:GetObject, s3:PutObject, " \
        "s3:DeleteObject, s3:AbortMultipartUpload on the run root's bucket" in message


class _EtagRewritingProxy(S3Proxy):
    """A store whose GET and HEAD give an object another ETag than its listing does (and
    judge If-Match by that one), as some S3-compatible gateways do."""

    def upstream_headers(self, headers: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in headers.items() if k.lower() != "if-match"}

    def answer(self, method: str, path: str, request_headers: dict[str, str], reply: Reply) -> None:
        if method not in ("GET", "HEAD") or "list-type" in path or reply.status not in (200, 206):
            return
        etag = '"' + dict((k.lower(), v) for k, v in reply.headers)["etag"].strip('"')[::-1] + '"'
        reply.headers = [(k, etag if k.lower() == "etag" else v) for k, v in reply.headers]
        if_match = request_headers.get("If-Match")
        if if_match is not None and if_match != etag:
            reply.status, reply.headers, reply.body = 412, [], b""


def test_a_store_whose_get_etag_differs_from_its_listing_is_pinned_by_last_modified(
        s3_server: Any, tmp_path: Path) -> None:
    client = s3_server.client()
    bucket = s3_server.make_bucket("gateway")
    body = payload(100_000, seed=7)
    client.put_object(Bucket=bucket, Key="data/obj.bin", Body=body)
    with _EtagRewritingProxy(s3_server.endpoint) as proxy:
        config = make_config([s3_source(s3_server, bucket, endpoint=proxy.endpoint, verifyEtag=False)])
        summary = ShardDownloader(LocalStorage(tmp_path), config, 0, 1).run()
        assert summary.exit_code == 0, [r.error for r in summary.failed]
        assert visible_files(tmp_path / "raw" / "00000") == {"lake/obj.bin": body}

        # an object really replaced after planning (same size, later mtime) still fails
        import time

        time.sleep(1.1)  # S3 modification times have one-second resolution
        client.put_object(Bucket=bucket, Key="data/new.bin", Body=payload(1000, seed=8))
        grown = make_config([s3_source(s3_server, bucket, endpoint=proxy.endpoint, verifyEtag=False)],
                            planGeneration="2")
        ShardDownloader(LocalStorage(tmp_path), grown, 0, 1).plan()
        time.sleep(1.1)
        client.put_object(Bucket=bucket, Key="data/new.bin", Body=payload(1000, seed=9))
        replaced = ShardDownloader(LocalStorage(tmp_path), grown, 0, 1).run()
        assert replaced.exit_code == ExitCode.TRANSIENT
        (failed,) = replaced.failed
        assert failed.item.key == "lake/new.bin" and failed.reason == "changed"


def test_keys_that_cannot_be_paths_are_named_not_dropped(s3_server: Any, tmp_path: Path) -> None:
    client = s3_server.client()
    bucket = s3_server.make_bucket("odd")
    # (SeaweedFS itself folds backslashes and empty segments into '/'; a reserved segment it keeps)
    for key in ("data/ok.bin", "data/.trajflow-tmp/part.bin", "data/line\nbreak.bin"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    with pytest.raises(ConfigError, match=r"1 object\(s\) .* cannot be paths .*'data/.trajflow-tmp/part.bin'.*`exclude`"):
        ShardDownloader(LocalStorage(tmp_path), make_config([s3_source(s3_server, bucket)]), 0, 1).run()
    summary = ShardDownloader(LocalStorage(tmp_path),
                              make_config([s3_source(s3_server, bucket, exclude=[".trajflow-*/**"])]), 0, 1).run()
    assert summary.exit_code == 0
    assert sorted(r.item.key for r in summary.results) == ["lake/line\nbreak.bin", "lake/ok.bin"]  # a newline is kept


def test_filters_apply_to_a_url_naming_one_object_and_never_reach_its_neighbour(s3_server: Any, tmp_path: Path) -> None:
    client = s3_server.client()
    bucket = s3_server.make_bucket("single")
    for key, body in {"data": b"the object next to the prefix", "data/x.bin": b"x", "solo.bin": b"solo"}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)

    def fetched(url: str, **filters: Any) -> dict[str, bytes]:
        root = tmp_path / url.rsplit("/", 1)[-1] / str(len(filters))
        source = {"type": "s3", "name": "lake", "url": f"s3://{bucket}/{url}", "endpoint": s3_server.endpoint, **filters}
        try:
            assert ShardDownloader(LocalStorage(root), make_config([source]), 0, 1).run().exit_code == 0
        except ConfigError as exc:
            assert "the sources list no items" in str(exc)
            return {}
        return visible_files(root / "raw" / "00000")

    # objects under data/, none kept by the filter: not the object `data` instead
    assert fetched("data", include=["*.parquet"]) == {}
    assert fetched("data") == {"lake/x.bin": b"x"}
    assert fetched("solo.bin") == {"lake/solo.bin": b"solo"}
    assert fetched("solo.bin", exclude=["*.bin"]) == {}


@pytest.mark.parametrize("prefix, as_a_url", [("ds#v2", "ds"), ("q?x=1", "q")])
def test_a_source_prefix_with_hash_or_question_mark_is_taken_literally(s3_server: Any, tmp_path: Path,
                                                                       prefix: str, as_a_url: str) -> None:
    client = s3_server.client()
    bucket = s3_server.make_bucket("lit")
    client.put_object(Bucket=bucket, Key=f"{prefix}/wanted.bin", Body=b"wanted")
    client.put_object(Bucket=bucket, Key=f"{as_a_url}/other.bin", Body=b"other")  # what a URL parser lists
    source = {"type": "s3", "name": "lake", "url": f"s3://{bucket}/{prefix}/", "endpoint": s3_server.endpoint}
    summary = ShardDownloader(LocalStorage(tmp_path), make_config([source]), 0, 1).run()
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert visible_files(tmp_path / "raw" / "00000") == {"lake/wanted.bin": b"wanted"}


def test_a_source_store_that_drops_connections_or_refuses_anonymous_callers_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing errors without a response (a closed connection) are transient, not an
    internal error blamed on the plan; no credentials at all is the config's (exit 2)."""
    import socket
    import threading

    from trajflow.errors import TransientError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def close_every_connection() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=close_every_connection, daemon=True).start()
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    source = {"type": "s3", "name": "remote", "url": "s3://bucket/prefix", "endpoint": endpoint}
    try:
        with pytest.raises(TransientError, match=r"source 'remote': listing s3://bucket/prefix failed: "):
            ShardDownloader(LocalStorage(tmp_path / "a"), make_config([{**source, "anonymous": True}]), 0, 1).plan()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with pytest.raises(ConfigError, match=r"listing s3://bucket/prefix failed: no usable credentials"):
            ShardDownloader(LocalStorage(tmp_path / "b"), make_config([source]), 0, 1).plan()
    finally:
        listener.close()


def test_a_listing_answered_by_a_web_page_is_no_empty_source(tmp_path: Path) -> None:
    """A proxy or captive portal answering the listing with an HTML page (status 200) was
    read as a source with no objects: the run went on without it, and its plan kept it out."""
    from test_download_http import _Handler, _hub

    from trajflow.errors import TransientError

    class Portal(_Handler):
        def do_GET(self) -> None:
            page = b"<html><body>Please sign in to the guest network</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    with _hub(Portal) as endpoint:
        source = {"type": "s3", "name": "remote", "url": "s3://bucket/prefix", "anonymous": True, "endpoint": endpoint}
        with pytest.raises(TransientError, match=r"source 'remote': listing s3://bucket/prefix got an answer that is "
                                                 r"no S3 listing \(it names no bucket\)"):
            ShardDownloader(LocalStorage(tmp_path), make_config([source]), 0, 1).plan()


def test_a_server_side_copy_of_another_size_than_recorded_is_refused(s3_storage: Any) -> None:
    """A re-shard moves verified objects by server-side copy; a copy that does not come out
    at the recorded size is not trusted (and the source object is kept)."""
    from trajflow.download.transfer import relocate
    from trajflow.download.verify import Record

    s3_storage.write_bytes("raw/00001/ds/a.bin", b"ten bytes!")
    record = Record("ds/a.bin", "f", "raw/00001/ds/a.bin", 20, "0" * 64, 20, "0" * 64)
    with pytest.raises(ValueError, match="did not produce 20 bytes"):
        relocate(s3_storage, "raw/00001/ds/a.bin", "raw/00000/ds/a.bin", record)
    assert s3_storage.read_bytes("raw/00001/ds/a.bin") == b"ten bytes!"
    assert not s3_storage.exists("raw/00000/ds/a.bin")


def test_directory_markers_are_neither_source_items_nor_run_root_objects(s3_server: Any, s3_storage: Any,
                                                                          tmp_path: Path) -> None:
    """Consoles and some tools create `dir/` objects (zero bytes, key ending in '/') for
    folders; S3 lists them. They are no file to fetch (nor keys that cannot be paths), and
    no object of the run root."""
    client = s3_server.client()
    bucket = s3_server.make_bucket("markers")
    for key, body in {"data/": b"", "data/sub/": b"", "data/sub/x.bin": b"x"}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    _, items = ShardDownloader(LocalStorage(tmp_path), make_config([s3_source(s3_server, bucket)]), 0, 1).plan()
    assert [i.key for i in items] == ["lake/sub/x.bin"]

    s3_storage.write_bytes("raw/y.bin", b"y")
    s3_storage.client.put_object(Bucket=s3_storage.bucket, Key=f"{s3_storage.prefix}/raw/dir/", Body=b"")
    assert [i.key for i in s3_storage.list("raw/")] == ["raw/y.bin"]


def test_the_download_command_shares_upload_threads_among_items_on_an_s3_run_root(
        s3_server: Any, s3_shared_bucket: str, server: FaultyServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads (a pod's process count) and connections stay bounded by the concurrency, not
    by the items in flight times each one's uploads; every multipart object arrives whole."""
    import threading

    import yaml

    from trajflow.cli import main
    from trajflow.storage import open_storage, s3

    pools: list[int] = []
    make_client = s3.make_client

    def recording(**kwargs: Any) -> Any:
        pools.append(kwargs.get("max_pool", 32))
        return make_client(**kwargs)

    peak = [0]
    send_part = s3._MultipartWriter._send_part
    earlier = set(threading.enumerate())  # other tests' storages, not yet collected

    def counting(self: Any, body: bytes) -> None:
        send_part(self, body)
        peak[0] = max(peak[0], sum(t.name.startswith("s3-part") for t in set(threading.enumerate()) - earlier))

    monkeypatch.setattr(s3, "make_client", recording)
    monkeypatch.setattr(s3._MultipartWriter, "_send_part", counting)
    items = {f"/big{i}.bin": payload(33 * MiB + i, seed=30 + i) for i in range(6)}  # 3 parts each
    prefix = f"pool-{tmp_path.name}"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "global": {"runId": "pool", "storage": {"type": "s3", "s3": {
            "bucket": s3_shared_bucket, "prefix": prefix, "endpoint": s3_server.endpoint,
            "region": s3_server.region, "addressingStyle": "path"}}},
        "config": {"sources": [{"type": "https", "name": "web", "urls": [server.add(p, d) for p, d in items.items()]}],
                   "concurrency": 4},
    }))
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setenv("TRAJFLOW_SHARDS", "1")
    assert main(["download", "--config", str(config)]) == 0
    assert pools and pools[0] >= 4 + 4  # a connection per worker request and per shared upload thread
    assert 0 < peak[0] <= 4  # not 4 per item in flight
    root = open_storage(f"s3://{s3_shared_bucket}/{prefix}/pool", endpoint=s3_server.endpoint,
                        region=s3_server.region, addressing_style="path")
    for path, data in items.items():
        assert root.read_bytes(f"raw/00000/web{path}") == data


def _uploads(storage: Any) -> list[str]:
    listed = storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=f"{storage.prefix}/")
    return sorted(u["Key"][len(storage.prefix) + 1:] for u in listed.get("Uploads", []))


def test_a_sigterm_aborts_the_uploads_in_flight(s3_server: Any, s3_storage: Any, server: FaultyServer,
                                                tmp_path: Path) -> None:
    """A stopped pod's workers end their items, which aborts their multipart uploads: left,
    an upload is never listed as an object but is stored (and billed) until a lifecycle rule,
    which the bucket may not have, aborts it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    server.rate_bytes_per_s = 2 * MiB  # the upload begins after 8 s, the item would take 24 s
    url = server.add("/slow.bin", payload(48 * MiB, seed=3))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "global": {"runId": "sigterm", "storage": {"type": "s3", "s3": {
            "bucket": s3_storage.bucket, "prefix": s3_storage.prefix, "endpoint": s3_server.endpoint,
            "region": s3_server.region, "addressingStyle": "path"}}},
        "config": {"sources": [{"type": "https", "name": "web", "urls": [url]}], "timeoutSeconds": 5},
    }))
    env = {**os.environ, "JOB_COMPLETION_INDEX": "0", "TRAJFLOW_SHARDS": "1", "TRAJFLOW_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "trajflow.cli", "download", "--config", str(config)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = s3_storage.child("sigterm")
    try:
        deadline = time.monotonic() + 30
        while not _uploads(root) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert _uploads(root) == ["raw/00000/web/slow.bin"], "no upload was in flight to stop"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.TRANSIENT and "stopped by signal" in stderr, stderr[-2000:]
    assert root.stat("raw/00000/web/slow.bin") is None  # stopped, not finished
    assert _uploads(root) == []


def test_a_finished_shard_aborts_the_uploads_killed_runs_left(s3_storage: Any, server: FaultyServer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGKILL leaves its uploads behind: the shard, once done, aborts those older than an
    hour in its directory (shard 0: also in those of shard numbers the run no longer has)."""
    from trajflow.download import shard as shard_module

    client = s3_storage.client
    for key in ("raw/00000/web/killed.bin", "raw/00001/web/other-shard.bin", "raw/00003/web/gone-shard.bin",
                "resampled/other-stage.safetensors"):
        client.create_multipart_upload(Bucket=s3_storage.bucket, Key=f"{s3_storage.prefix}/{key}")
    url = server.add("/a.bin", payload(1000, seed=1))
    config = make_config([{"type": "https", "name": "web", "urls": [url]}])
    summary = ShardDownloader(s3_storage, config, 0, 2).run()
    assert summary.exit_code == 0
    assert len(_uploads(s3_storage)) == 4  # younger than an hour: maybe a live writer's
    monkeypatch.setattr(shard_module, "STALE_UPLOAD_S", 0.0)
    assert read_manifest(s3_storage, "download", 0) is not None
    s3_storage.delete("raw/_done/00000.json")  # the shard runs again
    assert ShardDownloader(s3_storage, config, 0, 2).run().exit_code == 0
    assert _uploads(s3_storage) == ["raw/00001/web/other-shard.bin", "resampled/other-stage.safetensors"]
