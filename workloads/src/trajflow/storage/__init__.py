"""One storage interface over `file://` and `s3://` run roots."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from trajflow.storage.base import CHUNK, ObjectInfo, Storage, sha256_stream
from trajflow.storage.local import LocalStorage
from trajflow.storage.manifest import (
    PLAN_KEY,
    STAGE_DIRS,
    done_shards,
    manifest_key,
    read_manifest,
    shard_name,
    write_manifest,
)

if TYPE_CHECKING:
    from trajflow.config.global_ import GlobalConfig


def open_storage(uri: str, **s3_options: object) -> Storage:
    """`file:///abs/path`, a plain path, or `s3://bucket/prefix` (options go to the boto3 client)."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from trajflow.storage.s3 import S3Storage

        return S3Storage(uri, **s3_options)  # type: ignore[arg-type]
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a host is not supported: {uri!r}")
        return LocalStorage(unquote(parsed.path))
    if parsed.scheme == "":
        return LocalStorage(Path(uri))
    raise ValueError(f"unsupported storage URI {uri!r}: use file://, a path, or s3://")


def open_run_root(glob: "GlobalConfig") -> Storage:
    """The run root named by `global.storage` and `global.runId`."""
    s3 = glob.storage.s3
    options = {}
    if glob.storage.type == "s3":
        options = {"endpoint": s3.endpoint, "region": s3.region, "addressing_style": s3.addressing_style}
    return open_storage(glob.run_root(), **options)


__all__ = [
    "CHUNK",
    "PLAN_KEY",
    "STAGE_DIRS",
    "LocalStorage",
    "ObjectInfo",
    "Storage",
    "done_shards",
    "manifest_key",
    "open_run_root",
    "open_storage",
    "read_manifest",
    "sha256_stream",
    "shard_name",
    "write_manifest",
]
