"""`preprocessing.config` — how raw trajectories become fixed-rate training shards."""
from __future__ import annotations

from typing import Any, Iterable, Literal, Optional

from pydantic import Field, field_validator, model_validator

from trajflow.config.base import Model

Format = Literal["auto", "lerobot", "robomimic", "npz"]
TimeUnit = Literal["s", "ms", "us", "ns"]
# safetensors keeps this name for the file's metadata (the shard's index lives there)
RESERVED_STREAM_NAME = "__metadata__"
# what `_outputs_are_one_set` checks of a streams list alone, for the charts' schema
_STREAMS_SCHEMA = {"uniqueItems": True,
                   "items": {"type": "string", "minLength": 1, "not": {"const": RESERVED_STREAM_NAME}}}
# the settings a shard's contents depend on (the others only change how fast it is made or
# when it fails); a shard's manifest records them
OUTPUT_SETTINGS = ("format", "streams", "renames", "time_key", "time_unit", "filter_key", "rate_hz", "robot",
                   "target_rate_hz", "min_length", "max_gap_seconds", "dtype", "time_dtype")
# output settings added after manifests began to record them, with the value that makes what
# older versions made: what a manifest lacks, its shard was made with
SETTINGS_ADDED_LATER = {"maxGapSeconds": None, "timeUnit": "s", "filterKey": ""}


def _without_nulls(renames: Optional[dict[str, Optional[str]]]) -> Optional[dict[str, Optional[str]]]:
    """A null entry is one a later values file dropped (Helm merges maps; null is its delete)."""
    return None if renames is None else {k: v for k, v in renames.items() if v is not None}


class SourceOverrides(Model):
    """Settings for the items of one downloader source (``raw/<shard>/<source>/...``);
    anything left unset falls back to the top-level value."""

    format: Optional[Format] = Field(None, description="Raw file format of this source.")
    streams: Optional[list[str]] = Field(None, min_length=1, description="Raw stream names to read from this source.",
                                         json_schema_extra=_STREAMS_SCHEMA)
    renames: Optional[dict[str, Optional[str]]] = Field(
        None, description="Raw stream name -> output stream name, for this source, in place of the top level's "
        "(null drops an entry another values file set)."
    )
    time_key: Optional[str] = Field(None, description="Timestamp column/dataset of this source.")
    time_unit: Optional[TimeUnit] = Field(None, description="Unit of this source's timestamps.")
    filter_key: Optional[str] = Field(None, description="robomimic mask of this source to read (\"\": every demo).")
    rate_hz: Optional[float] = Field(None, gt=0, description="Recorded rate when files carry no timestamps.")
    robot: Optional[str] = Field(None, description="Robot label for this source's episodes.")

    _renames = field_validator("renames")(_without_nulls)


class PreprocessConfig(Model):
    format: Format = Field(
        "auto",
        description="Raw file format: lerobot (.parquet), robomimic (.hdf5/.h5), npz; auto picks by extension. "
        "Other files (metadata, videos, LeRobot v3 meta/ tables) are ignored.",
    )
    streams: list[str] = Field(
        default_factory=lambda: ["observation.state", "action"],
        min_length=1,
        description="Raw streams to resample: parquet columns, HDF5 datasets under each demo or npz keys. Episodes "
        "lacking one, or unlike most first good ones in widths, are quarantined.",
        json_schema_extra=_STREAMS_SCHEMA,
    )
    renames: dict[str, Optional[str]] = Field(
        default_factory=dict, description="Raw stream name -> name in the output shards (null drops an entry another "
        "values file set)."
    )
    time_key: str = Field(
        "",
        description="Timestamp column/dataset (in timeUnit); when set, an episode without it is quarantined. Empty: "
        "timestamp, timestamps, time or t (also under obs/ in HDF5 and npz), else a rate.",
    )
    time_unit: TimeUnit = Field(
        "s", description="Unit of the timestamps. s: float seconds (integers or values beyond 1e11 quarantine an "
        "episode as ms, us or ns counts); ms, us, ns: integers or floats, converted to seconds."
    )
    filter_key: str = Field(
        "", description="robomimic only (other formats ignore it): read just the demos in each file's "
        "mask/<filterKey> (train, valid...); a file without that mask is quarantined. Empty: every demo."
    )
    rate_hz: Optional[float] = Field(
        None, gt=0, description="Recorded rate for files with neither timestamps nor a rate attribute."
    )
    robot: str = Field("", description="Robot label when the data names none.")
    sources: dict[str, SourceOverrides] = Field(
        default_factory=dict, description="Per-source overrides, keyed by the downloader source name."
    )
    target_rate_hz: float = Field(50.0, gt=0, le=10000, description="The uniform output rate.")
    min_length: int = Field(2, ge=2, description="Trajectories with fewer raw samples are quarantined.")
    max_gap_seconds: Optional[float] = Field(
        None, gt=0, description="Trajectories with two consecutive samples further apart are quarantined (time_gap): "
                                "interpolation invents the motion between. Null: no limit (long pauses warned).",
    )
    batch_size: int = Field(256, ge=1, description="Trajectories per resampling batch (at most).")
    max_padding_fraction: float = Field(
        0.25, ge=0, le=10, description="A batch is cut when padding would exceed this fraction of its real samples."
    )
    sort_window_batches: int = Field(
        4, ge=1, description="Trajectories are grouped by length within windows of at most this many batches..."
    )
    sort_window_mib: int = Field(
        16, ge=1, description="...and at most this much decoded raw data, so the device starts before the reading ends."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when a GPU is visible.")
    backend: Literal["auto", "triton", "torch"] = Field("auto", description="Resampling kernel; auto: triton on cuda.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the written shards; bf16/fp16 halve host-device traffic (a GPU rounds the raw "
        "values to it before interpolating too). Values beyond its range are quarantined."
    )
    time_dtype: Literal["float64", "float32"] = Field(
        "float64", description="Precision of the timestamps handed to the kernel (relative to each episode's start); "
        "float32 resolves 0.25 ms an hour in (episodes too long for it get float64)."
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the shard when more than this fraction of trajectories is quarantined, "
        "or of its raw bytes is in files lost whole (unreadable, missing, cut)."
    )
    prefetch: int = Field(2, ge=0, description="Batches read ahead of the device and waiting for the writer.")
    read_workers: int = Field(
        0, ge=0, le=64, description="Threads reading raw files; 0: one per CPU for parquet (decoded without the GIL), none "
        "for local npz and HDF5 (the page cache reads ahead), half the CPUs over the network."
    )
    read_ahead_mib: int = Field(
        1024, ge=1, description="MiB the files read ahead of the batching may hold, one at least: one read whole (npz, "
        "parquet to 64 MiB) its bytes, one read in part (HDF5, large parquet) its episodes."
    )
    cpu_threads: int = Field(
        1, ge=0, le=256, description="Torch threads resampling on the CPU or packing batches for the GPU (0: one per "
        "CPU the pod may use). More mostly contend with reading and writing for the cores."
    )
    pin_memory: bool = Field(True, description="Stage batches in pinned host memory (cuda only).")
    spool_memory_mib: int = Field(
        256, ge=1, description="Output held in memory before spilling to $TMPDIR while a shard is assembled."
    )
    push_interval_seconds: float = Field(15.0, ge=1, description="How often progress metrics are pushed.")

    def output_settings(self, sources: Iterable[str]) -> dict[str, Any]:
        """The settings the contents of a shard holding items of ``sources`` depend on, as the
        values file spells them, with the overrides of those sources ({} for none)."""
        settings = self.model_dump(mode="json", include=set(OUTPUT_SETTINGS), by_alias=True)
        settings["sources"] = {
            name: self.sources[name].model_dump(mode="json", by_alias=True, exclude_none=True) if name in self.sources
            else {} for name in sorted(sources)
        }
        return settings

    _renames = field_validator("renames")(_without_nulls)

    @model_validator(mode="after")
    def _outputs_are_one_set(self) -> "PreprocessConfig":
        """Every source yields the same, distinct output streams: a shard (and training)
        holds one set of streams, which the first good episode would otherwise pick."""
        # a renames key no stream it applies to has is a typo: the raw name would reach the
        # shards, and training would refuse them only after every shard is done
        read_with_top = [*self.streams, *(n for src in self.sources.values() if src.renames is None
                                          for n in (src.streams or self.streams))]
        for where, renames, streams in [("", self.renames, read_with_top)] + [
            (f"sources.{name}.", src.renames, src.streams or self.streams)
            for name, src in self.sources.items() if src.renames is not None
        ]:
            unread = sorted(set(renames) - set(streams))
            if unread:
                raise ValueError(f"{where}renames: {unread[0]!r} is not one of the streams read "
                                 f"({', '.join(sorted(set(streams)))}): rename a stream listed in streams (or set it "
                                 "to null to drop a rename another values file made)")
        top: list[str] = []
        for where, streams, renames in [("", self.streams, self.renames)] + [
            (f"sources.{name}.", src.streams or self.streams, src.renames if src.renames is not None else self.renames)
            for name, src in self.sources.items()
        ]:
            outputs = [renames.get(s, s) for s in streams]
            dup = sorted({o for o in outputs if outputs.count(o) > 1})
            if dup:
                raise ValueError(f"{where}streams/renames map several raw streams onto {dup[0]!r}")
            reserved = next((n for n in [*streams, *outputs] if n in ("", RESERVED_STREAM_NAME)), None)
            if reserved is not None:
                raise ValueError(f"{where}streams/renames: {reserved!r} cannot name a stream"
                                 + (" (the shard format keeps it for its index)" if reserved else ""))
            if not where:
                top = outputs
            elif sorted(outputs) != sorted(top):
                raise ValueError(f"{where}streams/renames give the output streams ({', '.join(sorted(outputs))}), "
                                 f"the top level gives ({', '.join(sorted(top))}): every source must give the same "
                                 "ones (rename its raw streams onto them)")
        return self
