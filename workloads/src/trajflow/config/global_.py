"""`global:` — settings shared by every stage: run id, storage, metrics, image registry."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from trajflow.config import formats
from trajflow.config.base import Model

# empty or an http(s) URL with a host; in the schema too, so `helm install` refuses what the pods would
_HTTP_URL_OR_EMPTY = {"pattern": formats.HTTP_URL_OR_EMPTY}
_HTTP_URL_WORDS = "an http(s) URL with a host, a port of 1-65535 if any, and no user:password@"


class FilesystemStorage(Model):
    path: str = Field("/data", min_length=1, description="Mount path of the shared volume in pods; any directory for `trajflow run`.")


class PvcStorage(Model):
    create: bool = Field(True, description="Create a PersistentVolumeClaim (ignored when existingClaim is set).")
    existing_claim: str = Field("", pattern=formats.OBJECT_NAME_OR_EMPTY, max_length=253,
                                description="Use this existing PVC instead of creating one.")
    storage_class: str = Field("", description="StorageClass of the created PVC; empty uses the cluster default.")
    size: str = Field("100Gi", pattern=formats.POSITIVE_QUANTITY, description="Requested size of the created PVC.")
    # every stage writes to the claim, several pods at once: ReadWriteOncePod and ReadOnlyMany cannot serve it
    access_modes: list[Literal["ReadWriteMany", "ReadWriteOnce"]] = Field(
        default_factory=lambda: ["ReadWriteMany"], min_length=1, description="Access modes of the created PVC."
    )


class S3Storage(Model):
    endpoint: str = Field("", description="S3-compatible endpoint URL; empty means AWS.",
                          json_schema_extra=_HTTP_URL_OR_EMPTY)
    bucket: str = Field("", pattern=formats.S3_BUCKET_OR_EMPTY, description="Bucket holding the run roots.")
    prefix: str = Field("", pattern=formats.S3_KEY_PREFIX, description="Key prefix under the bucket.")
    region: str = Field("us-east-1", pattern=formats.S3_REGION, description="Region of the bucket.")
    addressing_style: Literal["path", "virtual", "auto"] = Field("path", description="S3 addressing style.")
    existing_secret: str = Field(
        "", pattern=formats.OBJECT_NAME_OR_EMPTY, max_length=253,
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; empty uses workload identity or the default chain.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str) -> str:
        if value and not formats.go_regex(formats.HTTP_URL).match(value):
            raise ValueError(f"endpoint must be {_HTTP_URL_WORDS}, got {formats.without_secrets(value)!r}")
        return value


class Storage(Model):
    type: Literal["filesystem", "s3"] = Field("filesystem", description="Where the run root lives.")
    filesystem: FilesystemStorage = Field(default_factory=FilesystemStorage)
    pvc: PvcStorage = Field(default_factory=PvcStorage)
    s3: S3Storage = Field(default_factory=S3Storage)
    take_over_from: str = Field("", pattern=formats.RELEASE_REF_OR_EMPTY, description="`<namespace>/<release>` "
                                "whose run root this release takes over (an install under another name, once that "
                                "release is gone); empty: none.")

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> "Storage":
        if self.type == "s3" and not self.s3.bucket:
            raise ValueError("storage.s3.bucket is required when storage.type is s3")
        return self


class Metrics(Model):
    # the chart renders it with `tpl`, so the schema also lets a template through
    pushgateway_url: str = Field("", description="Pushgateway for batch stages; empty disables pushing.",
                                 json_schema_extra={"pattern": formats.PUSHGATEWAY_URL})

    @field_validator("pushgateway_url")
    @classmethod
    def _is_url(cls, value: str) -> str:
        if value and not formats.go_regex(formats.HTTP_URL).match(value):
            raise ValueError(f"pushgatewayUrl must be {_HTTP_URL_WORDS}, got {formats.without_secrets(value)!r}")
        return value


class ImagePullSecret(Model):
    name: str = Field(pattern=formats.DNS_SUBDOMAIN, max_length=253)


class ArgoCD(Model):
    enabled: bool = Field(False, description="Rendered by ArgoCD: no ttlSecondsAfterFinished (it would fight sync).")


class GlobalConfig(Model):
    run_id: str = Field("default", pattern=formats.DNS_LABEL, max_length=40, description="Run directory under the storage root.")
    image_registry: str = Field("", pattern=formats.IMAGE_REGISTRY_OR_EMPTY, description="Registry prefixed to every image.")
    image_pull_secrets: list[ImagePullSecret] = Field(default_factory=list)
    argocd: ArgoCD = Field(default_factory=ArgoCD)
    storage: Storage = Field(default_factory=Storage)
    metrics: Metrics = Field(default_factory=Metrics)

    def run_root(self) -> str:
        """The URI every stage reads and writes: `file:///data/<run>` or `s3://bucket/prefix/<run>`."""
        if self.storage.type == "s3":
            prefix = self.storage.s3.prefix.strip("/")
            key = f"{prefix}/{self.run_id}" if prefix else self.run_id
            return f"s3://{self.storage.s3.bucket}/{key}"
        from pathlib import Path

        return Path(self.storage.filesystem.path).expanduser().resolve().joinpath(self.run_id).as_uri()
