"""The downloader against a local HTTP(S) server that injects faults: every required item
ends verified, nothing partial or corrupt is ever visible, failures get the right exit code."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from download_helpers import FaultyServer, hidden_files, payload, visible_files

from trajflow.config.download import DownloadConfig
from trajflow.download.http import redact
from trajflow.download.shard import ShardDownloader, ShardSummary
from trajflow.errors import ConfigError, ExitCode, TransientError
from trajflow.storage import LocalStorage, read_manifest

MiB = 1 << 20


@pytest.fixture
def server() -> Iterator[FaultyServer]:
    with FaultyServer(stall_s=2.5) as srv:
        yield srv


def make_config(sources: list[dict[str, Any]], **overrides: Any) -> DownloadConfig:
    doc: dict[str, Any] = {
        "sources": sources,
        "concurrency": 4,
        "partSizeMib": 5,
        "multipartThresholdMib": 5,
        "timeoutSeconds": 1.0,
        "retries": {"attempts": 4, "backoffSeconds": 0.01, "maxBackoffSeconds": 0.05},
        "progressIntervalSeconds": 60,
    }
    doc.update(overrides)
    return DownloadConfig.model_validate(doc)


def run(root: Path, config: DownloadConfig, shard: int = 0, shards: int = 1) -> ShardSummary:
    return ShardDownloader(LocalStorage(root), config, shard, shards).run()


def raw_files(root: Path, shard: int = 0) -> dict[str, bytes]:
    base = root / "raw" / f"{shard:05d}"
    return visible_files(base) if base.exists() else {}


def test_faults_are_retried_until_every_item_is_verified(server: FaultyServer, tmp_path: Path) -> None:
    small = {f"/s{i}.bin": payload(50_000 + i, seed=i) for i in range(6)}
    large = {"/large.bin": payload(12 * MiB + 123, seed=99)}
    urls = [server.add(p, d, content_md5=True) for p, d in {**small, **large}.items()]
    for path, fault in zip(small, ["500", "503", "429", "reset", "truncate", "corrupt"]):
        server.script(path, fault)
    # the large object's parts meet a stall (read timeout), a reset and a truncation
    server.script("/large.bin", "stall", "reset", "truncate", "slow")
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}]))

    assert summary.exit_code == ExitCode.OK, [r.error for r in summary.failed]
    files = raw_files(tmp_path)
    assert files == {f"web{p}": d for p, d in {**small, **large}.items()}
    assert hidden_files(tmp_path / "raw") == []
    assert summary.retries >= 9
    for reason in ("server_error", "throttled", "connection", "truncated", "timeout", "checksum"):
        assert summary.failures_by_reason.get(reason, 0) >= 1, (reason, summary.failures_by_reason)
    manifest = read_manifest(LocalStorage(tmp_path), "download", 0)
    assert manifest is not None
    by_item = {e["item"]: e for e in manifest["items"]}
    assert by_item["web/large.bin"]["sha256"] == hashlib.sha256(large["/large.bin"]).hexdigest()
    # a whole-object response carried Content-MD5: it was checked
    assert "md5:header:Content-MD5" in by_item["web/s0.bin"]["checks"]


def test_a_throttled_get_is_retried_no_sooner_than_retry_after_says(server: FaultyServer, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from trajflow.download import transfer

    waits: list[float] = []
    monkeypatch.setattr(transfer.time, "sleep", waits.append)  # the waits asked for, without waiting
    server.get_retry_after = "7"
    url = server.add("/x.bin", payload(1000))
    server.script("/x.bin", "429", "503")
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}],
                                        retries={"attempts": 4, "backoffSeconds": 0.01, "maxBackoffSeconds": 60}))
    assert summary.exit_code == 0
    assert waits == [7.0, 7.0]  # not the 10 ms backoff


def test_not_found_is_permanent_and_others_still_complete(server: FaultyServer, tmp_path: Path) -> None:
    good = server.add("/good.bin", payload(1000))
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [good, server.url("/nope.bin")]}]))
    assert summary.exit_code == ExitCode.PERMANENT
    (failed,) = summary.failed
    assert failed.item.key == "web/nope.bin" and failed.reason == "not_found" and failed.kind == "permanent"
    assert raw_files(tmp_path) == {"web/good.bin": payload(1000)}
    # 404 is never retried; the manifest is not written while a required item is missing
    assert len(server.requests("/nope.bin")) == 1
    assert read_manifest(LocalStorage(tmp_path), "download", 0) is None


def test_many_failed_items_log_a_bounded_number_of_lines(server: FaultyServer, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    urls = [server.url(f"/gone-{i:02d}.bin") for i in range(30)]
    with caplog.at_level(logging.INFO, logger="trajflow.download"):
        summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}]))
    assert summary.exit_code == ExitCode.PERMANENT and len(summary.failed) == 30  # all counted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in warnings if " failed (permanent, not_found)" in m]) == 20
    assert "20 failed items logged; further ones are logged at DEBUG level (the shard's summary counts them all)" \
        in warnings


def test_forbidden_is_permanent(server: FaultyServer, tmp_path: Path) -> None:
    url = server.add("/secret.bin", payload(10))
    server.script("/secret.bin", *["403"] * 10)
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == ExitCode.PERMANENT
    assert summary.failed[0].reason == "forbidden"
    assert len(server.requests("/secret.bin")) == 1


def test_lasting_server_errors_exit_transient_and_leave_nothing_visible(server: FaultyServer, tmp_path: Path) -> None:
    url = server.add("/flaky.bin", payload(2000))
    server.script("/flaky.bin", *["503"] * 50)
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == ExitCode.TRANSIENT
    assert summary.failed[0].kind == "transient"
    assert len(server.requests("/flaky.bin")) == 4  # retries.attempts
    assert raw_files(tmp_path) == {}
    assert hidden_files(tmp_path / "raw") == []


def test_checksum_that_never_matches_is_permanent_and_never_visible(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(300_000)
    url = server.add("/bad.bin", data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    source = {"type": "https", "name": "web", "urls": [{"url": url, "sha256": wrong}]}
    summary = run(tmp_path, make_config([source]))
    assert summary.exit_code == ExitCode.PERMANENT
    (failed,) = summary.failed
    assert failed.reason == "checksum" and wrong in failed.error
    assert len(server.requests("/bad.bin")) == 4  # fetched again on each attempt, then reported
    assert raw_files(tmp_path) == {}
    assert hidden_files(tmp_path / "raw") == []


def test_a_declared_checksum_is_verified(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(70_000, seed=5)
    url = server.add("/ok.bin", data)
    source = {"type": "https", "name": "web", "urls": [{"url": url, "sha256": hashlib.sha256(data).hexdigest(),
                                                         "md5": hashlib.md5(data).hexdigest()}]}
    summary = run(tmp_path, make_config([source]))
    assert summary.exit_code == 0
    checks = summary.results[0].record.checks  # type: ignore[union-attr]
    assert "sha256:config" in checks and "md5:config" in checks


def test_corrupt_part_of_a_large_object_is_caught_by_the_representation_digest(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(11 * MiB, seed=3)
    url = server.add("/big.bin", data, repr_digest=True)
    server.script("/big.bin", "ok", "corrupt")  # the second part request returns a flipped byte
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == 0
    assert summary.failures_by_reason.get("checksum") == 1
    assert raw_files(tmp_path) == {"web/big.bin": data}
    assert "sha256:header:Repr-Digest" in summary.results[0].record.checks  # type: ignore[union-attr]


def test_interrupted_large_object_resumes_from_the_bytes_on_disk(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(12 * MiB, seed=7)
    url = server.add("/big.bin", data)
    server.script("/big.bin", "truncate", "truncate", "truncate")  # each of the 3 parts gets half
    config = make_config([{"type": "https", "name": "web", "urls": [url]}], retries={"attempts": 1, "backoffSeconds": 0.01})
    first = run(tmp_path, config)
    assert first.exit_code == ExitCode.TRANSIENT
    assert raw_files(tmp_path) == {}
    assert len(hidden_files(tmp_path / "raw")) == 2  # the temporary and its journal
    kept = first.bytes_received  # every byte received was written and journaled
    assert kept > 0
    server.unscript("/big.bin")  # a part whose request never started (the item failed first) left its fault
    server.clear_log()  # waits for the responses the first run abandoned mid-body

    second = run(tmp_path, config)
    assert second.exit_code == 0
    assert raw_files(tmp_path) == {"web/big.bin": data}
    assert server.bytes_sent("/big.bin") == len(data) - kept  # nothing on disk was fetched again
    assert hidden_files(tmp_path / "raw") == []


def test_resume_notices_a_changed_object_and_starts_over(server: FaultyServer, tmp_path: Path) -> None:
    old = payload(12 * MiB, seed=1)
    url = server.add("/big.bin", old)
    server.script("/big.bin", "truncate", "truncate", "truncate")
    config = make_config([{"type": "https", "name": "web", "urls": [{"url": url, "size": len(old)}]}],
                         retries={"attempts": 1, "backoffSeconds": 0.01})
    assert run(tmp_path, config).exit_code == ExitCode.TRANSIENT
    new = payload(12 * MiB, seed=2)  # same size, new ETag
    server.add("/big.bin", new)
    config = make_config([{"type": "https", "name": "web", "urls": [{"url": url, "size": len(new)}]}],
                         retries={"attempts": 3, "backoffSeconds": 0.01})
    summary = run(tmp_path, config)
    assert summary.exit_code == 0
    assert raw_files(tmp_path) == {"web/big.bin": new}
    assert any(r.status == 412 for r in server.requests("/big.bin"))


def test_server_without_ranges_falls_back_to_one_stream(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(11 * MiB, seed=4)
    url = server.add("/norange.bin", data, accept_ranges=False)
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [{"url": url, "size": len(data)}]}]))
    assert summary.exit_code == 0
    assert raw_files(tmp_path) == {"web/norange.bin": data}
    assert summary.failures_by_reason.get("no_ranges", 0) >= 1
    assert summary.retries == 1  # one restart as a single stream


@pytest.mark.parametrize("fault", ["to-the-end", "early-start"])
def test_a_206_for_another_range_than_asked_falls_back_to_one_stream(server: FaultyServer, tmp_path: Path,
                                                                     fault: str) -> None:
    """A server sending past the end of ranges, or from before their start: asking again
    gets the same answer, and one stream from byte 0 needs no range."""
    data = payload(11 * MiB, seed=5)
    url = server.add("/odd-ranges.bin", data)
    server.script("/odd-ranges.bin", *[fault] * 3)  # every part request of the first attempt
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/odd-ranges.bin": data}
    assert summary.failures_by_reason.get("no_ranges", 0) >= 1


def test_credentials_in_urls_are_refused_and_never_logged(server: FaultyServer, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from trajflow.config import validate_stage

    with pytest.raises(ConfigError, match=r"urls\[0\]: expected .*no user:password@ .*authTokenEnv") as refused:
        validate_stage("downloader", {"sources": [{"type": "https", "name": "web",
                                                   "urls": ["http://alice:s3cret@127.0.0.1/x.bin"]}]})
    assert "s3cret" not in str(refused.value) and "got 'http://…@127.0.0.1/x.bin'" in str(refused.value)
    with pytest.raises(ConfigError) as refused:  # a password holding '@' and a space
        validate_stage("downloader", {"sources": [{"type": "https", "name": "web",
                                                   "urls": ["https://alice:p@ss w0rd@hub.example/x.bin", 7]}]})
    assert "ss w0rd" not in str(refused.value) and "got 'https://…@hub.example/x.bin'" in str(refused.value)
    assert "urls[1]: expected a string, got 7" in str(refused.value)
    with pytest.raises(ConfigError) as refused:  # a signed URL of another scheme
        validate_stage("downloader", {"sources": [{"type": "https", "name": "web", "urls": ["ftp://host/x.bin?sig=SIGSECRET"]}]})
    assert "SIGSECRET" not in str(refused.value) and "got 'ftp://host/x.bin?…'" in str(refused.value)
    assert redact("https://alice:s3cret@hub.example/x?X-Amz-Signature=abc") == "https://hub.example/x?…"
    assert redact("s3://bucket/runs/a#1?.h5") == "s3://bucket/runs/a#1?.h5"  # an object's name, whole
    url = server.add("/signed.bin", payload(100)) + "?X-Amz-Signature=TOPSECRET"
    server.script("/signed.bin", "500", "500", "500", "500", "500", "500", "500", "500")
    with caplog.at_level(logging.INFO):
        summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}],
                                            retries={"attempts": 2, "backoffSeconds": 0.01}))
    assert summary.exit_code != 0
    assert "signed.bin" in caplog.text and "TOPSECRET" not in caplog.text
    assert all("TOPSECRET" not in (r.error or "") for r in summary.results)


def test_secrets_a_server_echoes_back_are_masked_in_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Error pages often repeat the request: the signed query and the bearer token they echo
    must not reach logs or the shard's errors, nor may the URL in a Content-Encoding refusal."""

    class Echo(_Handler):
        head_status = 404

        def do_GET(self) -> None:
            if self.path.startswith("/hop"):  # a hub sending the client on to a signed CDN URL
                self.send_response(302)
                self.send_header("Location", "/cdn/c.bin?X-Amz-Signature=REDIRSECRET")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.startswith("/gz/"):
                body = b"compressed"
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
            else:
                body = f"Not found: {self.path} auth {self.headers.get('Authorization')}".encode()
                self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    monkeypatch.setenv("HUB_TOKEN", "BEARERSECRET")
    with _hub(Echo) as base, caplog.at_level(logging.INFO):
        urls = [f"{base}/a.bin?X-Amz-Signature=SIG404SECRET&X-Amz-Credential=AKIA%2FEXAMPLE",
                f"{base}/gz/d.bin?sig=SIGGZSECRET", f"{base}/hop/c.bin"]
        summary = run(tmp_path, make_config([{"type": "https", "name": "hub", "urls": urls, "authTokenEnv": "HUB_TOKEN"}],
                                            retries={"attempts": 1, "backoffSeconds": 0.01}))
    errors = " | ".join(r.error or "" for r in summary.results)
    assert "HTTP 404 Not found: /a.bin?… auth …" in errors and "Content-Encoding: gzip" in errors
    assert "HTTP 404 Not found: /cdn/c.bin?… auth …" in errors
    for secret in ("SIG404SECRET", "AKIA", "BEARERSECRET", "SIGGZSECRET", "REDIRSECRET"):
        assert secret not in errors and secret not in caplog.text


def test_head_refused_sizes_with_a_ranged_get(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(9000)
    url = server.add("/nohead.bin", data, head_allowed=False)
    storage = LocalStorage(tmp_path)
    downloader = ShardDownloader(storage, make_config([{"type": "https", "name": "web", "urls": [url]}]), 0, 1)
    _, items = downloader.plan()
    assert items[0].size == len(data)


def test_a_file_cut_short_after_its_shard_was_done_is_fetched_again(server: FaultyServer, tmp_path: Path) -> None:
    """The manifest and the record name a size: a file of another size is not done, whatever
    vouched for it before."""
    data = {"/a.bin": payload(10_000, seed=1), "/b.bin": payload(20_000, seed=2)}
    config = make_config([{"type": "https", "name": "web", "urls": [server.add(p, d) for p, d in data.items()]}])
    assert run(tmp_path, config).exit_code == 0
    (tmp_path / "raw" / "00000" / "web" / "a.bin").write_bytes(data["/a.bin"][:10])
    server.clear_log()
    again = run(tmp_path, config)
    assert again.exit_code == 0 and again.count("fetched") == 1
    assert raw_files(tmp_path) == {f"web{p}": d for p, d in data.items()}
    assert [r.path for r in server.requests()] == ["/a.bin"]


def test_rerun_skips_verified_items_without_requests(server: FaultyServer, tmp_path: Path) -> None:
    urls = [server.add(f"/f{i}.bin", payload(5000 * (i + 1), seed=i)) for i in range(5)]
    config = make_config([{"type": "https", "name": "web", "urls": urls}])
    assert run(tmp_path, config).exit_code == 0
    # lose the manifest: the per-item records alone must let the rerun skip everything
    (tmp_path / "raw" / "_done" / "00000.json").unlink()
    server.clear_log()
    summary = run(tmp_path, config)
    assert summary.exit_code == 0 and summary.count("skipped") == 5
    assert server.requests() == [] and server.requests(method="HEAD") == []


def test_a_file_in_place_without_record_is_adopted_not_fetched(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(4000)
    url = server.add("/a.bin", data)
    config = make_config([{"type": "https", "name": "web", "urls": [{"url": url, "sha256": hashlib.sha256(data).hexdigest()}]}])
    assert run(tmp_path, config).exit_code == 0
    # as if killed between the rename and the record
    (tmp_path / "raw" / ".trajflow-verified" / "web" / "a.bin.json").unlink()
    (tmp_path / "raw" / "_done" / "00000.json").unlink()
    server.clear_log()
    summary = run(tmp_path, config)
    assert summary.count("adopted") == 1 and server.requests() == []
    # a file that does not match the declared checksum is fetched again instead
    (tmp_path / "raw" / ".trajflow-verified" / "web" / "a.bin.json").unlink()
    (tmp_path / "raw" / "_done" / "00000.json").unlink()
    (tmp_path / "raw" / "00000" / "web" / "a.bin").write_bytes(b"x" * len(data))
    summary = run(tmp_path, config)
    assert summary.count("fetched") == 1
    assert raw_files(tmp_path) == {"web/a.bin": data}


def test_https_with_a_private_ca(tmp_path: Path) -> None:
    server = FaultyServer().start(tls_dir=tmp_path / "tls")
    try:
        data = payload(20_000)
        url = server.add("/tls.bin", data)
        assert url.startswith("https://")
        untrusted = run(tmp_path / "a", make_config([{"type": "https", "name": "web", "urls": [{"url": url, "size": len(data)}]}]))
        assert untrusted.exit_code == ExitCode.PERMANENT and untrusted.failed[0].reason == "tls"
        trusted = run(tmp_path / "b", make_config(
            [{"type": "https", "name": "web", "urls": [url], "caBundle": str(server.cert_file)}]
        ))
        assert trusted.exit_code == 0
        assert raw_files(tmp_path / "b") == {"web/tls.bin": data}
    finally:
        server.stop()


def test_bearer_token_comes_from_the_named_environment_variable(server: FaultyServer, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.add("/t.bin", payload(100))
    source = {"type": "https", "name": "web", "urls": [url], "authTokenEnv": "WEB_TOKEN"}

    monkeypatch.delenv("WEB_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="WEB_TOKEN"):
        run(tmp_path, make_config([source]))
    monkeypatch.setenv("WEB_TOKEN", "s3cr3t")
    assert run(tmp_path, make_config([source])).exit_code == 0


# ---- catalog (UCSC Xena-like) ---------------------------------------------------------

XENA_CATEGORIES = {"mrna_seq": "HiSeqV2", "clinical": "{cohort}_clinicalMatrix", "mutation": "mutation_broad"}


def _xena(server: FaultyServer, cohorts: list[str], skip: set[tuple[str, str]] = frozenset()) -> dict[str, bytes]:  # type: ignore[assignment]
    """Serve gzipped matrices at /download/TCGA.<cohort>.sampleMap%2F<file>.gz; returns rel path -> plain bytes."""
    plain = {}
    for cohort in cohorts:
        for category, part in XENA_CATEGORIES.items():
            name = part.format(cohort=cohort)
            text = f"sample\t{cohort}\t{category}\n".encode() + payload(3000, seed=hash((cohort, category)) & 0xFFFF).hex().encode()
            if (cohort, category) not in skip:
                server.add(f"/download/TCGA.{cohort}.sampleMap%2F{name}.gz", gzip.compress(text, mtime=0))
            plain[f"{cohort}/{name}"] = text
    return plain


def _xena_source(server: FaultyServer, **extra: Any) -> dict[str, Any]:
    return {
        "type": "catalog",
        "name": "xena",
        "urlTemplate": server.url("/download/TCGA.{cohort}.sampleMap%2F{file}.gz"),
        "cohorts": ["BRCA", "LUAD"],
        "categories": XENA_CATEGORIES,
        **extra,
    }


def test_catalog_two_cohorts_three_categories_land_in_distinct_paths(server: FaultyServer, tmp_path: Path) -> None:
    plain = _xena(server, ["BRCA", "LUAD"])
    checksum_rel = "BRCA/HiSeqV2.gz"
    checksum = hashlib.sha256(gzip.compress(plain["BRCA/HiSeqV2"], mtime=0)).hexdigest()
    summary = run(tmp_path, make_config([_xena_source(server, checksums={checksum_rel: checksum})]))
    assert summary.exit_code == 0
    files = raw_files(tmp_path)
    assert sorted(files) == sorted(f"xena/{rel}.gz" for rel in plain)
    assert len(files) == 6
    for rel, text in plain.items():
        assert gzip.decompress(files[f"xena/{rel}.gz"]) == text
    record = next(r.record for r in summary.results if r.item.key == "xena/BRCA/HiSeqV2.gz")
    assert record is not None and "sha256:catalog" in record.checks


def test_catalog_gunzip_and_optional_missing_categories(server: FaultyServer, tmp_path: Path) -> None:
    plain = _xena(server, ["BRCA", "LUAD"], skip={("LUAD", "mutation")})
    summary = run(tmp_path, make_config([_xena_source(server, required=False)], gunzip=True))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert summary.count("missing") == 1
    files = raw_files(tmp_path)
    expected = {f"xena/{rel}": text for rel, text in plain.items() if rel != "LUAD/mutation_broad"}
    assert files == expected
    manifest = read_manifest(LocalStorage(tmp_path), "download", 0)
    assert manifest is not None
    assert [m["item"] for m in manifest["missing"]] == ["xena/LUAD/mutation_broad.gz"]
    entry = next(e for e in manifest["items"] if e["item"] == "xena/BRCA/HiSeqV2.gz")
    assert entry["key"] == "raw/00000/xena/BRCA/HiSeqV2" and entry["sha256"] == hashlib.sha256(plain["BRCA/HiSeqV2"]).hexdigest()
    assert entry["source_sha256"] != entry["sha256"]


def test_required_catalog_with_a_missing_category_fails_permanently(server: FaultyServer, tmp_path: Path) -> None:
    _xena(server, ["BRCA", "LUAD"], skip={("BRCA", "clinical")})
    summary = run(tmp_path, make_config([_xena_source(server)]))
    assert summary.exit_code == ExitCode.PERMANENT
    assert [r.item.key for r in summary.failed] == ["xena/BRCA/BRCA_clinicalMatrix.gz"]


def test_corrupt_gzip_with_a_matching_checksum_fails_without_refetching(server: FaultyServer, tmp_path: Path) -> None:
    bad = b"\x1f\x8b\x08\x00" + payload(500)  # a gzip header and garbage
    url = server.add("/broken.gz", bad)
    source = {"type": "https", "name": "web", "urls": [{"url": url, "sha256": hashlib.sha256(bad).hexdigest()}]}
    summary = run(tmp_path, make_config([source], gunzip=True))
    assert summary.exit_code == ExitCode.PERMANENT and summary.failed[0].reason == "gzip"
    assert len(server.requests("/broken.gz")) == 1
    assert raw_files(tmp_path) == {}
    assert hidden_files(tmp_path / "raw") == []


def test_summary_is_json_serialisable(server: FaultyServer, tmp_path: Path) -> None:
    url = server.add("/x.bin", payload(10))
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    doc = json.loads(json.dumps(summary.as_dict()))
    assert doc["fetched"] == 1 and doc["exit_code"] == 0 and doc["bytes_received"] == 10


def test_environment_proxy_is_used_unless_bypassed(server: FaultyServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(5000)
    server.add("/via-proxy.bin", data)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    # the host does not resolve: only the proxy can answer
    url = "http://data.example.invalid/via-proxy.bin"
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [{"url": url, "size": len(data)}]}]))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/via-proxy.bin": data}
    assert server.proxied == [url]
    # NO_PROXY hosts are reached directly
    direct = server.add("/direct.bin", data)
    server.clear_log()
    server.proxied.clear()
    assert run(tmp_path / "d", make_config([{"type": "https", "name": "web", "urls": [direct]}])).exit_code == 0
    assert server.proxied == [] and len(server.requests("/direct.bin")) == 1


def test_etags_that_change_on_every_request_fall_back_to_one_stream(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(11 * MiB, seed=9)
    url = server.add("/cdn.bin", data)
    server.objects["/cdn.bin"].flapping_etag = True
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [{"url": url, "size": len(data)}]}]))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/cdn.bin": data}
    assert summary.failures_by_reason.get("changed", 0) >= 2


# ---- the planned size and version are authoritative -----------------------------------


def test_a_configured_size_the_source_does_not_serve_fails_permanently(server: FaultyServer, tmp_path: Path) -> None:
    url = server.add("/cohort.tsv", payload(654_321))  # e.g. a copy the hub itself truncated
    config = make_config([{"type": "https", "name": "web", "urls": [{"url": url, "size": 700_000}]}])
    summary = run(tmp_path, config)
    assert summary.exit_code == ExitCode.PERMANENT
    failure = summary.failed[0]
    assert failure.reason == "size" and "654321" in failure.error and "700000" in failure.error
    assert raw_files(tmp_path) == {}
    assert not (tmp_path / "raw" / ".trajflow-verified" / "web" / "cohort.tsv.json").exists()


def test_an_error_page_instead_of_the_planned_size_is_never_stored(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(700_000)
    url = server.add("/BRCA.tsv", data)  # HEAD learns 700000 bytes while planning
    server.script("/BRCA.tsv", *["page"] * 4)  # then every attempt gets a short 200 page
    config = make_config([{"type": "https", "name": "web", "urls": [url]}])
    summary = run(tmp_path, config)
    assert summary.exit_code == ExitCode.TRANSIENT
    assert summary.failed[0].reason == "size" and "planGeneration" in summary.failed[0].error
    assert raw_files(tmp_path) == {}
    # the rerun (the hub is fine again) fetches it instead of skipping a bad copy
    rerun = run(tmp_path, config)
    assert rerun.exit_code == 0 and rerun.count("fetched") == 1
    assert raw_files(tmp_path) == {"web/BRCA.tsv": data}


def test_the_version_planning_saw_is_required_from_the_first_request(server: FaultyServer, tmp_path: Path) -> None:
    old = payload(50_000, seed=1)
    url = server.add("/v.bin", old)
    config = make_config([{"type": "https", "name": "web", "urls": [url]}])
    ShardDownloader(LocalStorage(tmp_path), config, 0, 1).plan()  # HEAD sees the old ETag
    # a new version of the same size
    server.add("/v.bin", payload(50_000, seed=2), last_modified="Mon, 02 Nov 2026 00:00:00 GMT")
    summary = run(tmp_path, config)
    assert summary.exit_code == ExitCode.TRANSIENT and summary.failed[0].reason == "changed"
    assert "planGeneration" in summary.failed[0].error
    assert raw_files(tmp_path) == {}
    assert server.requests("/v.bin")[0].condition == "Sun, 01 Nov 2026 00:00:00 GMT"  # If-Unmodified-Since


def test_etags_that_differ_between_nodes_do_not_stop_a_planned_item(server: FaultyServer, tmp_path: Path) -> None:
    """Planning's HEAD and the GETs reach nodes that disagree on the ETag, not on Last-Modified."""
    data = payload(11 * MiB, seed=9)
    url = server.add("/cdn.bin", data)
    server.objects["/cdn.bin"].flapping_etag = True
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/cdn.bin": data}


def test_a_content_encoded_response_is_an_error_naming_the_header(server: FaultyServer, tmp_path: Path) -> None:
    data = b"sample\tvalue\n" * 50_000
    url = server.add("/clinical.tsv", data, encoding="gzip")
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == ExitCode.PERMANENT
    assert "Content-Encoding: gzip" in summary.failed[0].error
    assert raw_files(tmp_path) == {}


@pytest.mark.parametrize("gunzip", [False, True])
def test_a_file_stored_compressed_is_fetched_despite_its_content_encoding(server: FaultyServer, tmp_path: Path,
                                                                         gunzip: bool) -> None:
    # an S3 object with Content-Encoding metadata behind an https URL: the header comes
    # whatever is asked, and the size is the stored one
    text = b"sample\tvalue\n" * 50_000
    stored = gzip.compress(text)
    url = server.add("/HiSeqV2.gz", stored, stored_encoding="gzip")
    summary = run(tmp_path, make_config([{"type": "https", "name": "xena", "urls": [url]}], gunzip=gunzip))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == ({"xena/HiSeqV2": text} if gunzip else {"xena/HiSeqV2.gz": stored})


# ---- names a filesystem root cannot hold fail alone ----------------------------------


def test_a_file_where_another_item_needs_a_directory_fails_alone(server: FaultyServer, tmp_path: Path) -> None:
    urls = [{"url": server.add("/a", payload(10)), "path": "x"}, {"url": server.add("/b", payload(20)), "path": "x/y"},
            {"url": server.add("/c", payload(30)), "path": "z.bin"}]
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}]))
    assert summary.exit_code == ExitCode.PERMANENT
    assert [(r.item.key, r.kind) for r in summary.failed] == [("web/x", "permanent")]
    assert "web/x/y" in summary.failed[0].error
    assert raw_files(tmp_path) == {"web/x/y": payload(20), "web/z.bin": payload(30)}


def test_an_item_whose_record_would_be_another_items_directory_fails_alone(server: FaultyServer,
                                                                           tmp_path: Path) -> None:
    # `a` keeps its record at `a.json`, where `a.json/b` needs a directory for its own
    urls = [{"url": server.add("/a", payload(10)), "path": "a"}, {"url": server.add("/b", payload(20)), "path": "a.json/b"}]
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}]))
    assert summary.exit_code == ExitCode.PERMANENT  # not a crash retried forever
    assert [(r.item.key, r.kind) for r in summary.failed] == [("web/a", "permanent")]
    assert "verification record 'web/a.json'" in summary.failed[0].error
    assert raw_files(tmp_path) == {"web/a.json/b": payload(20)}
    assert run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}])).exit_code == ExitCode.PERMANENT


def test_long_names_fit_despite_the_temporary_prefix_and_longer_ones_fail_alone(server: FaultyServer,
                                                                              tmp_path: Path) -> None:
    fits = "episode_" + "x" * 219 + ".h5"  # 230 bytes: the filesystem takes it
    too_long = "episode_" + "y" * 241 + ".h5"  # 252 bytes: its record `<name>.json` would not fit
    big = payload(20 * MiB, seed=3)  # resumable, so with a journal next to the temporary
    urls = [server.add(f"/{fits}", payload(1000)), server.add(f"/{too_long}", payload(10)),
            {"url": server.add("/big.bin", big), "path": "e" * 240 + ".bin"}]
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}]))
    assert summary.exit_code == ExitCode.PERMANENT
    assert [(r.item.key, r.kind) for r in summary.failed] == [(f"web/{too_long}", "permanent")]
    assert "at most 250 bytes" in summary.failed[0].error
    assert raw_files(tmp_path) == {f"web/{fits}": payload(1000), f"web/{'e' * 240}.bin": big}
    assert hidden_files(tmp_path / "raw") == []


@pytest.mark.parametrize("sizes", [(12, 6), (6, 12)])  # the larger starts first
def test_an_item_named_like_anothers_journal_keeps_its_own_temporary(server: FaultyServer, tmp_path: Path,
                                                                     sizes: tuple[int, int]) -> None:
    """`foo.db` and `foo.db.journal` (SQLite) fetched at once: neither writes into the
    other's temporary or journal, nor takes one for an older version's journal."""
    server.rate_bytes_per_s = 16 * MiB  # both streams are in flight together
    files = {"x": payload(sizes[0] * MiB, seed=1), "x.journal": payload(sizes[1] * MiB, seed=2)}
    urls = [server.add(f"/{name}", data) for name, data in files.items()]  # both resumable, with journals
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}], timeoutSeconds=5.0))
    assert summary.exit_code == 0, summary.failed
    assert raw_files(tmp_path) == {f"web/{name}": data for name, data in files.items()}
    assert hidden_files(tmp_path / "raw") == []


def test_bytes_no_journal_vouches_for_are_never_kept(server: FaultyServer, tmp_path: Path) -> None:
    """A temporary longer than the object, without a journal (killed before its header, or
    an older version's journal): a download over it must not keep its tail."""
    data = payload(6 * MiB, seed=4)
    url = server.add("/big.bin", data)
    web = tmp_path / "raw" / "00000" / "web"
    web.mkdir(parents=True)
    (web / ".trajflow-tmp-dl-big.bin").write_bytes(b"\xff" * (9 * MiB))
    (web / ".trajflow-tmp-dl-big.bin.journal").write_text('{"size": 9437184}\n0 9437184\n')  # abandoned
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == 0
    assert raw_files(tmp_path) == {"web/big.bin": data}
    assert hidden_files(tmp_path / "raw") == []


def test_an_item_an_older_version_is_still_downloading_is_busy(server: FaultyServer, tmp_path: Path) -> None:
    """During an upgrade the old Job's pod may still fetch the shard (its journal is
    `<temporary>.journal`): the new one does not write into that temporary."""
    import fcntl
    import os

    from trajflow.download.transfer import FileSink
    from trajflow.download.failures import FetchError

    web = tmp_path / "raw" / "00000" / "web"
    web.mkdir(parents=True)
    legacy = web / ".trajflow-tmp-dl-big.bin.journal"
    legacy.write_text("{}\n")
    fd = os.open(legacy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old process's lock
        with pytest.raises(FetchError, match="another process .an older trajflow. is downloading this item") as info:
            FileSink(LocalStorage(tmp_path), "raw/00000/web/big.bin", resumable=True, gunzip=False).open()
        assert info.value.reason == "busy" and legacy.exists()
    finally:
        os.close(fd)


def test_a_directory_in_the_way_of_a_file_fails_that_item_not_the_shard(server: FaultyServer, tmp_path: Path) -> None:
    urls = [server.add("/a.bin", payload(10)), server.add("/b.bin", payload(20))]
    (tmp_path / "raw" / "00000" / "web" / "a.bin" / "left-over").mkdir(parents=True)
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": urls}]))
    assert summary.exit_code == ExitCode.PERMANENT
    assert [(r.item.key, r.kind, r.reason) for r in summary.failed] == [("web/a.bin", "permanent", "storage")]
    assert raw_files(tmp_path) == {"web/b.bin": payload(20)}


def test_a_file_another_item_left_at_the_gunzipped_name_is_not_adopted(server: FaultyServer, tmp_path: Path) -> None:
    old = b"gene\tsample\nOLD release 1\n" * 100
    new = b"gene\tsample\nNEW release 2 with corrections\n" * 100
    v1 = server.add("/v1/matrix", old)
    v2 = server.add("/v2/matrix.gz", gzip.compress(new))
    assert run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [v1]}], gunzip=True)).exit_code == 0
    # the next release is compressed: `matrix.gz` lands where `matrix` lies
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [v2]}], gunzip=True))
    assert summary.exit_code == 0 and summary.count("fetched") == 1
    assert raw_files(tmp_path) == {"web/matrix": new}
    # the other way: a plain `matrix` never fetched before is not adopted from what `matrix.gz`
    # left, although of the same size
    other = tmp_path / "other"
    assert run(other, make_config([{"type": "https", "name": "web", "urls": [v2]}], gunzip=True)).exit_code == 0
    v3 = server.add("/v3/matrix", b"x" * len(new))
    summary = run(other, make_config([{"type": "https", "name": "web", "urls": [v3]}], gunzip=True))
    assert summary.exit_code == 0 and summary.count("fetched") == 1
    assert raw_files(other) == {"web/matrix": b"x" * len(new)}


def _source_without_ranges(server: FaultyServer, planned: str, seed: int) -> tuple[bytes, Any]:
    """A file on a server that ignores ranges, and its URL entry. A configured size skips
    HEAD: then nothing says the server ignores ranges until a 200 answers one."""
    data = payload(1_000_000, seed=seed)
    url = server.add("/norange.tsv", data, accept_ranges=False)
    return data, (url if planned == "head_says_none" else {"url": url, "size": len(data)})


@pytest.mark.parametrize("planned", ["head_says_none", "unknown"])
def test_a_broken_stream_without_ranges_starts_over_within_the_retries(server: FaultyServer, tmp_path: Path,
                                                                        planned: str) -> None:
    data, entry = _source_without_ranges(server, planned, seed=21)
    server.script("/norange.tsv", "truncate", "truncate")
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [entry]}]))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/norange.tsv": data}
    ranged = [r.range for r in server.requests("/norange.tsv") if r.range]
    assert ranged == ([] if planned == "head_says_none" else ["bytes=500000-"])  # asked once at most


@pytest.mark.parametrize("planned", ["head_says_none", "unknown"])
def test_a_flaky_source_without_ranges_fails_transiently_naming_the_network(server: FaultyServer, tmp_path: Path,
                                                                             planned: str) -> None:
    _, entry = _source_without_ranges(server, planned, seed=22)
    server.script("/norange.tsv", *["truncate"] * 8)  # more breaks than attempts (4)
    config = make_config([{"type": "https", "name": "web", "urls": [entry]}])
    summary = run(tmp_path, config)
    assert summary.exit_code == ExitCode.TRANSIENT  # a retried pod can succeed: not FailIndex
    (failed,) = summary.failed
    assert (failed.kind, failed.reason) == ("transient", "truncated")
    assert "ended early" in failed.error and "ignores byte ranges" not in failed.error
    # each break counts once, no restart rounds on top (plus the one range request a 200 answers)
    assert len(server.requests("/norange.tsv")) == (4 if planned == "head_says_none" else 5)


def test_without_validators_a_broken_stream_starts_over_rather_than_splice_versions(server: FaultyServer,
                                                                                   tmp_path: Path) -> None:
    old, new = b"A" * 2_000_000, b"B" * 2_000_000
    url = server.add("/export.csv", old, validators=False, changed_to=new)
    server.script("/export.csv", "truncate+change")  # breaks off, then the file is replaced (same size)
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == 0
    assert raw_files(tmp_path) == {"web/export.csv": new}
    assert [r.range for r in server.requests("/export.csv")] == ["", ""]


def _interrupted_single_stream(server: FaultyServer, tmp_path: Path, source: dict[str, Any]) -> int:
    """A first run that leaves a journaled temporary of /big.bin (fetched as one stream: under
    the multipart threshold, over the size worth resuming); returns the bytes it kept."""
    server.script("/big.bin", "truncate")
    first = run(tmp_path, make_config([source], multipartThresholdMib=20, retries={"attempts": 1, "backoffSeconds": 0.01}))
    assert first.exit_code == ExitCode.TRANSIENT
    assert len(hidden_files(tmp_path / "raw")) == 2  # the temporary and its journal
    server.clear_log()
    return first.bytes_received


def test_without_validators_a_rerun_does_not_resume_the_journaled_bytes(server: FaultyServer, tmp_path: Path) -> None:
    old, new = payload(16 * MiB + 1, seed=31), payload(16 * MiB + 1, seed=32)
    url = server.add("/big.bin", old, validators=False)
    source = {"type": "https", "name": "web", "urls": [url]}
    assert _interrupted_single_stream(server, tmp_path, source) > 0
    server.add("/big.bin", new, validators=False)  # replaced between the runs, same size
    summary = run(tmp_path, make_config([source], multipartThresholdMib=20))
    assert summary.exit_code == 0
    assert raw_files(tmp_path) == {"web/big.bin": new}
    assert [r.range for r in server.requests("/big.bin")] == [""]


def test_without_validators_a_declared_checksum_still_allows_resuming(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(16 * MiB + 1, seed=33)
    url = server.add("/big.bin", data, validators=False)
    source = {"type": "https", "name": "web", "urls": [{"url": url, "sha256": hashlib.sha256(data).hexdigest()}]}
    kept = _interrupted_single_stream(server, tmp_path, source)
    summary = run(tmp_path, make_config([source], multipartThresholdMib=20))
    assert summary.exit_code == 0
    assert raw_files(tmp_path) == {"web/big.bin": data}
    assert server.bytes_sent("/big.bin") == len(data) - kept  # the checksum would catch a splice


@pytest.mark.parametrize("attempts", [1, 4])
def test_without_validators_parts_are_not_combined(server: FaultyServer, tmp_path: Path, attempts: int) -> None:
    data = payload(12 * MiB, seed=34)
    url = server.add("/big.bin", data, validators=False)
    # falling back to one stream is no failed try: it works with a single attempt too
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}],
                                        retries={"attempts": attempts, "backoffSeconds": 0.01}))
    assert summary.exit_code == 0
    assert raw_files(tmp_path) == {"web/big.bin": data}
    assert summary.failures_by_reason.get("no_validator", 0) >= 1  # the first responses, then one stream
    assert server.requests("/big.bin")[-1].range == "" and server.requests("/big.bin")[-1].bytes_sent == len(data)


def test_optional_missing_items_are_not_failed_attempts_but_required_ones_are(server: FaultyServer, tmp_path: Path) -> None:
    """TrajflowDownloadErrorRatioHigh divides trajflow_download_failures_total by fetched items: an
    optional source's 404/403 is the documented outcome "missing" and must not count as a failure
    (a healthy run would read as a 50% error ratio); a required source's 404 still counts."""
    from trajflow.download.failures import REASONS
    from trajflow.metrics import download_metrics

    def sample(m: Any, name: str, **labels: str) -> float:
        value = m.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    good = [server.add(f"/g{i}.bin", payload(2000 + i, seed=i)) for i in range(3)]
    gone = server.add("/gone.bin", payload(500, seed=7))
    server.script("/gone.bin", "403")  # HEAD answers while planning; every GET is refused
    optional = {"type": "https", "name": "extra", "required": False,
                "urls": [server.url("/nope0.bin"), server.url("/nope1.bin"), gone]}
    config = make_config([{"type": "https", "name": "web", "urls": good}, optional])
    metrics = download_metrics()
    summary = ShardDownloader(LocalStorage(tmp_path / "a"), config, 0, 1, metrics).run()
    assert summary.exit_code == ExitCode.OK, [r.error for r in summary.failed]
    assert summary.count("missing") == 3 and summary.count("fetched") == 3
    assert sample(metrics, "trajflow_download_items_total", outcome="missing") == 3
    assert sample(metrics, "trajflow_download_items_total", outcome="fetched") == 3
    assert sample(metrics, "trajflow_download_items_total", outcome="failed") == 0
    assert {r: sample(metrics, "trajflow_download_failures_total", reason=r) for r in REASONS} == dict.fromkeys(REASONS, 0.0)
    assert summary.failures_by_reason == {}

    # the same 404 from a required source is a failed item and a failed attempt
    required = {"type": "https", "name": "web", "urls": [good[0], server.url("/nope0.bin")]}
    metrics = download_metrics()
    summary = ShardDownloader(LocalStorage(tmp_path / "b"), make_config([required]), 0, 1, metrics).run()
    assert summary.exit_code == ExitCode.PERMANENT
    assert sample(metrics, "trajflow_download_items_total", outcome="failed") == 1
    assert sample(metrics, "trajflow_download_failures_total", reason="not_found") == 1


def test_a_server_refusing_head_with_ranges_of_unknown_total_plans_an_unknown_size(tmp_path: Path) -> None:
    """HEAD refused, so planning asks for byte 0: a `bytes 0-0/*` answer says nothing of the
    size (its Content-Length of 1 is the range's), so the item is fetched in one stream."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = payload(300_000)

    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            if self.headers.get("Range") == "bytes=0-0":
                self.send_response(206)
                self.send_header("Content-Range", "bytes 0-0/*")
                self.send_header("Content-Length", "1")
                self.end_headers()
                self.wfile.write(body[:1])
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Hub) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{httpd.server_address[1]}/matrix.tsv"
            downloader = ShardDownloader(LocalStorage(tmp_path), make_config([{"type": "https", "name": "hub",
                                                                                "urls": [url]}]), 0, 1)
            summary = downloader.run()
        finally:
            httpd.shutdown()
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"hub/matrix.tsv": body}
    # progress says the size was unknown, and counts the bytes the item turned out to have
    progress = downloader.progress()
    assert progress["sizes_known"] is False and progress["bytes_done"] == len(body)


@pytest.mark.parametrize("failing, prefix", [("write_if_absent", "plan/"), ("write_bytes", "raw/_done/")],
                         ids=["plan", "manifest"])
def test_a_run_root_failing_to_store_the_plan_or_manifest_is_one_line(server: FaultyServer, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      failing: str, prefix: str) -> None:
    import errno

    from trajflow.errors import TrajflowError

    url = server.add("/a.bin", payload(100))
    storage = LocalStorage(tmp_path)
    real = getattr(storage, failing)

    def full(key: str, *args: Any, **kwargs: Any) -> Any:
        if key.startswith(prefix):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / key))
        return real(key, *args, **kwargs)

    monkeypatch.setattr(storage, failing, full)
    with pytest.raises(TrajflowError) as err:  # not a bare OSError: the CLI prints one line, exit 1 (retried)
        ShardDownloader(storage, make_config([{"type": "https", "name": "web", "urls": [url]}]), 0, 1).run()
    assert err.value.exit_code == ExitCode.ERROR
    assert "No space left on device" in str(err.value)
    assert ("cannot read or write the plan" if failing == "write_if_absent" else "cannot write the manifest") in str(err.value)


def test_an_item_in_flight_when_the_shard_stops_is_kept_to_resume_not_retried(server: FaultyServer, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    server.rate_bytes_per_s = 4 << 20
    slow = server.add("/a.bin", payload(17 << 20))  # one stream (under the multipart threshold), resumable
    other = server.add("/b.bin", payload(100))
    real = ShardDownloader._without_download

    def run_root_fails_for_b(self, item, dest):  # type: ignore[no-untyped-def]
        if item.key.endswith("b.bin"):
            time.sleep(0.5)  # a.bin is streaming by now, its one part taken
            raise OSError(5, "Input/output error")
        return real(self, item, dest)

    monkeypatch.setattr(ShardDownloader, "_without_download", run_root_fails_for_b)
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [slow, other]}], concurrency=2,
                                        multipartThresholdMib=32))
    stopped = [r for r in summary.failed if r.item.key == "web/a.bin"]
    assert stopped and stopped[0].reason == "stopped" and stopped[0].kind == "transient", summary.failed
    assert summary.retries == 0 and "size" not in summary.failures_by_reason  # not taken for a short body
    kept = [p for p in (tmp_path / "raw" / "00000" / "web").glob(".trajflow-tmp-dl-a.bin") if p.stat().st_size > 0]
    assert kept, "the bytes fetched so far stay for the next run to resume"


def test_a_body_longer_than_planned_is_cut_off_and_never_stored(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(2 * MiB, seed=7)
    url = server.add("/endless.bin", data)  # HEAD learns 2 MiB while planning
    server.script("/endless.bin", *["chunked-longer"] * 4)  # then every GET runs 64 MiB past it
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}]))
    assert summary.exit_code == ExitCode.TRANSIENT
    failure = summary.failed[0]
    assert failure.reason == "size" and f"more than {len(data)} bytes" in failure.error
    assert raw_files(tmp_path) == {}
    # each response was abandoned one byte past the plan, not read to its end (socket
    # buffers hold a few MiB of what the server wrote)
    server.clear_log()
    assert server.bytes_sent("/endless.bin") < 4 * (len(data) + 16 * MiB)


def test_a_throttled_head_is_retried_as_the_server_asks(server: FaultyServer, tmp_path: Path) -> None:
    data = payload(300_000, seed=8)
    url = server.add("/busy.bin", data)
    server.script("HEAD /busy.bin", "429", "503")
    began = time.monotonic()
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [url]}],
                                        retries={"attempts": 4, "backoffSeconds": 0.01, "maxBackoffSeconds": 5}))
    assert summary.exit_code == 0
    assert time.monotonic() - began >= 2.0  # each answer said Retry-After: 1 (the backoff is 0.01 s)
    heads = server.requests("/busy.bin", method="HEAD")
    assert [r.status for r in heads] == [429, 503, 200]
    # planned with its size, not as an item of unknown size
    items = json.loads((tmp_path / "plan" / "download.json").read_text())
    assert items["total_bytes"] == len(data)


def test_a_head_that_fails_otherwise_or_for_an_optional_source_plans_an_unknown_size(server: FaultyServer,
                                                                                       tmp_path: Path) -> None:
    """A server broken for HEAD only (GET works), or a throttled optional source, must not
    stop the plan of every shard."""
    data = payload(3000, seed=9)
    broken, optional = server.add("/broken.bin", data), server.add("/optional.bin", data)
    server.script("HEAD /broken.bin", *["500"] * 4)
    server.script("HEAD /optional.bin", *["429"] * 4)
    summary = run(tmp_path, make_config([{"type": "https", "name": "web", "urls": [broken]},
                                         {"type": "https", "name": "extra", "urls": [optional], "required": False}]))
    assert summary.exit_code == 0 and summary.count("fetched") == 2
    assert raw_files(tmp_path) == {"web/broken.bin": data, "extra/optional.bin": data}


def test_a_head_throttled_on_every_try_fails_planning_to_be_retried(server: FaultyServer, tmp_path: Path) -> None:
    """An unknown size in the shared plan would outlive the rush: the pod exits 4 instead."""
    url = server.add("/busy.bin", payload(1000))
    server.script("HEAD /busy.bin", *["429"] * 2)
    config = make_config([{"type": "https", "name": "web", "urls": [url]}],
                         retries={"attempts": 2, "backoffSeconds": 0.01, "maxBackoffSeconds": 0.05})
    with pytest.raises(TransientError, match=r"busy\.bin answered HEAD with HTTP 429 on every try while planning"):
        run(tmp_path, config)
    assert not (tmp_path / "plan" / "download.json").exists()


def test_an_item_another_process_is_fetching_is_waited_for_not_failed(server: FaultyServer, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A duplicate pod of one shard (or a second run on the run root) waits for the item
    the other one holds, then takes its verified copy instead of failing the shard."""
    import threading

    data = payload(8 * MiB, seed=11)
    url = server.add("/held.bin", data)
    server.rate_bytes_per_s = 3 * MiB  # about 3 s per copy: the second run starts well within it
    config = make_config([{"type": "https", "name": "web", "urls": [url]}])
    first: list[ShardSummary] = []
    holder = threading.Thread(target=lambda: first.append(run(tmp_path, config)))
    holder.start()
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while not (seen := hidden_files(tmp_path / "raw")) and time.monotonic() < deadline:  # its temporary and journal
        time.sleep(0.01)
    # the state this test is about: the first run is still fetching when the second starts
    assert seen, "the first run's temporary never appeared"

    with caplog.at_level(logging.INFO, logger="trajflow.download.shard"):
        second = run(tmp_path, config)
    holder.join(timeout=60)

    # the second run met the holder's lock and waited for it (not a skip of a finished copy)
    waited = [r.getMessage() for r in caplog.records
              if r.name == "trajflow.download.shard" and r.getMessage().endswith("; waiting for it to finish")]
    assert len(waited) == 1 and "another process is downloading this item" in waited[0], caplog.text
    assert first[0].exit_code == 0 and first[0].count("fetched") == 1
    assert second.exit_code == 0, [r.error for r in second.failed]
    assert second.count("skipped") == 1 and second.bytes_received == 0  # the holder's copy, not fetched twice
    assert raw_files(tmp_path) == {"web/held.bin": data}


@contextlib.contextmanager
def _hub(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on 127.0.0.1 (a free port); yields the base URL."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()


class _Handler(BaseHTTPRequestHandler):
    """A test hub's handler: keep-alive, no request log, HEAD answered `head_status` with no
    size (`Content-Length: 0`)."""

    protocol_version = "HTTP/1.1"
    head_status = 200

    def do_HEAD(self) -> None:
        self.send_response(self.head_status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("refusal", [403, 405, 501])
def test_a_server_refusing_head_is_sized_by_a_ranged_get_which_proves_ranges(tmp_path: Path, refusal: int) -> None:
    """405 (not allowed) and 501 (not implemented) both mean "no HEAD here", not a broken
    server, and so does a 403 to the HEAD of a presigned URL (signed for GET only): planning
    asks for byte 0 instead. A 206 with a total gives the size and proves
    ranges are served, even from a server that never sends the optional Accept-Ranges."""
    body = payload(11 * MiB, seed=13)
    asked: list[str] = []

    class Hub(_Handler):
        head_status = refusal

        def do_GET(self) -> None:
            asked.append(self.headers.get("Range", ""))
            first_s, _, last_s = self.headers.get("Range", "bytes=0-")[6:].partition("-")
            first, last = int(first_s), min(int(last_s) if last_s else len(body) - 1, len(body) - 1)
            self.send_response(206)  # no Accept-Ranges header
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
            self.send_header("Content-Length", str(last - first + 1))
            self.send_header("ETag", '"v1"')
            self.end_headers()
            self.wfile.write(body[first : last + 1])

    with _hub(Hub) as base:
        config = make_config([{"type": "https", "name": "hub", "urls": [f"{base}/matrix.bin"]}])
        _, items = ShardDownloader(LocalStorage(tmp_path), config, 0, 1).plan()
        assert items[0].size == len(body) and items[0].meta.get("size_known", True)
        assert items[0].meta.get("ranges") is True  # planned as a source serving ranges
        summary = run(tmp_path, config)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"hub/matrix.bin": body}
    assert sorted(asked) == sorted(["bytes=0-0", "bytes=0-5242879", "bytes=5242880-10485759", "bytes=10485760-11534335"])


def test_a_head_saying_content_length_zero_is_not_taken_as_the_size(tmp_path: Path) -> None:
    """Dynamic endpoints often answer HEAD with `Content-Length: 0` whatever they serve:
    planned as an empty file, every download would fail its size check. The item is
    planned with an unknown size and downloaded whole; a truly empty file still arrives."""
    files = {"/export.tsv": payload(300_000, seed=21), "/empty.txt": b""}

    class Hub(_Handler):
        def do_GET(self) -> None:
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with _hub(Hub) as base:
        config = make_config([{"type": "https", "name": "hub", "urls": [f"{base}{p}" for p in files]}])
        _, items = ShardDownloader(LocalStorage(tmp_path), config, 0, 1).plan()
        assert [i.meta.get("size_known", True) for i in items] == [False, False]
        summary = run(tmp_path, config)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {f"hub{p}": d for p, d in files.items()}


def test_an_item_declaring_more_bytes_than_the_run_root_holds_fails_alone_before_fetching(tmp_path: Path) -> None:
    """A HEAD claiming 10^18 bytes: the item is refused, naming its size and the volume's
    capacity, instead of its parts list exhausting memory or its bytes filling the volume;
    the other items are stored."""
    small = payload(1000, seed=3)
    asked: list[str] = []

    class Hub(_Handler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(10**18) if self.path == "/huge.bin" else str(len(small)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(small)))
            self.end_headers()
            self.wfile.write(small)

    with _hub(Hub) as base:
        config = make_config([{"type": "https", "name": "hub", "urls": [f"{base}/huge.bin", f"{base}/small.bin"]}])
        summary = run(tmp_path, config)
    assert summary.exit_code == ExitCode.PERMANENT
    assert [(r.item.key, r.kind) for r in summary.failed] == [("hub/huge.bin", "permanent")]
    capacity = LocalStorage(tmp_path).largest_object()
    assert f"declares 1,000,000,000,000,000,000 bytes, more than one object of {tmp_path.as_uri()} can hold " \
           f"({capacity:,} bytes)" in summary.failed[0].error
    assert asked == ["/small.bin"]
    assert raw_files(tmp_path) == {"hub/small.bin": small}


def test_exactly_max_redirects_are_followed_and_one_more_is_refused() -> None:
    """A hub or CDN chaining a few redirects (login, mirror, signed URL) works up to the
    limit; a loop ends with a permanent error instead of spinning."""
    from trajflow.download.failures import FetchError, Kind
    from trajflow.download.http import MAX_REDIRECTS, HttpClient

    paths: list[str] = []

    class Hops(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # /hop/N redirects to /hop/N-1; /hop/0 is the file
            paths.append(self.path)
            left = int(self.path.rsplit("/", 1)[1])
            self.send_response(302 if left else 200)
            if left:
                self.send_header("Location", f"/hop/{left - 1}")
            self.send_header("Content-Length", "0" if left else "4")
            self.end_headers()
            if not left:
                self.wfile.write(b"data")

        def log_message(self, *args: Any) -> None:
            pass

    client = HttpClient(timeout_s=5.0)
    with _hub(Hops) as base:
        body = client.get(f"{base}/hop/{MAX_REDIRECTS}")
        try:
            assert body.read(100) == b"data"
        finally:
            body.close()
        assert len(paths) == MAX_REDIRECTS + 1
        paths.clear()
        with pytest.raises(FetchError, match=rf"more than {MAX_REDIRECTS} redirects") as refused:
            client.get(f"{base}/hop/{MAX_REDIRECTS + 1}")
    assert refused.value.kind == Kind.PERMANENT
    assert len(paths) == MAX_REDIRECTS + 1  # the last Location is never requested


def _bounded(call: Any, wait_s: float = 15.0) -> Any:
    """``call()``'s result or exception, failing the test instead of hanging when it never
    returns (the thread is left behind; it ends once the test's server is gone)."""
    done: list[tuple[Any, BaseException | None]] = []

    def target() -> None:
        try:
            done.append((call(), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            done.append((None, exc))

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(wait_s)
    assert done, f"the call did not return within {wait_s} s"
    result, error = done[0]
    if error is not None:
        raise error
    return result


def test_a_redirect_whose_body_never_ends_is_not_read() -> None:
    """Redirects were drained to their end before being followed: an endless (or trickling)
    body held the download for ever."""
    from trajflow.download.http import HttpClient

    class Endless(_Handler):
        def do_GET(self) -> None:
            if self.path == "/file":
                self.send_response(200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"data")
                return
            self.send_response(302)
            self.send_header("Location", "/file")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
            except OSError:  # the client closed it
                pass

    client = HttpClient(timeout_s=5.0)
    with _hub(Endless) as base:
        body = _bounded(lambda: client.get(f"{base}/start"))
        try:
            assert body.read(100) == b"data"
        finally:
            body.close()


def test_a_redirect_to_an_unusable_location_is_a_permanent_error() -> None:
    from trajflow.download.failures import FetchError, Kind
    from trajflow.download.http import HttpClient

    class Broken(_Handler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://[::1/x")
            self.send_header("Content-Length", "0")
            self.end_headers()

    with _hub(Broken) as base, pytest.raises(FetchError, match=r"/start: redirected to an unusable location "
                                                                r"\(Invalid IPv6 URL\)") as refused:
        HttpClient(timeout_s=5.0).get(f"{base}/start")
    assert refused.value.kind == Kind.PERMANENT


def test_an_error_body_that_trickles_in_is_read_once_for_its_hint() -> None:
    """The hint from an error page was read to 4096 bytes: a body sent a byte at a time held
    each try for over half an hour, and a stalled one gave no hint at all."""
    from trajflow.download.failures import FetchError
    from trajflow.download.http import HttpClient

    release = threading.Event()

    class Stalling(_Handler):
        def do_GET(self) -> None:
            self.send_response(500)
            self.send_header("Content-Length", "4096")
            self.end_headers()
            self.wfile.write(b"Upstream database unavailable\n")
            self.wfile.flush()
            release.wait(30)  # the rest never comes while the client waits

    try:
        with _hub(Stalling) as base, pytest.raises(FetchError, match="Upstream database unavailable"):
            _bounded(lambda: HttpClient(timeout_s=20.0).get(f"{base}/page"))
    finally:
        release.set()


def _run_bounded(root: Path, config: DownloadConfig, wait_s: float = 15.0) -> ShardSummary:
    """`run`, failing the test instead of hanging when the download never ends."""
    return _bounded(lambda: run(root, config), wait_s)


def test_a_206_fragment_to_a_request_for_the_whole_object_fails_within_the_attempts(tmp_path: Path) -> None:
    """A cache that stored one 206 fragment serves it to every request: asking again from
    byte 0 gets the same answer, so each one is a failed try, not a free restart."""
    body = payload(1000, seed=21)
    gets: list[str] = []

    class Cache(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, send: bool) -> None:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 100-199/{len(body)}")
            self.send_header("Content-Length", "100")
            self.send_header("ETag", '"c"')
            self.end_headers()
            if send:
                self.wfile.write(body[100:200])

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"c"')
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            gets.append(self.headers.get("Range", ""))
            self._answer(True)

        def log_message(self, *args: Any) -> None:
            pass

    with _hub(Cache) as base:
        summary = _run_bounded(tmp_path, make_config([{"type": "https", "name": "web", "urls": [f"{base}/frag.bin"]}]))
    assert summary.exit_code == ExitCode.TRANSIENT
    failure = summary.failed[0]
    assert failure.reason == "server_error" and "206 bytes 100-199 to a request for the whole object" in failure.error
    assert len(gets) <= 4 and gets == [""] * len(gets)  # the attempts, each for the whole object
    assert raw_files(tmp_path) == {}


def test_an_object_of_unknown_size_replaced_between_responses_is_fetched_as_it_is_now(tmp_path: Path) -> None:
    """HEAD gives no size (unknown size); the first GET declares the old size and breaks off,
    the next serves a larger new version chunked: a fresh start takes the new size instead of
    holding the new body to the old one round after round."""
    old, new = payload(100_000, seed=22), payload(200_000, seed=23)
    gets: list[str] = []

    class Growing(_Handler):
        def do_GET(self) -> None:
            gets.append(self.headers.get("Range", ""))
            if len(gets) == 1:  # the old version, cut off half way
                self.send_response(200)
                self.send_header("Content-Length", str(len(old)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(old[:50_000])
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(new):x}\r\n".encode() + new + b"\r\n0\r\n\r\n")

    with _hub(Growing) as base:
        summary = _run_bounded(tmp_path, make_config([{"type": "https", "name": "web", "urls": [f"{base}/grow.tsv"]}]))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/grow.tsv": new}
    assert len(gets) <= 4
    # no size was declared for the bytes stored: the record does not claim a size check
    assert summary.results[0].record is not None and summary.results[0].record.checks == []


def test_a_body_of_unknown_size_ended_by_a_close_records_no_size_check(tmp_path: Path) -> None:
    """No HEAD size, no Content-Length: the close ends the body, which proves no size."""
    body = payload(100_000, seed=26)

    class Dynamic(BaseHTTPRequestHandler):  # HTTP/1.0: the body ends with the connection
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with _hub(Dynamic) as base:
        summary = _run_bounded(tmp_path, make_config([{"type": "https", "name": "web", "urls": [f"{base}/d.bin"]}]))
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/d.bin": body}
    record = summary.results[0].record
    assert record is not None and record.checks == []


def test_an_html_page_on_head_and_get_is_neither_planned_nor_stored(tmp_path: Path) -> None:
    """A maintenance page (or captive portal) answering 200 text/html to HEAD and GET is a
    passing server error: its size is not planned, nothing is stored, and the rerun fetches
    the file. An item named .html is a page, and is stored."""
    real = payload(700_000, seed=24)
    page = b"<html><body>Service temporarily down for maintenance</body></html>\n"
    down = [True]

    class Hub(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, send: bool) -> None:
            html = down[0] or self.path.endswith(".html")
            data = page if html else real
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8" if html else "text/tab-separated-values")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send:
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            self._answer(False)

        def do_GET(self) -> None:
            self._answer(True)

        def log_message(self, *args: Any) -> None:
            pass

    with _hub(Hub) as base:
        # a page asked for by its URL is one, whatever path it is stored under
        config = make_config([{"type": "https", "name": "web", "urls": [
            f"{base}/BRCA.tsv", f"{base}/index.html", {"url": f"{base}/about.html", "path": "about"}]}])
        _, items = ShardDownloader(LocalStorage(tmp_path), config, 0, 1).plan()
        sizes = {i.key: (i.size, i.meta.get("size_known", True)) for i in items}
        assert sizes == {"web/BRCA.tsv": (0, False), "web/index.html": (len(page), True),
                         "web/about": (len(page), True)}
        summary = _run_bounded(tmp_path, config)
        assert summary.exit_code == ExitCode.TRANSIENT
        failure = summary.failed[0]
        assert failure.item.key == "web/BRCA.tsv" and failure.reason == "server_error"
        assert "HTML page" in failure.error
        assert raw_files(tmp_path) == {"web/index.html": page, "web/about": page}
        down[0] = False
        rerun = _run_bounded(tmp_path, config)
    assert rerun.exit_code == 0 and rerun.count("fetched") == 1
    assert raw_files(tmp_path) == {"web/BRCA.tsv": real, "web/index.html": page, "web/about": page}


def _trickle(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    """Send ``data`` a byte every 0.2 s (under a 0.5 s read timeout) for at most 30 s, so the
    old code's thread ends too; then close the connection."""
    until = time.monotonic() + 30
    with contextlib.suppress(OSError):  # the client hanging up
        for i in range(len(data)):
            if time.monotonic() > until:
                break
            time.sleep(0.2)
            handler.wfile.write(data[i : i + 1])
            handler.wfile.flush()
    handler.close_connection = True


def test_a_body_trickling_below_the_low_speed_limit_is_dropped_and_resumed(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A server sending a byte now and then never trips the read timeout; the low-speed
    limit (window: LOW_SPEED_FACTOR x timeoutSeconds, here without the 60 s floor) drops
    it, and the retry continues from the bytes received."""
    from trajflow.download import http

    monkeypatch.setattr(http, "LOW_SPEED_MIN_S", 0.0)  # window 2 x 0.5 s
    body = payload(100_000, seed=25)
    ranges: list[str] = []

    class Trickle(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _headers(self, status: int, first: int) -> None:
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - first))
            self.send_header("ETag", '"t"')
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._headers(200, 0)

        def do_GET(self) -> None:
            ranges.append(self.headers.get("Range", ""))
            if ranges[-1]:
                first = int(ranges[-1][len("bytes="):].partition("-")[0])
                self._headers(206, first)
                self.wfile.write(body[first:])
                return
            self._headers(200, 0)
            self.wfile.write(body[:100])
            self.wfile.flush()
            _trickle(self, body[100:])

        def log_message(self, *args: Any) -> None:
            pass

    with _hub(Trickle) as base:
        config = make_config([{"type": "https", "name": "web", "urls": [f"{base}/slow.bin"]}], timeoutSeconds=0.5)
        summary = _run_bounded(tmp_path, config)
    assert summary.exit_code == 0, [r.error for r in summary.failed]
    assert raw_files(tmp_path) == {"web/slow.bin": body}
    assert len(ranges) == 2 and ranges[0] == "" and int(ranges[1][len("bytes="):].partition("-")[0]) >= 100


def test_response_headers_that_trickle_in_fail_the_try_at_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each byte of the headers arrives within the read timeout, so only a deadline over all
    of them (the read timeout plus one low-speed window) ends the try, as a transient timeout."""
    from trajflow.download import http
    from trajflow.download.failures import FetchError, Kind

    monkeypatch.setattr(http, "LOW_SPEED_MIN_S", 0.0)  # window 2 x 0.5 s, deadline 1.5 s

    class Trickle(_Handler):
        def do_GET(self) -> None:
            _trickle(self, b"HTTP/1.1 200 OK\r\nX-Padding: " + b"x" * 1000)

    with _hub(Trickle) as base, pytest.raises(FetchError) as failed:
        _bounded(lambda: http.HttpClient(timeout_s=0.5).get(f"{base}/slow-headers"))
    assert (failed.value.kind, failed.value.reason) == (Kind.TRANSIENT, "timeout")
    assert str(failed.value) == f"{base}/slow-headers: timed out: response headers not complete within 1.5 s"


def test_a_body_that_always_trickles_fails_within_the_attempts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each dropped try had received a few new bytes, which counted as progress and started
    the attempts over: a server trickling for ever was retried for ever."""
    from trajflow.download import http

    monkeypatch.setattr(http, "LOW_SPEED_MIN_S", 0.0)  # window 2 x 0.5 s
    body = payload(100_000, seed=26)
    tries: list[str] = []

    class Trickle(_Handler):
        def do_GET(self) -> None:
            tries.append(self.headers.get("Range", ""))
            first = int(tries[-1][len("bytes="):].partition("-")[0]) if tries[-1] else 0
            self.send_response(206 if first else 200)
            if first:
                self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - first))
            self.send_header("ETag", '"t"')
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            _trickle(self, body[first:])

    with _hub(Trickle) as base:
        config = make_config([{"type": "https", "name": "web", "urls": [f"{base}/slow.bin"]}],
                             timeoutSeconds=0.5, retries={"attempts": 2, "backoffSeconds": 0.01,
                                                          "maxBackoffSeconds": 0.05})
        summary = _run_bounded(tmp_path, config, wait_s=20.0)
    assert summary.exit_code == ExitCode.TRANSIENT
    assert "too slow" in summary.failed[0].error and len(tries) == 2
