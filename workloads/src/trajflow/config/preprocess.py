"""`preprocessing.config` — how raw trajectories become fixed-rate training shards."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from trajflow.config.base import Model


class PreprocessConfig(Model):
    format: Literal["auto", "lerobot", "robomimic", "npz"] = Field("auto", description="Raw file format; auto detects by extension.")
    streams: list[str] = Field(
        default_factory=lambda: ["observation.state", "action"], min_length=1, description="Vector streams to resample."
    )
    renames: dict[str, str] = Field(default_factory=dict, description="Raw stream name -> name in the output shards.")
    target_rate_hz: float = Field(50.0, gt=0, le=10000, description="The uniform output rate.")
    min_length: int = Field(2, ge=2, description="Trajectories with fewer valid samples are quarantined.")
    batch_size: int = Field(256, ge=1, description="Trajectories per resampling batch.")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    backend: Literal["auto", "triton", "torch"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the written shards.")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Fail the shard when more trajectories than this are quarantined.")
    prefetch: int = Field(2, ge=0, description="Batches read ahead of the GPU.")
