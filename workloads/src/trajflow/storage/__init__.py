"""One storage interface over `file://` and `s3://` run roots."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from trajflow.errors import ConfigError, InvalidURI
from trajflow.storage.base import CHUNK, ObjectInfo, Storage, sha256_stream
from trajflow.storage.local import LocalStorage
from trajflow.storage.manifest import (
    PLAN_KEY,
    STAGE_DIRS,
    TRAIN_METRICS_KEY,
    done_shards,
    manifest_key,
    read_manifest,
    read_manifest_fields,
    read_train_metrics,
    remove_foreign_manifests,
    shard_name,
    update_manifest,
    write_manifest,
)

if TYPE_CHECKING:
    from trajflow.config.global_ import GlobalConfig

log = logging.getLogger(__name__)

# which release a run root is: the first pod of a release writes it
OWNER_KEY = ".trajflow-owner.json"


def open_storage(uri: str | Path, **s3_options: object) -> Storage:
    """`file:///abs/path`, a plain path, or `s3://bucket/prefix`.

    For S3, `s3_options` are `endpoint`, `region`, `addressing_style` (boto3 client
    settings; credentials come from the standard AWS chain), or a ready `client`.
    Raises InvalidURI (a ConfigError and a ValueError) naming what is wrong.
    """
    if isinstance(uri, Path):
        return LocalStorage(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidURI(f"empty storage URI {uri!r}: use file:///path, a path, or s3://bucket/prefix")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from trajflow.storage.s3 import S3Storage

        return S3Storage(uri, **s3_options)  # type: ignore[arg-type]
    if s3_options:
        raise InvalidURI(f"S3 options {sorted(s3_options)} given for a non-S3 URI {uri!r}")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURI(f"file URI with a host is not supported: {uri!r} (use file:///absolute/path)")
        if not parsed.path.startswith("/"):
            raise InvalidURI(f"file URI must hold an absolute path: {uri!r}")
        return LocalStorage(unquote(parsed.path))
    if parsed.scheme == "":
        return LocalStorage(Path(uri))
    raise InvalidURI(f"unsupported storage URI {uri!r}: use file:///path, a plain path, or s3://bucket/prefix")


def open_run_root(glob: "GlobalConfig", **client_options: object) -> Storage:
    """The run root named by `global.storage` and `global.runId`; on S3, `client_options`
    go to `S3Storage` (`upload_threads`) and its client (`timeout`, `attempts`, `max_pool`:
    see `make_client`)."""
    s3 = glob.storage.s3
    options: dict[str, object] = {}
    if glob.storage.type == "s3":
        options = {"endpoint": s3.endpoint, "region": s3.region, "addressing_style": s3.addressing_style,
                   **client_options}
    storage = open_storage(glob.run_root(), **options)
    from trajflow.metrics import NAMESPACE_ENV, RELEASE_ENV

    namespace, release = os.environ.get(NAMESPACE_ENV), os.environ.get(RELEASE_ENV)
    if namespace and release:  # in a pod of the chart
        claim_run_root(storage, namespace, release, take_over_from=glob.storage.take_over_from)
    return storage


def claim_run_root(storage: Storage, namespace: str, release: str, take_over_from: str = "") -> None:
    """Note the run root as release `namespace/release`'s, or refuse it when another
    release's, unless that is `take_over_from` (`<namespace>/<release>`): two releases given
    the same runId and storage (a values file that pins both) would replace each other's
    plan, manifests and checkpoints. A store that cannot say is no reason to stop (a
    read-only credential, a torn record)."""
    mine = {"namespace": namespace, "release": release}
    encoded = json.dumps(mine, sort_keys=True).encode()
    try:
        storage.write_if_absent(OWNER_KEY, encoded)
        owner = json.loads(storage.read_bytes(OWNER_KEY))
        if isinstance(owner, dict) and take_over_from == f"{owner.get('namespace')}/{owner.get('release')}":
            storage.write_bytes(OWNER_KEY, encoded)
            log.warning("%s was the run root of release %s: this release takes it over", storage.uri, take_over_from)
            owner = mine
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("cannot tell which release %s belongs to (%s): going on", storage.uri, exc)
        return
    if isinstance(owner, dict) and {k: owner.get(k) for k in mine} != mine:
        raise ConfigError(
            f"{storage.uri} is the run root of release {owner.get('release')!r} in namespace {owner.get('namespace')!r} "
            f"({storage.uri}/{OWNER_KEY}), not of {release!r} in {namespace!r}: releases sharing a runId and storage "
            "overwrite each other's data; give this release its own global.runId (or, to take that run over once the "
            f"other release is gone, set global.storage.takeOverFrom={owner.get('namespace')}/{owner.get('release')})")


__all__ = [
    "CHUNK",
    "OWNER_KEY",
    "PLAN_KEY",
    "STAGE_DIRS",
    "TRAIN_METRICS_KEY",
    "LocalStorage",
    "ObjectInfo",
    "Storage",
    "claim_run_root",
    "done_shards",
    "manifest_key",
    "open_run_root",
    "open_storage",
    "read_manifest",
    "read_manifest_fields",
    "read_train_metrics",
    "remove_foreign_manifests",
    "sha256_stream",
    "shard_name",
    "update_manifest",
    "write_manifest",
]
