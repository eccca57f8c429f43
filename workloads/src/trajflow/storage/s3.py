"""`s3://bucket/prefix` backend (boto3; AWS or any S3-compatible endpoint).

Writes stream through a multipart upload that becomes visible only when completed, or a
single PUT for small objects, so readers never see a part. A killed writer leaves at most
an incomplete multipart upload: the stage that wrote it (a download shard, a preprocessing
shard, training's checkpoints) aborts it when it next runs (`abort_stale_uploads`), as does a
bucket's lifecycle rule (AbortIncompleteMultipartUpload).
"""
from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import uuid
from typing import Any, BinaryIO, Callable, Iterator

from trajflow.config import formats
from trajflow.errors import InvalidURI, StorageUnavailable
from trajflow.storage.base import INTERNAL_PREFIX, ObjectInfo, Storage, check_key, check_prefix, check_range, is_internal

log = logging.getLogger(__name__)

PART_SIZE = 16 * 1024 * 1024  # also the threshold between a single PUT and multipart
CONNECT_TIMEOUT_S = 10.0
_NO_ANSWER = "trajflow_no_answer"  # a request's context: why its last attempt got no answer
_OBJECT = "trajflow_object"  # a request's context: the object (or prefix) it is about
UPLOAD_CONCURRENCY = 4  # parts of one object uploading at once, on threads of its writer
_WRITER_META = "trajflow-writer"  # a conditional write's own token, to know it from another's
# (endpoint, bucket) -> whether `If-None-Match: *` is enforced there
_conditional_support: dict[tuple[str, str], bool] = {}
_conditional_lock = threading.Lock()
# Fallback election without conditional writes: how long a contender waits after its claim
# before reading the claims. It must exceed the store's LastModified resolution (1 s on
# many servers) plus the time a claim takes to become visible.
ELECT_SETTLE_S = 2.5


def make_client(endpoint: str = "", region: str = "us-east-1", addressing_style: str = "path",
                anonymous: bool = False, max_pool: int = 32, timeout: float = 60.0, attempts: int = 8,
                credentials: dict[str, str] | None = None, verify: str | None = None) -> Any:
    """A boto3 S3 client; `credentials` (boto3 Session arguments) or else the standard AWS
    chain (env, profile, IRSA...); `verify` a CA bundle to trust instead of the system's.
    A call that gets no answer gives up after about (`attempts` + 1) x `timeout` seconds (the
    first try and `attempts` retries), and says so at each retry (else a dead endpoint means
    minutes of silence)."""
    import boto3
    import botocore
    from botocore.config import Config

    cfg = Config(
        region_name=region or "us-east-1",
        s3={"addressing_style": addressing_style},
        retries={"max_attempts": attempts, "mode": "standard"},
        max_pool_connections=max_pool,
        # a connection not made in seconds is a dead endpoint or dropped packets, not a slow store
        connect_timeout=min(timeout, CONNECT_TIMEOUT_S),
        read_timeout=timeout,
        # SigV4 throughout: left to botocore, presigned links in us-east-1 and other older
        # regions are SigV2, which R2, B2 and newer AWS buckets refuse
        signature_version=botocore.UNSIGNED if anonymous else "s3v4",
        # keep checksums compatible with S3-compatible servers that lack the newer ones
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        client = boto3.session.Session(**(credentials or {})).client("s3", endpoint_url=endpoint or None, config=cfg,
                                                                      verify=verify or None)
    except ValueError as exc:  # botocore's own check of the endpoint, stricter than a URL's
        raise InvalidURI(f"S3 endpoint {formats.without_secrets(endpoint)!r}: {exc}") from None
    where = endpoint or f"S3 ({region or 'us-east-1'})"

    def note_no_answer(caught_exception: Exception | None = None, request_dict: Any = None, **_: Any) -> None:
        # no answer at all (a refused or dropped connection, a timeout); botocore decides
        # after this whether it retries (its retry quota may say no)
        if caught_exception is not None and request_dict is not None:
            request_dict["context"][_NO_ANSWER] = caught_exception

    def tell_retry(request: Any, **_: Any) -> None:
        context = request.context
        attempt = int(context.get("retries", {}).get("attempt", 1))
        if attempt > 1 and _NO_ANSWER in context:
            log.warning("%s did not answer (%s); trying again (attempt %d of %d)", where, context.pop(_NO_ANSWER),
                        attempt, attempts + 1)  # botocore's max_attempts counts the retries

    def note_object(params: Any, context: Any, **_: Any) -> None:
        if isinstance(params, dict) and params.get("Bucket"):
            context[_OBJECT] = f"s3://{params['Bucket']}/{params.get('Key') or params.get('Prefix') or ''}"

    def name_object(http_response: Any, parsed: Any, context: Any, **_: Any) -> None:
        # botocore's error names the operation only ("SlowDown when calling PutObject"): the
        # object (or listed prefix) goes into its message, which every stage's error repeats
        error = parsed.get("Error") if isinstance(parsed, dict) else None
        if getattr(http_response, "status_code", 0) >= 300 and isinstance(error, dict) and _OBJECT in context:
            error["Message"] = f"{error.get('Message') or 'no message'} ({context[_OBJECT]})"

    client.meta.events.register("needs-retry.s3", note_no_answer)
    client.meta.events.register("request-created.s3", tell_retry)
    client.meta.events.register("before-parameter-build.s3", note_object)
    client.meta.events.register("after-call.s3", name_object)
    return client


_BUCKET = formats.go_regex(formats.S3_BUCKET_OR_EMPTY)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; InvalidURI (a ConfigError) when malformed.
    The prefix is taken literally, as keys are ('#' and '?' are characters of a key, as
    in a source's URL)."""
    bucket, _, prefix = uri[len("s3://"):].partition("/") if uri.startswith("s3://") else ("", "", "")
    if not bucket:
        raise InvalidURI(f"not an s3:// URI: {uri!r} (expected s3://bucket/prefix)")
    if not _BUCKET.match(bucket):
        raise InvalidURI(f"invalid bucket name {bucket!r} in {uri!r}: 3-63 lowercase letters, digits, '.' "
                         "and '-', starting and ending with a letter or digit")
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ValueError:
            raise InvalidURI(f"invalid key prefix {prefix!r} in {uri!r}: empty, '.' or '..' segment") from None
    return bucket, prefix


def _response(exc: Exception) -> dict[str, Any]:
    # botocore's timeouts and dropped connections carry no response (None)
    return getattr(exc, "response", None) or {}


def error_code(exc: Exception) -> str:
    return str(_response(exc).get("Error", {}).get("Code", ""))


def http_status(exc: Exception) -> int | None:
    return _response(exc).get("ResponseMetadata", {}).get("HTTPStatusCode")


def is_not_found(exc: Exception) -> bool:
    return error_code(exc) in ("404", "NoSuchKey", "NotFound")


class _MultipartWriter(io.RawIOBase):
    """Streams an object as a multipart upload that becomes visible only when completed,
    or as one PUT when it fits in a single part.

    Up to `concurrency` parts upload in the background while the caller produces the
    next one; memory stays within (concurrency + 1) parts. They upload on threads of the
    writer's own, or on a `pool` shared by the writers of a storage (`upload_threads`).

    S3 takes at most 10,000 parts, and the size is not known up front: the part size
    doubles every 1,000 parts (up to 5 GiB), so an object may grow to S3's 5 TiB while
    objects under 1,000 parts (15.6 GiB at 16 MiB) keep the configured part size.
    """

    PARTS_PER_SIZE = 1000
    MAX_PART = 5 << 30
    MAX_PARTS = 10_000

    @classmethod
    def largest(cls, part_size: int) -> int:
        """The bytes of MAX_PARTS parts of the sizes `write` cuts."""
        return sum(cls._tier_size(part_size, n // cls.PARTS_PER_SIZE) for n in range(cls.MAX_PARTS))

    @classmethod
    def _tier_size(cls, part_size: int, tier: int) -> int:
        return min(part_size << tier, max(part_size, cls.MAX_PART))

    def __init__(self, client: Any, bucket: str, key: str, part_size: int, concurrency: int = UPLOAD_CONCURRENCY,
                 pool: Any = None):
        self._client, self._bucket, self._key, self._part_size = client, bucket, key, part_size
        self._concurrency = max(1, concurrency)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._next_part = 1
        self._shared_pool = pool
        self._pool: Any = None
        self._inflight: list[Any] = []  # futures of (part number, ETag), in part order
        self._done: list[dict[str, Any]] = []

    def writable(self) -> bool:
        return True

    def _current_part_size(self) -> int:
        return self._tier_size(self._part_size, (self._next_part - 1) // self.PARTS_PER_SIZE)

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self._buf += view
        while len(self._buf) >= (size := self._current_part_size()):
            self._wait_for_room()  # before the copy: the parts in flight, this one and the buffer stay bounded
            self._send_part(bytes(self._buf[:size]))
            del self._buf[:size]
        return len(view)

    def _wait_for_room(self) -> None:
        """Wait until fewer than `concurrency` parts are in flight (a future leaves the list
        only once done: an interrupted wait leaves it to `abort`)."""
        while len(self._inflight) >= self._concurrency:
            self._done.append(self._inflight[0].result())
            self._inflight.pop(0)

    def _upload(self, number: int, body: bytes) -> dict[str, Any]:
        resp = self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _send_part(self, body: bytes) -> None:
        if self._upload_id is None:
            from trajflow.threads import DaemonPool

            self._upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"]
            self._pool = self._shared_pool or DaemonPool(self._concurrency, "s3-part")
        self._inflight.append(self._pool.submit(self._upload, self._next_part, body))
        self._next_part += 1

    def commit(self) -> None:
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buf))
            return
        if self._buf:
            self._wait_for_room()
            self._send_part(bytes(self._buf))
            self._buf.clear()
        while self._inflight:  # a failed part raises here: `abort` then drops the rest
            self._done.append(self._inflight[0].result())
            self._inflight.pop(0)
        self._release_pool()
        self._client.complete_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._done}
        )

    def _release_pool(self, wait: bool = True) -> None:
        """Cancel this writer's parts still queued and (``wait``) wait for those uploading (not
        for other writers' parts queued before them in a shared pool); a pool of its own is shut down."""
        from concurrent.futures import wait as wait_for

        uploading = [future for future in self._inflight if not future.cancel()]
        if wait:
            wait_for(uploading)
        self._inflight.clear()
        if self._pool is not self._shared_pool:
            self._pool.shutdown(wait=wait)

    def abort(self, stopping: bool = False) -> None:
        """Drop the upload. ``stopping`` (a stop signal): at once, with no call to a store that
        may be what stalls; the upload is left to `abort_uploads` or the bucket's lifecycle rule."""
        if self._pool is not None:
            self._release_pool(wait=not stopping)  # no part lands after the abort below
        if self._upload_id is not None and not stopping:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)


class _ObjectReader(io.RawIOBase):
    """The body of one GET, held to its Content-Length: a connection that ends or breaks
    early is resumed from the byte where it stopped (pinned to the same object by ETag), a
    few times, and then raises. A bare botocore body used as a context manager yields the
    raw urllib3 stream, which reads an early end of the connection as the end of the object."""

    RESUMES = 3

    def __init__(self, storage: "S3Storage", key: str, start: int, resp: dict[str, Any]):
        self._storage, self._key_name = storage, key
        self._body = resp["Body"]
        self._pos = start
        self._end = start + int(resp["ContentLength"])
        self._etag = resp.get("ETag")
        self._resumes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = self._end - self._pos if size is None or size < 0 else min(size, self._end - self._pos)
        parts = []
        while want > 0:
            chunk = self._read_some(want)
            parts.append(chunk)
            want -= len(chunk)
            if size is not None and size >= 0:
                break  # like any stream, a sized read may return fewer bytes
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def _read_some(self, want: int) -> bytes:
        import botocore.exceptions
        import urllib3.exceptions

        while True:
            try:
                chunk = self._body.read(want)
                cause: Exception | None = None
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
                chunk, cause = b"", exc
            if chunk:
                self._pos += len(chunk)
                return chunk  # type: ignore[no-any-return]
            self._resume(cause)

    def _resume(self, cause: Exception | None) -> None:
        where = f"{self._storage.uri}/{self._key_name}"
        self._body.close()
        if self._resumes >= self.RESUMES:
            raise StorageUnavailable(f"{where}: the connection ended at byte {self._pos} of {self._end} "
                                     f"{self.RESUMES + 1} times ({cause or 'no more data'})")
        self._resumes += 1
        log.warning("%s: the connection ended at byte %d of %d (%s); resuming", where, self._pos, self._end,
                    cause or "no more data")
        kwargs: dict[str, Any] = {"Bucket": self._storage.bucket, "Key": self._storage._key(self._key_name),
                                  "Range": f"bytes={self._pos}-{self._end - 1}"}
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            self._body = self._storage.client.get_object(**kwargs)["Body"]
        except Exception as exc:
            if http_status(exc) == 412 or error_code(exc) == "PreconditionFailed":
                raise StorageUnavailable(f"{where}: the object was replaced while it was being read") from None
            raise

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Storage(Storage):
    def __init__(self, uri: str, client: Any = None, part_size: int = PART_SIZE,
                 elect_settle_s: float = ELECT_SETTLE_S, upload_concurrency: int = UPLOAD_CONCURRENCY,
                 upload_threads: int = 0, **client_kwargs: Any):
        """``upload_threads``: threads all writers share for their parts (0: each writer
        uploads on `upload_concurrency` threads of its own, so threads grow with writers)."""
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = client or make_client(**client_kwargs)
        if part_size < 5 * 1024 * 1024:
            raise ValueError(f"part_size {part_size} is below S3's 5 MiB minimum for multipart parts")
        self.part_size = part_size
        self.elect_settle_s = elect_settle_s
        self.upload_concurrency = upload_concurrency
        self.upload_threads = upload_threads
        self._uploads: dict[str, Any] = {"lock": threading.Lock(), "pool": None}  # shared with children

    def largest_object(self) -> int:
        """What one multipart upload of this storage's writer holds (the store may allow less:
        AWS refuses objects over its own maximum when the upload completes)."""
        return _MultipartWriter.largest(self.part_size)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # S3 promises UTF-8 binary order but S3-compatible servers differ (SeaweedFS lists
        # directory by directory), so sort here: code point order equals UTF-8 byte order.
        infos = [info for info, _ in self._list_raw(check_prefix(prefix)) if not is_internal(info.key)]
        yield from sorted(infos, key=lambda i: i.key)

    def _list_raw(self, prefix: str) -> Iterator[tuple[ObjectInfo, Any]]:
        """(info, LastModified) of every object under the string prefix, hidden ones included."""
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
            for obj in page.get("Contents", []):
                full = obj["Key"]
                if full.endswith("/"):
                    continue  # a "directory" marker some tools create, not an object
                info = ObjectInfo(full[len(root):], int(obj["Size"]), obj.get("ETag", "").strip('"'))
                yield info, obj.get("LastModified")

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # botocore ClientError
            if is_not_found(exc):
                return None
            if http_status(exc) == 403:
                # S3 answers 403 instead of 404 for a missing key when ListBucket is not granted
                raise PermissionError(
                    f"{self.uri}/{key}: access denied (a refused HEAD gives no reason): check the credentials, "
                    f"which need s3:GetObject and s3:ListBucket on bucket {self.bucket!r}"
                ) from exc
            raise
        return ObjectInfo(key, int(resp["ContentLength"]), resp.get("ETag", "").strip('"'))

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        check_range(start, end)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            if end is not None and end <= start:
                if not self.exists(key):
                    raise FileNotFoundError(f"{self.uri}/{key}")
                return io.BytesIO(b"")  # type: ignore[return-value]
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self.client.get_object(**kwargs)
        except Exception as exc:
            if is_not_found(exc):
                raise FileNotFoundError(f"{self.uri}/{key}") from None
            if error_code(exc) == "InvalidRange" or http_status(exc) == 416:
                return io.BytesIO(b"")  # type: ignore[return-value]  # start at or past the end, as a slice
            raise
        return _ObjectReader(self, key, start, resp)  # type: ignore[return-value]

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        pool = None
        if self.upload_threads:
            with self._uploads["lock"]:
                if self._uploads["pool"] is None:
                    from trajflow.threads import DaemonPool

                    self._uploads["pool"] = DaemonPool(self.upload_threads, "s3-part")
                pool = self._uploads["pool"]
        w = _MultipartWriter(self.client, self.bucket, self._key(key), self.part_size, self.upload_concurrency, pool)
        try:
            yield w  # type: ignore[misc]
            w.commit()
        except BaseException as exc:
            w.abort(stopping=not isinstance(exc, Exception))  # Terminated, Ctrl-C
            raise

    def _supports_conditional_put(self) -> bool:
        """Probe once per endpoint and bucket whether `If-None-Match: *` is enforced (some
        servers accept the header and overwrite anyway, which would elect two winners)."""
        cache_key = (str(self.client.meta.endpoint_url), self.bucket)
        with _conditional_lock:
            if cache_key in _conditional_support:
                return _conditional_support[cache_key]
            probe = self._key(f"{INTERNAL_PREFIX}probe-{uuid.uuid4().hex}")
            supported: bool | None = None
            try:
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
            except Exception as exc:
                if http_status(exc) in (400, 501) or error_code(exc) in ("NotImplemented", "InvalidArgument"):
                    supported = False  # the header itself is refused
                elif http_status(exc) in (409, 412):
                    supported = True  # a retry met the first try, which landed with its reply lost
                else:
                    raise
            else:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
                    supported = False  # silently overwritten
                except Exception as exc:
                    if http_status(exc) in (409, 412):
                        supported = True
                    else:
                        raise
            finally:
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=probe)
            if not supported:
                log.warning(
                    "%s (bucket %s) does not enforce conditional writes; first-writer-wins uses claims instead",
                    cache_key[0], self.bucket,
                )
            _conditional_support[cache_key] = bool(supported)
            return bool(supported)

    def write_if_absent(self, key: str, data: bytes) -> bool:
        if not self._supports_conditional_put():
            return self._elect(key, data)
        full = self._key(key)
        token = uuid.uuid4().hex
        for attempt in range(8):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*",
                                       Metadata={_WRITER_META: token})
                return True
            except Exception as exc:
                status = http_status(exc)
                if status == 412:
                    # botocore retries a write whose reply was lost: the object met may be this one
                    return self._written_by(key, token, data)
                if status != 409:
                    raise
                # 409: another conditional write to this key is in flight; its outcome decides
                time.sleep(min(0.05 * 2**attempt, 2.0))
        if self.exists(key):
            return False
        raise RuntimeError(f"{self.uri}/{key}: conditional write kept conflicting and nothing was written")

    def _written_by(self, key: str, token: str, data: bytes) -> bool:
        """Whether the object met is this writer's: its token, or on a store that keeps no
        metadata, its bytes (the documents written this way name their writer)."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if is_not_found(exc):
                return False  # written by another, and deleted since
            raise
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}  # servers differ in case
        if _WRITER_META in meta:
            return bool(meta[_WRITER_META] == token)
        try:
            return int(head.get("ContentLength", -1)) == len(data) and self.read_bytes(key) == data
        except FileNotFoundError:
            return False  # deleted since

    def _elect(self, key: str, data: bytes) -> bool:
        """First-writer-wins without conditional writes.

        Each contender stores its data, then a small claim marker, waits `elect_settle_s`,
        and lists the claims. The winner is the claim with the earliest LastModified (ties:
        the smallest name). Contenders agree: a claim missing from another contender's
        listing was made after that listing, so at least one settle period after that
        contender's own claim, hence with a strictly later LastModified. Every contender
        then writes the winner's data to `key` (the same bytes), so `key` holds the winner
        whoever returns first. Claims are kept (hidden from listings): removing one could
        change a late contender's view. This relies on the store's clock being monotonic.
        """
        if self.exists(key):
            return False
        directory, _, name = key.rpartition("/")
        claims = f"{directory + '/' if directory else ''}{INTERNAL_PREFIX}claims-{name}/"
        token = uuid.uuid4().hex
        self.write_bytes(f"{claims}{token}.data", data)
        self.write_bytes(f"{claims}{token}", b"")
        time.sleep(self.elect_settle_s)
        markers = [(modified, info.key) for info, modified in self._list_raw(claims) if not info.key.endswith(".data")]
        winner = min(markers)[1]
        if not self.exists(key):
            self.write_bytes(key, self.read_bytes(f"{winner}.data"))
        return winner == f"{claims}{token}"

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def abort_uploads(self, prefix: str, older_than_s: float,
                      which: Callable[[str], bool] = lambda key: True) -> list[str]:
        """Abort the multipart uploads under `prefix` begun over `older_than_s` ago (of keys
        `which` picks), and return their keys: a killed writer's, never visible as an object,
        but stored and billed until a lifecycle rule (the bucket may have none) aborts them."""
        import datetime as dt

        root = f"{self.prefix}/" if self.prefix else ""
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
        aborted = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=root + check_prefix(prefix)):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < cutoff and which(upload["Key"][len(root):]):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted.append(upload["Key"][len(root):])
        return aborted

    def abort_stale_uploads(self, prefix: str, older_than_s: float,
                            which: Callable[[str], bool] = lambda key: True) -> None:
        try:
            aborted = self.abort_uploads(prefix, older_than_s, which)
        except Exception as exc:  # noqa: BLE001  a store without the call, or refusing it: a lifecycle rule's job
            log.warning("could not abort stale uploads under %s/%s: %s", self.uri, prefix, exc)
            return
        if aborted:
            log.info("aborted %d upload(s) that killed runs left, such as %s", len(aborted), aborted[0])

    def child(self, prefix: str) -> "S3Storage":
        child = S3Storage(
            f"s3://{self.bucket}/{self._key(prefix)}", client=self.client, part_size=self.part_size,
            elect_settle_s=self.elect_settle_s, upload_concurrency=self.upload_concurrency,
            upload_threads=self.upload_threads,
        )
        child._uploads = self._uploads  # one set of upload threads, as one client
        return child
