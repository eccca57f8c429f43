"""`s3://bucket/prefix` backend (boto3; AWS or any S3-compatible endpoint).

Writes stream through a multipart upload that becomes visible only when completed, or a
single PUT for small objects, so readers never see a part. A killed writer leaves at most
an incomplete multipart upload, which the bucket's lifecycle rule (or `abort_stale_uploads`)
cleans up.
"""
from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import uuid
from typing import Any, BinaryIO, Iterator
from urllib.parse import urlparse

from trajflow.storage.base import ObjectInfo, Storage, check_key

log = logging.getLogger(__name__)

PART_SIZE = 16 * 1024 * 1024  # also the threshold between a single PUT and multipart
_conditional_support: dict[str, bool] = {}
_conditional_lock = threading.Lock()


def make_client(endpoint: str = "", region: str = "us-east-1", addressing_style: str = "path",
                anonymous: bool = False, max_pool: int = 32, timeout: float = 60.0) -> Any:
    """A boto3 S3 client; credentials from the standard AWS chain (env, profile, IRSA...)."""
    import boto3
    import botocore
    from botocore.config import Config

    cfg = Config(
        region_name=region or "us-east-1",
        s3={"addressing_style": addressing_style},
        retries={"max_attempts": 5, "mode": "adaptive"},
        max_pool_connections=max_pool,
        connect_timeout=timeout,
        read_timeout=timeout,
        signature_version=botocore.UNSIGNED if anonymous else None,
        # keep checksums compatible with S3-compatible servers that lack the newer ones
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=cfg)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def _is_not_found(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


class _MultipartWriter(io.RawIOBase):
    """Buffers one part at a time; a single PUT when the object fits in one part."""

    def __init__(self, client: Any, bucket: str, key: str, part_size: int):
        self._client, self._bucket, self._key, self._part_size = client, bucket, key, part_size
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self._buf += view
        while len(self._buf) >= self._part_size:
            self._flush_part(bytes(self._buf[: self._part_size]))
            del self._buf[: self._part_size]
        return len(view)

    def _flush_part(self, body: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        resp = self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body
        )
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def commit(self) -> None:
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buf))
            return
        if self._buf:
            self._flush_part(bytes(self._buf))
            self._buf.clear()
        self._client.complete_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
        )

    def abort(self) -> None:
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)


class S3Storage(Storage):
    def __init__(self, uri: str, client: Any = None, part_size: int = PART_SIZE, **client_kwargs: Any):
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = client or make_client(**client_kwargs)
        self.part_size = part_size
        self._client_kwargs = client_kwargs

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if prefix:
            full = self._key(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "")
        else:
            full = self.prefix + "/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield ObjectInfo(self._rel(obj["Key"]), int(obj["Size"]), obj.get("ETag", "").strip('"'))

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:  # botocore ClientError
            if _is_not_found(exc):
                return None
            raise
        return ObjectInfo(key, int(resp["ContentLength"]), resp.get("ETag", "").strip('"'))

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            if end is not None and end <= start:
                return io.BytesIO(b"")  # type: ignore[return-value]
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = self.client.get_object(**kwargs)
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{self.uri}/{key}") from None
            raise
        return resp["Body"]  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        w = _MultipartWriter(self.client, self.bucket, self._key(key), self.part_size)
        try:
            yield w  # type: ignore[misc]
            w.commit()
        except BaseException:
            w.abort()
            raise

    def _supports_conditional_put(self) -> bool:
        """Probe once per endpoint whether `If-None-Match: *` is honoured (not just ignored)."""
        endpoint = self.client.meta.endpoint_url
        with _conditional_lock:
            if endpoint in _conditional_support:
                return _conditional_support[endpoint]
            probe = self._key(f".trajflow-probe-{uuid.uuid4().hex}")
            supported = False
            try:
                self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
                try:
                    self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
                except Exception as exc:
                    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                    supported = status in (409, 412)
            except Exception as exc:
                log.debug("conditional PUT probe failed: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=probe)
            if not supported:
                log.warning("%s ignores conditional writes; using claim-and-elect for first-writer-wins", endpoint)
            _conditional_support[endpoint] = supported
            return supported

    def write_if_absent(self, key: str, data: bytes) -> bool:
        if self._supports_conditional_put():
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
                return True
            except Exception as exc:
                status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status in (409, 412):
                    return False
                raise
        return self._elect(key, data)

    def _elect(self, key: str, data: bytes) -> bool:
        """Fallback for servers without conditional PUT: every contender writes a claim; the
        earliest claim (by name: time, then random) wins and is copied to `key`. All
        contenders agree because they copy the same winner."""
        if self.exists(key):
            return False
        claims = f"{key}.claims"
        mine = f"{claims}/{time.time_ns():020d}-{uuid.uuid4().hex}"
        self.write_bytes(mine, data)
        winner = min(info.key for info in self.list(claims + "/"))
        if not self.exists(key):
            self.write_bytes(key, self.read_bytes(winner))
        return winner == mine

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def child(self, prefix: str) -> "S3Storage":
        return S3Storage(f"s3://{self.bucket}/{self._key(prefix)}", client=self.client, part_size=self.part_size)

    def abort_stale_uploads(self, older_than_s: float = 86400.0) -> int:
        """Abort incomplete multipart uploads under this root left by killed writers."""
        import datetime as dt

        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=older_than_s)
        aborted = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for up in page.get("Uploads", []):
                if up["Initiated"] < cutoff:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        return aborted
