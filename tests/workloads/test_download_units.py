"""Downloader pieces on their own: config validation, globs, catalog expansion, plan
generations, failure classification, backoff, checksum headers, gunzip, progress maths."""
from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from trajflow.config.download import CatalogSource, DownloadConfig
from trajflow.download.failures import Backoff, FetchError, Kind, call_with_retries, classify_status, parse_retry_after
from trajflow.download.http import Validator, parse_content_range
from trajflow.download.progress import RateMeter, eta_seconds, human_bytes, human_duration
from trajflow.download.shard import check_destinations, dest_key
from trajflow.download.sources import PathFilter, catalog_entries
from trajflow.download.transfer import FileSink, Gunzip, _contiguous, boot_id
from trajflow.download.verify import Digests, Expected, header_checksums, item_fingerprint, s3_etag_md5
from trajflow.errors import ConfigError, TransientError
from trajflow.plan import Item


def cfg(**doc: Any) -> DownloadConfig:
    return DownloadConfig.model_validate(doc)


HTTPS = {"type": "https", "name": "web", "urls": ["https://example.org/a.bin"]}


# ---- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"sources": [HTTPS, {**HTTPS, "urls": ["https://example.org/b"]}]}, "two sources are named 'web'"),
        ({"sources": [{**HTTPS, "urls": ["ftp://example.org/a"]}]}, "String should match pattern"),
        ({"sources": [{**HTTPS, "urls": [{"url": "https://x.org/a", "path": "../escape"}]}]}, "'..'"),
        ({"sources": [{**HTTPS, "urls": [{"url": "https://x.org/a", "sha256": "abc"}]}]}, "sha256"),
        ({"sources": [{**HTTPS, "authTokenEnv": "not a name"}]}, "authTokenEnv"),
        ({"sources": [{"type": "catalog", "name": "x", "urlTemplate": "https://h/{cohort}/{oops}", "cohorts": ["A"],
                       "categories": {"c": "f"}}]}, "unknown placeholder"),
        ({"sources": [{"type": "catalog", "name": "x", "urlTemplate": "https://h/{file}", "cohorts": ["A"],
                       "categories": {"c": "f"}}]}, "needs {cohort}"),
        ({"sources": [{"type": "catalog", "name": "x", "urlTemplate": "https://h/{cohort}/{file}", "cohorts": ["A/B"],
                       "categories": {"c": "f"}}]}, "plain name"),
        ({"sources": [{"type": "catalog", "name": "x", "urlTemplate": "https://h/{cohort}/{file}", "cohorts": ["A"],
                       "categories": {"c": "{sample}"}}]}, "may only use"),
        ({"sources": [{"type": "catalog", "name": "x", "urlTemplate": "https://h/{cohort}/{file}", "cohorts": ["A"],
                       "categories": {"c": "f"}, "checksums": {"A/f": "xyz"}}]}, "lowercase hex"),
        ({"sources": [{"type": "s3", "name": "s", "url": "s3://b/p", "credentialsEnvPrefix": "has space"}]}, "credentialsEnvPrefix"),
        ({"sources": [HTTPS], "partSizeMib": 2}, "partSizeMib"),
        ({"sources": [HTTPS], "planGeneration": "a/b"}, "planGeneration"),
        ({"sources": [{**HTTPS, "name": "../x"}]}, "name"),
    ],
)
def test_bad_configuration_is_rejected_with_the_key_named(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        cfg(**doc)
    assert message in str(info.value)


def test_schema_documents_the_downloader_fields() -> None:
    from trajflow.config.cli import model_schema

    schema = model_schema(DownloadConfig)
    props = schema["properties"]
    for key in ("sources", "concurrency", "partSizeMib", "multipartThresholdMib", "gunzip", "planGeneration",
                "progressIntervalSeconds"):
        assert key in props and props[key].get("description"), key
    text = str(schema)
    assert "credentialsEnvPrefix" in text and "authTokenEnv" in text and "caBundle" in text and "required" in text


# ---- globs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "include, exclude, path, wanted",
    [
        (["**"], [], "a/b/c.parquet", True),
        (["*.parquet"], [], "a/b/c.parquet", True),  # no slash: the file name at any depth
        (["*.parquet"], [], "a/b/c.h5", False),
        (["episodes/*.h5"], [], "episodes/x.h5", True),
        (["episodes/*.h5"], [], "episodes/sub/x.h5", False),  # '*' stays in one segment
        (["episodes/**/*.h5"], [], "episodes/sub/deeper/x.h5", True),
        (["episodes/**/*.h5"], [], "episodes/x.h5", True),  # '**/' may match nothing
        (["**"], ["*.tmp"], "a/x.tmp", False),
        (["**"], ["cache/**"], "cache/a/b", False),
        (["ep_00[0-4].bin"], [], "ep_003.bin", True),
        (["ep_00[!0-4].bin"], [], "ep_003.bin", False),
        (["?.bin"], [], "ab.bin", False),
    ],
)
def test_globs(include: list[str], exclude: list[str], path: str, wanted: bool) -> None:
    assert PathFilter(include, exclude)(path) is wanted


# ---- catalog --------------------------------------------------------------------------


def test_catalog_expands_cohorts_times_categories_into_cohort_directories() -> None:
    source = CatalogSource.model_validate({
        "type": "catalog", "name": "xena",
        "urlTemplate": "https://hub.example/download/TCGA.{cohort}.sampleMap%2F{file}.gz",
        "cohorts": ["BRCA", "LUAD"],
        "categories": {"mrna_seq": "HiSeqV2", "clinical": "{cohort}_clinicalMatrix", "mutation": "mutation_broad"},
        "checksums": {"LUAD/HiSeqV2.gz": "a" * 64, "BRCA/mutation_broad.gz": "b" * 32},
    })
    entries = catalog_entries(source)
    assert len(entries) == 6
    paths = sorted(e["path"] for e in entries)
    assert paths == sorted(f"{c}/{f}.gz" for c in ("BRCA", "LUAD") for f in ("HiSeqV2", f"{c}_clinicalMatrix", "mutation_broad"))
    by_path = {e["path"]: e for e in entries}
    assert by_path["BRCA/BRCA_clinicalMatrix.gz"]["url"] == "https://hub.example/download/TCGA.BRCA.sampleMap%2FBRCA_clinicalMatrix.gz"
    assert by_path["LUAD/HiSeqV2.gz"]["sha256"] == "a" * 64
    assert by_path["BRCA/mutation_broad.gz"]["md5"] == "b" * 32


def test_catalog_checksum_for_a_path_it_does_not_produce_is_an_error() -> None:
    source = CatalogSource.model_validate({
        "type": "catalog", "name": "xena", "urlTemplate": "https://h/{cohort}/{file}", "cohorts": ["A"],
        "categories": {"c": "f.tsv"}, "checksums": {"A/typo.tsv": "c" * 64},
    })
    with pytest.raises(ConfigError, match="A/typo.tsv"):
        catalog_entries(source)


def test_catalog_collision_within_a_cohort_is_an_error(tmp_path: Path) -> None:
    from trajflow.download.sources import HttpClients, catalog_source

    source = CatalogSource.model_validate({
        "type": "catalog", "name": "xena", "urlTemplate": "https://h/{category}/{cohort}/data.tsv",
        "cohorts": ["A"], "categories": {"one": "x", "two": "y"},
    })
    with pytest.raises(ConfigError, match="both be stored as 'xena/A/data.tsv'"):
        catalog_source(source, HttpClients(5, 4))


# ---- plan generation and destinations -------------------------------------------------


def test_plan_generation_follows_sources_not_tuning() -> None:
    base = cfg(sources=[HTTPS])
    assert base.generation_id() == cfg(sources=[HTTPS], concurrency=32, partSizeMib=64).generation_id()
    assert base.generation_id() != cfg(sources=[{**HTTPS, "urls": ["https://example.org/b"]}]).generation_id()
    assert base.generation_id() != cfg(sources=[HTTPS], planGeneration="2").generation_id()


def test_gunzip_must_not_make_two_items_share_a_path() -> None:
    items = [Item("web/a.tsv.gz", 1, "https://x/a.tsv.gz"), Item("web/a.tsv", 1, "https://x/a.tsv")]
    check_destinations(items, gunzip=False)
    with pytest.raises(ConfigError, match="a.tsv"):
        check_destinations(items, gunzip=True)
    assert dest_key(3, "web/a.tsv.gz", gunzip=True) == "raw/00003/web/a.tsv"
    assert dest_key(3, "web/a.tsv.gz", gunzip=False) == "raw/00003/web/a.tsv.gz"


def test_fingerprint_changes_with_the_source_version() -> None:
    item = Item("web/a", 10, "https://x/a", {"etag": '"1"'})
    same = Item("web/a", 10, "https://x/a", {"etag": '"1"'})
    assert item_fingerprint(item, False) == item_fingerprint(same, False)
    assert item_fingerprint(item, False) != item_fingerprint(Item("web/a", 10, "https://x/a", {"etag": '"2"'}), False)
    assert item_fingerprint(item, False) != item_fingerprint(Item("web/a", 11, "https://x/a", {"etag": '"1"'}), False)
    gz = Item("web/a.gz", 10, "https://x/a.gz")
    assert item_fingerprint(gz, True) != item_fingerprint(gz, False)


# ---- failures and backoff -------------------------------------------------------------


@pytest.mark.parametrize(
    "status, expected",
    [
        (200, None), (206, None),
        (500, (Kind.TRANSIENT, "server_error")), (502, (Kind.TRANSIENT, "server_error")),
        (503, (Kind.TRANSIENT, "throttled")), (429, (Kind.TRANSIENT, "throttled")), (408, (Kind.TRANSIENT, "timeout")),
        (404, (Kind.PERMANENT, "not_found")), (410, (Kind.PERMANENT, "not_found")),
        (403, (Kind.PERMANENT, "forbidden")), (401, (Kind.PERMANENT, "forbidden")),
        (400, (Kind.PERMANENT, "client_error")), (412, (Kind.RESTART, "changed")), (416, (Kind.RESTART, "changed")),
    ],
)
def test_status_classification(status: int, expected: Any) -> None:
    assert classify_status(status) == expected


def test_failure_counters_start_at_zero_and_count_every_classified_reason() -> None:
    from trajflow.download.failures import REASONS
    from trajflow.download.transfer import Stats
    from trajflow.metrics import download_metrics

    metrics = download_metrics()
    stats = Stats(metrics)

    def counted(reason: str) -> float | None:
        return metrics.registry.get_sample_value("trajflow_download_failures_total", {"reason": reason})

    assert {reason: counted(reason) for reason in REASONS} == dict.fromkeys(REASONS, 0.0)
    # every reason an HTTP status maps to is one of the series exported from the start
    classified = {c[1] for c in map(classify_status, range(100, 600)) if c is not None}
    assert classified <= set(REASONS)
    stats.failure("throttled")
    stats.failure("throttled")
    assert counted("throttled") == 2 and stats.failures == {"throttled": 2}
    assert all(counted(reason) == 0 for reason in REASONS if reason != "throttled")


def test_backoff_is_jittered_capped_and_honours_retry_after() -> None:
    backoff = Backoff(1.0, 8.0, random.Random(0))
    for retry in range(1, 10):
        delays = [backoff.delay(retry) for _ in range(200)]
        ceiling = min(8.0, 2 ** (retry - 1))
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.5 * ceiling  # full jitter spreads over the whole range
    assert backoff.delay(1, retry_after=5.0) >= 5.0
    assert backoff.delay(1, retry_after=500.0) == 8.0  # capped
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None


def test_retries_stop_at_permanent_failures_and_after_the_attempts() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise FetchError("boom", Kind.TRANSIENT, "server_error")
        return "ok"

    assert call_with_retries(flaky, 5, Backoff(0.001, 0.001)) == "ok" and len(calls) == 3
    calls.clear()

    def gone() -> None:
        calls.append(1)
        raise FetchError("404", Kind.PERMANENT, "not_found")

    with pytest.raises(FetchError):
        call_with_retries(gone, 5, Backoff(0.001, 0.001))
    assert len(calls) == 1


def test_retries_end_once_the_process_is_told_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from trajflow.download import failures

    stopping = threading.Event()
    monkeypatch.setattr(failures, "STOPPING", stopping)
    calls: list[int] = []

    def throttled() -> None:
        calls.append(1)
        stopping.set()  # SIGTERM arrives during the first try
        raise FetchError("503", Kind.TRANSIENT, "throttled", retry_after=3600)

    with pytest.raises(TransientError, match="stopped before planning ended"):
        call_with_retries(throttled, 5, Backoff(3600, 3600))  # no hour-long wait either
    assert len(calls) == 1


def test_https_sources_check_certificates_as_s3_sources_do_on_every_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.13's default context adds VERIFY_X509_STRICT, which refuses many private CAs
    (no keyUsage, basicConstraints not critical) that botocore, for S3 sources, accepts."""
    import ssl

    from trajflow.download import http

    made = ssl.create_default_context

    def as_on_python_3_13(*args: object, **kwargs: object) -> ssl.SSLContext:
        context = made(*args, **kwargs)  # type: ignore[arg-type]
        context.verify_flags |= ssl.VERIFY_X509_STRICT
        return context

    monkeypatch.setattr(http.ssl, "create_default_context", as_on_python_3_13)
    context = http.HttpClient()._options["ssl_context"]
    assert not context.verify_flags & ssl.VERIFY_X509_STRICT
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname  # still verified


def test_validators_pin_a_version() -> None:
    assert Validator('"abc"', "Sun, 01 Nov 2026 00:00:00 GMT").headers() == {"If-Match": '"abc"'}
    assert Validator('W/"abc"', "Sun, 01 Nov 2026 00:00:00 GMT").headers() == {
        "If-Unmodified-Since": "Sun, 01 Nov 2026 00:00:00 GMT"}
    assert Validator().headers() == {}
    assert parse_content_range("bytes 0-9/100") == (0, 9, 100)
    assert parse_content_range("bytes 5-9/*") == (5, 9, None)
    assert parse_content_range("items 1-2/3") is None


# ---- checksums ------------------------------------------------------------------------


def test_checksum_headers() -> None:
    data = b"trajectory bytes"
    sha_b64 = base64.b64encode(hashlib.sha256(data).digest()).decode()
    md5_b64 = base64.b64encode(hashlib.md5(data).digest()).decode()
    found = header_checksums({"Repr-Digest": f"sha-512=:AAAA:, sha-256=:{sha_b64}:"}, whole_body=False)
    assert found.sha256 == {"header:Repr-Digest": hashlib.sha256(data).hexdigest()}
    found = header_checksums({"Digest": f"SHA-256={sha_b64},MD5={md5_b64}"}, whole_body=False)
    assert found.md5 == {"header:Digest": hashlib.md5(data).hexdigest()} and found.sha256
    found = header_checksums({"x-goog-hash": f"crc32c=AAAAAA==,md5={md5_b64}"}, whole_body=False)
    assert found.md5 == {"header:x-goog-hash": hashlib.md5(data).hexdigest()}
    # body digests apply only to whole-object responses
    assert header_checksums({"Content-MD5": md5_b64}, whole_body=False).md5 == {}
    assert header_checksums({"Content-MD5": md5_b64}, whole_body=True).md5
    assert header_checksums({"x-amz-checksum-sha256": f"{sha_b64}-3"}, whole_body=True).sha256 == {}  # composite
    assert header_checksums({"Content-MD5": "not base64!"}, whole_body=True).md5 == {}


def test_s3_etags_count_as_md5_only_when_they_are_one() -> None:
    md5 = "0123456789abcdef0123456789abcdef"
    assert s3_etag_md5({"ETag": f'"{md5}"'}) == md5
    assert s3_etag_md5({"ETag": f'"{md5}-3"'}) == ""  # multipart
    assert s3_etag_md5({"ETag": f'"{md5}"', "x-amz-server-side-encryption": "aws:kms"}) == ""
    assert s3_etag_md5({"ETag": f'"{md5}"', "x-amz-server-side-encryption-customer-algorithm": "AES256"}) == ""


def test_expected_checksums_raise_a_restart_on_mismatch() -> None:
    digests = Digests(md5=True)
    digests.update(b"abc")
    expected = Expected()
    expected.add("sha256", hashlib.sha256(b"abc").hexdigest(), "catalog")
    expected.add("md5", hashlib.md5(b"abc").hexdigest(), "s3-etag")
    assert expected.check(digests, "x") == ["sha256:catalog", "md5:s3-etag"]
    expected.add("md5", hashlib.md5(b"abd").hexdigest(), "header:Content-MD5")
    with pytest.raises(FetchError) as info:
        expected.check(digests, "x")
    assert info.value.kind is Kind.RESTART and info.value.reason == "checksum"


# ---- gunzip, resume extents, progress -------------------------------------------------


def test_gunzip_streams_multi_member_files_and_rejects_truncation() -> None:
    data = gzip.compress(b"first member\n" * 1000) + gzip.compress(b"second member\n" * 1000)
    gz = Gunzip()
    out = b"".join(piece for i in range(0, len(data), 7) for piece in gz.feed(data[i : i + 7]))
    gz.finish()
    assert out == b"first member\n" * 1000 + b"second member\n" * 1000
    truncated = Gunzip()
    list(truncated.feed(data[: len(data) // 3]))
    with pytest.raises(ValueError, match="truncated"):
        truncated.finish()
    with pytest.raises(ValueError, match="gzip"):
        list(Gunzip().feed(b"plain text, not gzip"))


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_gunzip_ignores_nul_padding_after_a_member_as_gzip_does(step: int) -> None:
    one, two = gzip.compress(b"row\n" * 1000), gzip.compress(b"more\n" * 10)
    data = one + b"\0" * 512 + two + b"\0" * 3  # block-padded, between members and at the end
    assert gzip.decompress(data) == b"row\n" * 1000 + b"more\n" * 10
    gz = Gunzip()
    out = b"".join(piece for i in range(0, len(data), step) for piece in gz.feed(data[i : i + step]))
    gz.finish()
    assert out == b"row\n" * 1000 + b"more\n" * 10
    for bad in (b"\0" + one, one + b"\0\0garbage"):  # NULs only count as padding, and only after a member
        with pytest.raises(ValueError, match="gzip"):
            list(Gunzip().feed(bad))


def test_resume_uses_only_contiguous_durable_bytes() -> None:
    extents = [(0, 10), (10, 25), (40, 50)]
    assert _contiguous(extents, 0, 100) == 25
    assert _contiguous(extents, 40, 60) == 50
    assert _contiguous(extents, 30, 60) == 30  # a gap at the start: nothing usable
    assert _contiguous(extents, 0, 20) == 20


def test_progress_maths() -> None:
    meter = RateMeter(half_life_s=1.0)
    assert meter.sample(0.0, 0) is None
    assert meter.sample(1.0, 100) == pytest.approx(100.0)
    rate = meter.sample(2.0, 300)
    assert rate is not None and 100 < rate < 200
    assert eta_seconds(1000, 100.0) == 10.0 and eta_seconds(0, None) == 0.0 and eta_seconds(5, None) is None
    assert human_bytes(3 * 1024**3) == "3.0 GiB" and human_bytes(12) == "12 B"
    assert human_duration(3725) == "1h02m05s" and human_duration(65) == "1m05s" and human_duration(None) == "?"


def test_journal_trusts_unsynced_extents_only_from_this_boot(tmp_path: Path) -> None:
    from trajflow.storage import LocalStorage

    sink = FileSink(LocalStorage(tmp_path), "raw/00000/web/x.bin", resumable=True, gunzip=False)
    sink.final.parent.mkdir(parents=True)
    header = '{"v": 1, "size": 100, "etag": "", "last_modified": "", "source": "https://x/x.bin"}'
    sink.journal.write_text("\n".join([
        header,
        "boot another-machine", "0 10", "10 20", "sync", "20 30",  # 20-30 never synced there: lost with that node
        f"boot {boot_id()}", "30 40", "sync", "40 50", "50 60",  # ours: the page cache still has them
        "70 6",  # nonsense
    ]) + "\n60 7")  # a line cut short by a kill (of "60 70")
    sink.tmp.write_bytes(bytes(60))
    found, extents = sink.open()
    try:
        assert found is not None and found["size"] == 100
        assert extents == [(0, 10), (10, 20), (30, 40), (40, 50), (50, 60)]
        assert sink.journal.read_text().splitlines()[-1] == f"boot {boot_id()}"  # this process announces itself
    finally:
        sink.close()
    # a second opener while the first holds the lock gets "busy"
    first = FileSink(LocalStorage(tmp_path), "raw/00000/web/x.bin", resumable=True, gunzip=False)
    first.open()
    try:
        with pytest.raises(FetchError) as info:
            FileSink(LocalStorage(tmp_path), "raw/00000/web/x.bin", resumable=True, gunzip=False).open()
        assert info.value.reason == "busy"
    finally:
        first.close()


def test_a_journal_vouching_for_bytes_its_temporary_lacks_starts_over(tmp_path: Path) -> None:
    """A temporary removed or cut short under its journal: its extents would be hashed as
    zeros or fail every rerun, so the item is fetched from its first byte."""
    from trajflow.storage import LocalStorage

    sink = FileSink(LocalStorage(tmp_path), "raw/00000/web/x.bin", resumable=True, gunzip=False)
    sink.final.parent.mkdir(parents=True)
    header = '{"v": 1, "size": 100, "etag": "", "last_modified": "", "source": "https://x/x.bin"}'
    sink.journal.write_text("\n".join([header, f"boot {boot_id()}", "0 40", "sync", "40 60"]) + "\n")
    sink.tmp.write_bytes(bytes(40))  # 40-60 lost with the file that held them
    found, extents = sink.open()
    try:
        assert (found, extents) == (None, [])
        assert sink.tmp.stat().st_size == 0 and sink.journal.read_text() == ""
    finally:
        sink.discard()


def test_retiring_a_legacy_journal_spares_a_temporary_made_meanwhile(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`x`'s journal of an older version was `.trajflow-tmp-dl-x.journal`, the temporary of an
    item `x.journal`. When `x.journal` starts between `x` looking for its journal and opening
    that name, its temporary must survive."""
    from trajflow.storage import LocalStorage

    root = LocalStorage(tmp_path)
    x = FileSink(root, "raw/00000/web/x", resumable=True, gunzip=False)
    x_journal = FileSink(root, "raw/00000/web/x.journal", resumable=True, gunzip=False)
    exists = Path.exists

    def x_journal_starts_after_the_look(self: Path, *args: object, **kwargs: object) -> bool:
        found = exists(self, *args, **kwargs)
        if self == x_journal.journal and x_journal._jfd is None:
            x_journal.open()
        return found

    monkeypatch.setattr(Path, "exists", x_journal_starts_after_the_look)
    try:
        x.open()
        assert x_journal.tmp.exists() and x_journal.journal.exists() and x.tmp.exists() and x.journal.exists()
    finally:
        x.discard()
        x_journal.discard()


# ---- a sweeper beside live writers (pods of another shard count, a Job's old pod) ---------


def _run_at_first_open(monkeypatch: pytest.MonkeyPatch, target: Path, action: Any) -> list[int]:
    """Run `action` once, right after the first os.open of `target` (the other process
    stepping in at that point); the returned list says whether it ran."""
    import os

    real_open, fired = os.open, []

    def open_then_act(path: Any, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        if not fired and Path(path) == target:
            fired.append(1)
            action()
        return fd

    monkeypatch.setattr(os, "open", open_then_act)
    return fired


def _digests(data: bytes) -> Digests:
    digests = Digests()
    digests.update(data)
    return digests


def test_a_throwaway_temporary_swept_between_its_creation_and_its_lock_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.download.transfer import sweep_abandoned_temporaries
    from trajflow.storage import LocalStorage

    sink = FileSink(LocalStorage(tmp_path), "raw/00002/web/x.bin", resumable=False, gunzip=False)
    fired = _run_at_first_open(monkeypatch, sink.tmp, lambda: sweep_abandoned_temporaries(tmp_path / "raw/00002"))
    sink.open()
    assert fired
    sink.write(0, b"payload")
    try:
        sink.commit(_digests(b"payload"))  # before: the bytes went to a file no name led to
    finally:
        sink.discard()
    assert sink.final.read_bytes() == b"payload"


def test_a_journal_swept_between_its_opening_and_its_lock_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.download.transfer import sweep_abandoned_temporaries
    from trajflow.storage import LocalStorage

    sink = FileSink(LocalStorage(tmp_path), "raw/00002/web/x.bin", resumable=True, gunzip=False)
    sink.final.parent.mkdir(parents=True)
    header = '{"v": 1, "size": 100, "etag": "", "last_modified": "", "source": "https://x/x.bin"}'
    sink.journal.write_text(f"{header}\nboot {boot_id()}\n0 40\nsync\n")  # of a killed run
    sink.tmp.write_bytes(bytes(40))
    fired = _run_at_first_open(monkeypatch, sink.journal, lambda: sweep_abandoned_temporaries(tmp_path / "raw/00002"))
    try:
        assert sink.open() == (None, [])  # before: a storage error that stopped the shard
        assert fired and sink.journal.exists() and sink.tmp.exists()
    finally:
        sink.discard()


def test_the_sweeper_spares_the_files_of_a_writer_that_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeper opened a writer's journal; the writer discards its bytes (another version
    of the item) and starts again under the same names before the sweeper locks the old
    journal. Before, the sweeper removed the new temporary and journal; a third writer then
    truncated the temporary under the second, whose commit recorded bytes the file did not hold."""
    from trajflow.download.transfer import sweep_abandoned_temporaries
    from trajflow.storage import LocalStorage

    root = LocalStorage(tmp_path)
    first = FileSink(root, "raw/00002/web/x.bin", resumable=True, gunzip=False)
    first.open()
    again: list[FileSink] = []

    def start_again() -> None:
        first.discard()
        again.append(FileSink(root, "raw/00002/web/x.bin", resumable=True, gunzip=False))
        again[0].open()

    fired = _run_at_first_open(monkeypatch, first.journal, start_again)
    sweep_abandoned_temporaries(tmp_path / "raw/00002")
    monkeypatch.undo()
    (second,) = again
    third = FileSink(root, "raw/00002/web/x.bin", resumable=True, gunzip=False)
    try:
        assert fired and second.tmp.exists() and second.journal.exists()
        with pytest.raises(FetchError, match="another process is downloading this item"):
            third.open()
        second.write(0, b"x" * 1000)
        assert second.commit(_digests(b"x" * 1000))[0] == 1000
        assert second.final.read_bytes() == b"x" * 1000
    finally:
        second.discard()


class _PoolResponse:
    """What a urllib3 pool returns, as far as HttpClient looks: a status and headers."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.status, self.headers = status, headers

    def drain_conn(self) -> None:
        pass

    def release_conn(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("location, kept", [
    ("https://hub.example/b/data.tsv", True),  # same scheme and host
    ("http://hub.example/b/data.tsv", False),  # https -> http: never in cleartext
    ("https://other.example/b/data.tsv", False),  # another host
])
def test_redirects_keep_the_token_only_on_the_same_scheme_and_host(location: str, kept: bool) -> None:
    from trajflow.download.http import HttpClient

    sent: list[tuple[str, str | None]] = []

    class Recorder:  # stands in for the connection pool: no network
        def request(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> _PoolResponse:
            sent.append((url, headers.get("Authorization")))
            return _PoolResponse(302, {"Location": location}) if len(sent) == 1 else _PoolResponse(200, {})

    client = HttpClient()
    client._manager = lambda url: Recorder()  # type: ignore[method-assign]
    client.request("GET", "https://hub.example/a/data.tsv", {"Authorization": "Bearer SECRET"})
    assert sent == [("https://hub.example/a/data.tsv", "Bearer SECRET"), (location, "Bearer SECRET" if kept else None)]


def test_every_request_asks_for_identity_encoding() -> None:
    """Bytes compressed on the fly are not the file its size, ranges and checksums describe:
    GETs (ranged or not) and HEADs ask for identity themselves, not through whatever default
    the HTTP library happens to add."""
    from trajflow.download.http import HttpClient

    sent: list[tuple[str, str | None]] = []

    class Recorder:  # stands in for the connection pool: no network
        def request(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> _PoolResponse:
            sent.append((method, headers.get("Accept-Encoding")))
            refused = method == "HEAD" and url.endswith("/no-head.bin")
            return _PoolResponse(405 if refused else 200, {"Content-Length": "1"})

    client = HttpClient()
    client._manager = lambda url: Recorder()  # type: ignore[method-assign]
    client.get("https://hub.example/a.bin").close()
    client.head("https://hub.example/a.bin", {"Authorization": "Bearer T"})
    client.head("https://hub.example/no-head.bin")  # refused (405): the 1-byte GET instead
    assert sent == [("GET", "identity"), ("HEAD", "identity"), ("HEAD", "identity"), ("GET", "identity")]


def test_a_refused_if_match_is_confirmed_unchanged_only_at_the_planned_size() -> None:
    """confirm_planned pins an object by Last-Modified when HEAD shows the version planning
    listed. The same ETag or modification time with another size is another object (mtimes
    have one-second resolution; gateways rewrite ETags): never taken for the planned one."""
    import datetime as dt

    from trajflow.download.sources import HttpClients, S3SourceRuntime

    listed = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    header = "Thu, 01 Jan 2026 00:00:00 GMT"
    item = Item("lake/x.bin", 100, "s3://src/d/x.bin", {"etag": "e1", "listed_last_modified": listed.isoformat()})
    config = cfg(sources=[{"type": "s3", "name": "lake", "url": "s3://src/d", "endpoint": "http://127.0.0.1:9"}])
    runtime = S3SourceRuntime(config.sources[0], HttpClients(1.0, 1), 1, 1.0)  # type: ignore[arg-type]

    def confirm(size: int, etag: str) -> Validator | None:
        head = {"ContentLength": size, "ETag": f'"{etag}"', "LastModified": listed,
                "ResponseMetadata": {"HTTPHeaders": {"last-modified": header}}}
        runtime.client = type("Client", (), {"head_object": lambda self, **kw: head})()
        return runtime.confirm_planned(item)

    pinned = Validator(last_modified=header)
    assert confirm(100, "e1") == pinned  # size and ETag as listed
    assert confirm(100, "gateway-etag") == pinned  # size and modification time as listed
    assert confirm(101, "e1") is None
    assert confirm(101, "gateway-etag") is None

def test_s3_keys_that_cannot_be_paths_are_named_not_dropped() -> None:
    from trajflow.download.sources import HttpClients, S3SourceRuntime

    keys = ["d/good.bin", "d/win\\path.bin", "d/a//b.bin", "d/./c.bin", "d/skip/x.tmp"]

    class Paginator:  # a listing as S3 (which allows all of these keys) returns it
        def paginate(self, **kw: Any) -> list[dict[str, Any]]:
            return [{"Name": "src", "Contents": [{"Key": k, "Size": 1, "ETag": '"e"'} for k in keys]}]

    def source(**extra: Any) -> S3SourceRuntime:
        config = cfg(sources=[{"type": "s3", "name": "lake", "url": "s3://src/d", "endpoint": "http://127.0.0.1:9", **extra}])
        runtime = S3SourceRuntime(config.sources[0], HttpClients(1.0, 1), 1, 1.0)  # type: ignore[arg-type]
        runtime.client = type("Client", (), {"get_paginator": lambda self, name: Paginator()})()
        return runtime

    with pytest.raises(ConfigError) as caught:
        source(exclude=["*.tmp"]).list_items(lambda fn: fn(), 1)
    message = str(caught.value)
    assert "3 object(s)" in message and "exclude" in message
    assert all(repr(k) in message for k in keys[1:4])
    # excluded, they are no longer in the way
    listed = source(exclude=["*.tmp", "*\\*", "a//b.bin", "./c.bin"]).list_items(lambda fn: fn(), 1)
    assert [i.key for i in listed] == ["lake/good.bin"]


def test_s3_sources_retry_throttling_without_client_side_rate_limiting() -> None:
    from trajflow.download.sources import HttpClients, S3SourceRuntime

    config = cfg(sources=[{"type": "s3", "name": "lake", "url": "s3://src/d", "endpoint": "http://127.0.0.1:9"}])
    runtime = S3SourceRuntime(config.sources[0], HttpClients(1.0, 1), 1, 1.0)  # type: ignore[arg-type]
    # adaptive mode slows every later request of the pod once a few were throttled; the
    # downloader's own backoff (which honours Retry-After) paces retries instead
    assert runtime.client.meta.config.retries["mode"] == "standard"


def test_an_s3_source_that_does_not_answer_is_told_at_each_retry(caplog: pytest.LogCaptureFixture) -> None:
    """Sources get the run root's client: connections time out in seconds, each retry of a call
    that got no answer is logged naming the endpoint, and the listing fails as retryable."""
    import socket

    from trajflow.download.sources import HttpClients, S3SourceRuntime

    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        config = cfg(sources=[{"type": "s3", "name": "lake", "url": "s3://src/d", "endpoint": endpoint, "anonymous": True}])
        assert S3SourceRuntime(config.sources[0], HttpClients(60.0, 1), 1, 60.0).client.meta.config.connect_timeout == 10.0  # type: ignore[arg-type]
        runtime = S3SourceRuntime(config.sources[0], HttpClients(0.2, 1), 1, 0.2)  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="trajflow.storage.s3"):
            with pytest.raises(TransientError, match="source 'lake': listing s3://src/d failed"):
                runtime.list_items(lambda fn: fn(), 1)
    told = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
    assert told and all(t.startswith(f"{endpoint} did not answer (") for t in told), caplog.text
    assert told[-1].endswith("attempt 6 of 6)")


def test_progress_of_items_of_unknown_size_counts_items(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from trajflow.download.progress import ProgressReporter

    snapshot = {"items_done": 1, "items_total": 4, "failed": 0, "bytes_done": 5000, "bytes_total": 5000,
                "sizes_known": False, "bytes_received": 5000, "inflight": 1, "retries": 0, "elapsed_s": 2.0}
    downloader = SimpleNamespace(shard=0, progress=lambda: dict(snapshot))
    reporter = ProgressReporter(downloader, interval_s=3600, terminal=False)  # its thread waits an hour
    try:
        with caplog.at_level("INFO", logger="trajflow.download.progress"):
            snap = reporter.report()
    finally:
        reporter._stop.set()
    assert "(25.0%)" in caplog.text and "ETA ?" in caplog.text  # not 100% from the start: 1 of 4 items
    assert snap["eta_s"] is None


def test_the_first_progress_line_has_a_rate(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not '0 B/s' at the first line, just when someone looks to see whether it hangs."""
    from types import SimpleNamespace

    from trajflow.download import progress

    import itertools

    clock = itertools.chain([100.0], itertools.repeat(110.0))  # any other caller of monotonic() gets 110 too
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    snapshot = {"items_done": 0, "items_total": 1, "failed": 0, "bytes_done": 0, "bytes_total": 40 << 20,
                "sizes_known": True, "bytes_received": 0, "inflight": 1, "retries": 0, "elapsed_s": 0.0}
    downloader = SimpleNamespace(shard=0, progress=lambda: dict(snapshot))
    reporter = progress.ProgressReporter(downloader, interval_s=3600, terminal=False)
    try:
        snapshot.update(bytes_done=15 << 20, bytes_received=15 << 20, elapsed_s=10.0)
        with caplog.at_level("INFO", logger="trajflow.download.progress"):
            snap = reporter.report()
    finally:
        reporter._stop.set()
    assert snap["rate"] == pytest.approx(1.5 * 2**20)
    assert "1.5 MiB/s" in caplog.text and "ETA 16s" in caplog.text


def test_the_progress_bar_leaves_stdout_to_data(capfd: pytest.CaptureFixture[str]) -> None:
    """`--summary-json /dev/stdout | jq` on a terminal: the bar goes to stderr with the logs."""
    from types import SimpleNamespace

    from trajflow.download.progress import ProgressReporter

    snapshot = {"items_done": 1, "items_total": 2, "failed": 0, "bytes_done": 10, "bytes_total": 20,
                "sizes_known": True, "bytes_received": 10, "inflight": 1, "retries": 0, "elapsed_s": 1.0}
    downloader = SimpleNamespace(shard=7, progress=lambda: dict(snapshot))
    reporter = ProgressReporter(downloader, interval_s=3600, terminal=True)
    reporter.stop()
    out, err = capfd.readouterr()
    assert out == "" and "shard 7" in err


@pytest.mark.parametrize("intact", [True, False])
def test_a_move_across_mounts_copies_only_bytes_that_still_match_their_record(tmp_path: Path, intact: bool,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-shard renames verified files; where a directory is another mount (EXDEV) they are
    copied, and a copy is checked against the record, not trusted."""
    import errno
    import hashlib

    from trajflow.download import transfer
    from trajflow.download.verify import Record
    from trajflow.storage import LocalStorage

    root = LocalStorage(tmp_path)
    data = b"verified bytes"
    root.write_bytes("raw/00001/ds/a.bin", data if intact else b"rotten bytes!!")
    record = Record("ds/a.bin", "f", "raw/00001/ds/a.bin", len(data), hashlib.sha256(data).hexdigest(), len(data),
                    hashlib.sha256(data).hexdigest())

    rename = transfer.os.replace

    def other_mount(src: object, dest: object) -> None:
        if Path(str(src)) == tmp_path / "raw/00001/ds/a.bin":  # the move; the copy's own rename is local
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dest)

    monkeypatch.setattr(transfer.os, "replace", other_mount)
    if intact:
        transfer.relocate(root, "raw/00001/ds/a.bin", "raw/00000/ds/a.bin", record)
        assert root.read_bytes("raw/00000/ds/a.bin") == data and not root.exists("raw/00001/ds/a.bin")
    else:
        with pytest.raises(ValueError, match="raw/00001/ds/a.bin no longer matches its verification record"):
            transfer.relocate(root, "raw/00001/ds/a.bin", "raw/00000/ds/a.bin", record)
        assert not root.exists("raw/00000/ds/a.bin")  # nothing unverified gets the name


def test_a_stopped_shard_waits_for_its_workers_to_end_their_items():
    """A SIGTERM raised in the main thread while it waits for the workers: they are told to
    stop and waited for (a worker ending its item closes its file, or aborts its upload),
    before the stop goes on, also where the interrupted join left them looking stopped."""
    import signal
    import threading
    import time

    from trajflow.download.shard import Scheduler

    ended: list[str] = []
    started = threading.Event()
    scheduler: Scheduler

    def prepare(item: Item) -> None:  # an item in flight: it ends only once the shard stops
        started.set()
        scheduler.pause(30)
        time.sleep(0.5)  # closing its file, aborting its upload
        ended.append(item.key)

    class Stop(Exception):
        pass

    def on_signal(signum, frame):  # type: ignore[no-untyped-def]
        raise Stop

    scheduler = Scheduler(2, [Item("a", 1)], prepare, memory_bytes=1 << 20)
    previous = signal.signal(signal.SIGUSR1, on_signal)
    def interrupt() -> None:
        started.wait(10)
        time.sleep(0.2)  # the main thread waiting for the workers
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    timer = threading.Thread(target=interrupt)
    timer.start()
    try:
        with pytest.raises(Stop):
            scheduler.run()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        timer.join()
    assert ended == ["a"]
