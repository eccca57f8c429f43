"""`downloader.config` — what to fetch and how hard to try.

Every source names a directory: its items land under `raw/<shard>/<name>/...`, so two
sources (or two cohorts of one catalog) can never overwrite each other. Secrets never sit
in these values: S3 sources read keys from environment variables with a prefix
(`credentialsEnvPrefix`, filled by an `envFrom` Secret with that prefix), HTTP sources read a
bearer token from a named environment variable (`authTokenEnv`).
"""
from __future__ import annotations

import hashlib
import json
import string
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from trajflow.config import formats
from trajflow.config.base import Model
from trajflow.errors import ConfigError

_PATH_PART = formats.go_regex(formats.SOURCE_NAME)
_HEX_DIGEST = formats.go_regex(formats.CHECKSUM_HEX)


def _check_relative_path(value: str, what: str) -> str:
    """A destination path below the source directory: relative, '/'-separated, no '..'."""
    if value.startswith("/") or "\\" in value or "\0" in value:
        raise ValueError(f"{what} {value!r} must be a relative path using '/'")
    if any(part in ("", ".", "..") or part.startswith(".trajflow-") for part in value.split("/")):
        raise ValueError(f"{what} {value!r} has an empty, '.', '..' or reserved segment")
    return value


class _Source(Model):
    name: str = Field(pattern=formats.SOURCE_NAME, description="Items land under raw/<shard>/<name>/; unique per run.")
    required: bool = Field(
        True,
        description="When false, items the source says do not exist (HTTP 403/404/410) are reported as missing "
        "instead of failing the shard (hubs where not every cohort has every category).",
    )


class S3Source(_Source):
    type: Literal["s3"]
    url: str = Field(
        pattern=formats.S3_URI,
        description="s3://bucket/prefix to list (a prefix naming one object fetches that object).",
    )
    endpoint: str = Field("", pattern=formats.HTTP_URL_OR_EMPTY, description="S3-compatible endpoint URL; empty means AWS.")
    region: str = Field("us-east-1", pattern=formats.S3_REGION, description="Region of the bucket.")
    addressing_style: Literal["path", "virtual", "auto"] = Field("path", description="S3 addressing style.")
    anonymous: bool = Field(False, description="Unsigned requests (public buckets).")
    credentials_env_prefix: str = Field(
        "",
        pattern=formats.ENV_NAME_OR_EMPTY,
        description="Read <prefix>AWS_ACCESS_KEY_ID, <prefix>AWS_SECRET_ACCESS_KEY and optionally "
        "<prefix>AWS_SESSION_TOKEN (e.g. from an envFrom Secret with this prefix); empty: the default AWS chain.",
    )
    verify_etag: bool = Field(
        True,
        description="Check single-part ETags as the MD5 of the content; turn off for stores whose ETags are not "
        "MD5s (SSE-KMS and SSE-C objects are recognised and skipped automatically).",
    )
    ca_bundle: str = Field("", description="PEM file of CAs to trust for the endpoint (mounted into the pod).")
    include: list[str] = Field(
        default_factory=lambda: ["**"], description="Glob patterns of keys (relative to the prefix) to fetch."
    )
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of keys (relative to the prefix) to skip.")


class UrlItem(Model):
    url: str = Field(pattern=formats.HTTP_URL, description="URL to fetch.")
    # json_schema_extra: the rules the validators below apply, as far as the charts' schema (and
    # so `helm install`) can check them; the validators keep their own, clearer messages
    path: str = Field("", description="Destination path under the source; default: the URL's file name.",
                      json_schema_extra={"pattern": formats.RELATIVE_PATH_OR_EMPTY})
    sha256: str = Field("", pattern=formats.SHA256_HEX_OR_EMPTY, description="Expected SHA-256 (lowercase hex).")
    md5: str = Field("", pattern=formats.MD5_HEX_OR_EMPTY, description="Expected MD5 (lowercase hex).")
    size: int | None = Field(None, ge=0, description="Expected size in bytes; saves a HEAD request when planning.")

    @field_validator("path")
    @classmethod
    def _path_is_relative(cls, value: str) -> str:
        return _check_relative_path(value, "path") if value else value


# a URL or a mapping, told apart by type, so that a bad entry gets one error: a mapping's,
# else a URL string's
_UrlEntry = Annotated[
    Union[Annotated[str, Field(pattern=formats.HTTP_URL), Tag("url")], Annotated[UrlItem, Tag("item")]],
    Discriminator(lambda v: "item" if isinstance(v, (dict, UrlItem)) else "url"),
]


class HttpsSource(_Source):
    type: Literal["https"]
    urls: list[_UrlEntry] = Field(min_length=1, description="URLs (or {url, path, sha256, md5, size}) to fetch.")
    ca_bundle: str = Field("", description="PEM file of CAs to trust (mounted into the pod); empty: the system CAs.")
    auth_token_env: str = Field(
        "", pattern=formats.ENV_NAME_OR_EMPTY, description="Environment variable holding a bearer token sent to the URLs' host."
    )


class CatalogSource(_Source):
    """A hub such as UCSC Xena: cohorts x categories expanded through a URL template.

    `urlTemplate: https://hub.example/download/TCGA.{cohort}.sampleMap/{file}.gz` with
    `categories: {mrna_seq: HiSeqV2, clinical: "{cohort}_clinicalMatrix"}` gives one item per
    cohort and category, stored as `<name>/<cohort>/<file name of the URL>`.
    """

    type: Literal["catalog"]
    url_template: str = Field(
        pattern=formats.HTTP_URL,
        description="URL with {cohort} and {file} (or {category}) placeholders.",
        json_schema_extra={"allOf": [{"pattern": formats.URL_TEMPLATE_FIELDS}, {"pattern": formats.HAS_COHORT_FIELD},
                                     {"pattern": formats.HAS_FILE_FIELD}]},
    )
    cohorts: list[str] = Field(min_length=1, description="Cohorts (e.g. BRCA, LUAD); each gets its own directory.",
                               json_schema_extra={"uniqueItems": True,
                                                  "items": {"type": "string", "pattern": formats.SOURCE_NAME}})
    categories: dict[str, str] = Field(
        min_length=1,
        description="category -> file name part substituted as {file}; it may itself use {cohort} and {category}.",
        json_schema_extra={"additionalProperties": {"type": "string", "pattern": formats.FILE_PART}},
    )
    checksums: dict[str, str] = Field(
        default_factory=dict,
        description="<cohort>/<file name> -> expected checksum (64 hex: SHA-256, 32 hex: MD5), when the hub lists them.",
        json_schema_extra={"additionalProperties": {"type": "string", "pattern": formats.CHECKSUM_HEX},
                           "propertyNames": {"pattern": formats.RELATIVE_PATH_OR_EMPTY, "minLength": 1}},
    )
    ca_bundle: str = Field("", description="PEM file of CAs to trust (mounted into the pod); empty: the system CAs.")
    auth_token_env: str = Field("", pattern=formats.ENV_NAME_OR_EMPTY, description="Environment variable holding a bearer token sent to the hub.")

    @field_validator("url_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        shown = formats.without_secrets(value)  # a hub's token may sit in the query
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"malformed template {shown!r}: {exc}") from None
        unknown = fields - {"cohort", "category", "file"}
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)} in {shown!r}: use {{cohort}}, {{category}}, {{file}}")
        if "cohort" not in fields or not fields & {"category", "file"}:
            raise ValueError(f"template {shown!r} needs {{cohort}} and {{file}} or {{category}}")
        return value

    @field_validator("cohorts")
    @classmethod
    def _cohorts_are_names(cls, value: list[str]) -> list[str]:
        for cohort in value:
            if not _PATH_PART.match(cohort):
                raise ValueError(f"cohort {cohort!r} must be a plain name (letters, digits, '.', '_', '-')")
        if len(set(value)) != len(value):
            raise ValueError("cohorts must be unique")
        return value

    @field_validator("categories")
    @classmethod
    def _categories_format(cls, value: dict[str, str]) -> dict[str, str]:
        for category, part in value.items():
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(part) if f is not None}
            except ValueError as exc:
                raise ValueError(f"category {category!r}: malformed file part {part!r}: {exc}") from None
            if fields - {"cohort", "category"}:
                raise ValueError(f"category {category!r}: file part {part!r} may only use {{cohort}} and {{category}}")
            if not part:
                raise ValueError(f"category {category!r}: empty file part")
        return value

    @field_validator("checksums")
    @classmethod
    def _checksums_are_hex(cls, value: dict[str, str]) -> dict[str, str]:
        for path, digest in value.items():
            _check_relative_path(path, "checksum path")
            if not _HEX_DIGEST.match(digest):
                raise ValueError(f"checksum of {path!r} must be 64 (SHA-256) or 32 (MD5) lowercase hex digits")
        return value


class FileSource(_Source):
    type: Literal["file"]
    path: str = Field(min_length=1, description=(
        "A local directory or file (or file:// URI, with '#' and '?' percent-encoded) to copy from; symbolic links "
        "to directories are followed."))
    include: list[str] = Field(default_factory=lambda: ["**"], description="Glob patterns of relative paths to copy.")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of relative paths to skip.")


Source = Annotated[Union[S3Source, HttpsSource, CatalogSource, FileSource], Field(discriminator="type")]


class Retries(Model):
    attempts: int = Field(
        6, ge=1, le=100,
        description="Tries per request without progress (the first included); also tries per item when its "
        "checksum does not match.",
    )
    backoff_seconds: float = Field(1.0, gt=0, description="First retry delay; doubles each retry, with full jitter.")
    max_backoff_seconds: float = Field(60.0, gt=0, description="Cap of one retry delay (Retry-After is honoured up to this).")


class DownloadConfig(Model):
    sources: list[Source] = Field(
        default_factory=list, description="Datasets to fetch: at least one (install refuses none), several per run."
    )
    concurrency: int = Field(8, ge=1, le=256, description="Requests (whole items or ranged parts) in flight per pod.")
    part_size_mib: int = Field(
        16, ge=5, le=5120,
        description="Size of the ranged parts of large objects. With an S3 run root, early parts wait in memory: "
                    "up to about 2 x concurrency x partSizeMib, plus 80 MiB per item in flight.",
    )
    multipart_threshold_mib: int = Field(64, ge=5, description="Objects larger than this download in parallel parts.")
    timeout_seconds: float = Field(60.0, gt=0, description="Connect/read timeout per request; a body slower than 1 KiB in max(2 x this, 60 s) is dropped and resumed, and response headers must be complete within this plus that.")
    retries: Retries = Field(default_factory=Retries)
    gunzip: bool = Field(
        False,
        description="Decompress .gz items after verification; they are stored without the .gz suffix.",
    )
    push_interval_seconds: float = Field(15.0, ge=1, description="How often progress metrics are pushed.")
    progress_interval_seconds: float = Field(10.0, ge=0.1, description="How often a progress line is logged (pods).")
    plan_generation: str = Field(
        "",
        pattern=formats.PLAN_GENERATION,
        max_length=64,
        description="Change to list the sources again and make a new plan (when the sources gained or changed files); "
        "verified items are reused, never fetched again.",
    )

    def generation_id(self) -> str:
        """The download's generation, which its plan and manifests record: changes with any
        setting of a source (also how it is reached: endpoint, credentials variables), with
        gunzip (where items land) and `planGeneration`, not with the tuning knobs here. A new
        setting must leave it unchanged at its default, as gunzip does: runs in progress
        would plan again on new images (tests/workloads/test_config.py pins it)."""
        doc: dict[str, Any] = {"sources": [s.model_dump(mode="json", by_alias=True) for s in self.sources],
                               "generation": self.plan_generation}
        if self.gunzip:  # only when set, so that the plans of runs without it keep their generation
            doc["gunzip"] = True
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    def require_sources(self) -> None:
        """A download stage with nothing to fetch is a mistake in the values, not an empty run.
        (Not a validation rule: the chart's defaults, and the other stages' view of the
        download, carry an empty list.)"""
        if not self.sources:
            raise ConfigError("downloader.config.sources is empty: name at least one source to download "
                              "(or set downloader.enabled=false)")

    @model_validator(mode="after")
    def _unique_source_names(self) -> "DownloadConfig":
        seen: set[str] = set()
        for source in self.sources:
            if source.name in seen:
                raise ValueError(f"two sources are named {source.name!r}: each source needs its own directory")
            seen.add(source.name)
        return self
