"""`downloader.config` — what to fetch and how hard to try."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from trajflow.config.base import Model

_SOURCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class S3Source(Model):
    type: Literal["s3"]
    name: str = Field(pattern=_SOURCE_NAME, description="Items land under raw/<shard>/<name>/.")
    url: str = Field(pattern=r"^s3://[^/]+(/.*)?$", description="s3://bucket/prefix to list.")
    endpoint: str = Field("", description="S3-compatible endpoint URL; empty means AWS.")
    region: str = "us-east-1"
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    anonymous: bool = Field(False, description="Unsigned requests (public buckets).")
    include: list[str] = Field(default_factory=lambda: ["**"], description="Glob patterns of keys to fetch.")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of keys to skip.")


class UrlItem(Model):
    url: str = Field(pattern=r"^https?://")
    path: str = Field("", description="Destination path under the source; default: the URL's file name.")
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    md5: str = Field("", pattern=r"^([0-9a-f]{32})?$")
    size: int | None = Field(None, ge=0)


class HttpsSource(Model):
    type: Literal["https"]
    name: str = Field(pattern=_SOURCE_NAME)
    urls: list[Union[str, UrlItem]] = Field(min_length=1)


class CatalogSource(Model):
    """A hub such as UCSC Xena: cohorts x categories expanded through a URL template."""

    type: Literal["catalog"]
    name: str = Field(pattern=_SOURCE_NAME)
    url_template: str = Field(
        pattern=r"^https?://",
        description="URL with {cohort} and {category} (and optionally {file}) placeholders.",
    )
    cohorts: list[str] = Field(min_length=1)
    categories: dict[str, str] = Field(
        min_length=1, description="category -> file name part substituted as {file} (or {category})."
    )
    checksums: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256, when the hub lists them.")


class FileSource(Model):
    type: Literal["file"]
    name: str = Field(pattern=_SOURCE_NAME)
    path: str = Field(min_length=1, description="A local directory (or file:// URI) to copy from.")
    include: list[str] = Field(default_factory=lambda: ["**"])
    exclude: list[str] = Field(default_factory=list)


Source = Annotated[Union[S3Source, HttpsSource, CatalogSource, FileSource], Field(discriminator="type")]


class Retries(Model):
    attempts: int = Field(6, ge=1, le=100, description="Tries per item, the first included.")
    backoff_seconds: float = Field(1.0, gt=0, description="First retry delay; doubles with full jitter.")
    max_backoff_seconds: float = Field(60.0, gt=0)


class DownloadConfig(Model):
    sources: list[Source] = Field(default_factory=list, description="Datasets to fetch; several per run.")
    concurrency: int = Field(8, ge=1, le=256, description="Items (or parts) in flight per pod.")
    part_size_mib: int = Field(64, ge=5, le=5120, description="Size of ranged parts for large objects.")
    multipart_threshold_mib: int = Field(128, ge=5, description="Objects larger than this download in parallel parts.")
    timeout_seconds: float = Field(60.0, gt=0, description="Connect/read timeout per request.")
    retries: Retries = Field(default_factory=Retries)
    gunzip: bool = Field(False, description="Decompress .gz items after verification.")
    push_interval_seconds: float = Field(15.0, gt=0, description="How often progress metrics are pushed.")
