"""Prometheus metrics for every stage, and how they leave the process.

Batch stages (download, preprocess) push to a Pushgateway with grouping key
{run, stage, shard}; training serves `/metrics` on each rank and pushes once at the end.
A missing or dead Pushgateway logs a warning and never fails the work.

Every metric the workloads export is declared in this module's catalogs, so the alert
rules and the dashboard can be checked against the names the code really uses.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

log = logging.getLogger(__name__)

# `_created` series only add noise to pushed groups and dashboards
disable_created_metrics()

PUSH_JOB = "trajflow"
NAMESPACE_ENV = "TRAJFLOW_NAMESPACE"  # set by the chart: the pod's namespace
RELEASE_ENV = "TRAJFLOW_RELEASE"  # set by the chart: the pod's Helm release
# where training's /metrics listens: every interface in a pod (Prometheus scrapes the pod's
# IP); `trajflow run` sets 127.0.0.1, so a local run serves nothing to the network
METRICS_ADDR_ENV = "TRAJFLOW_METRICS_ADDR"
# trajflow_download_items_total{outcome}
DOWNLOAD_OUTCOMES = ("fetched", "skipped", "reused", "adopted", "missing", "failed")


def _common(registry: CollectorRegistry) -> dict[str, Any]:
    return {
        "start_time": Gauge("trajflow_stage_start_time_seconds", "Unix time the stage started.", registry=registry),
        "last_progress": Gauge(
            "trajflow_stage_last_progress_time_seconds", "Unix time of the last completed unit of work.", registry=registry
        ),
        "end_time": Gauge("trajflow_stage_end_time_seconds", "Unix time the stage finished (0 while running).", registry=registry),
        "success": Gauge("trajflow_stage_success", "1 when the stage finished successfully, 0 otherwise.", registry=registry),
        "interrupted": Gauge("trajflow_stage_interrupted",
                             "1 when a signal (SIGTERM: a pod deleted, drained or preempted) stopped it, which a retry "
                             "resumes.", registry=registry),
    }


@dataclass
class StageMetrics:
    """A fresh registry with one stage's metrics; attribute access by short name."""

    stage: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    m: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["m"][name]
        except KeyError:
            raise AttributeError(name) from None

    def names(self) -> set[str]:
        """Every sample name this registry can export (with _total, _bucket... suffixes),
        labelled metrics included before any label value is set."""
        return {n for n in self.registry._names_to_collectors if not n.endswith("_created")}


def download_metrics() -> StageMetrics:
    sm = StageMetrics("download")
    r = sm.registry
    sm.m.update(_common(r))
    sm.m.update(
        bytes=Counter(
            "trajflow_download_bytes", "Bytes received from the sources (retried bytes included).", registry=r
        ),
        bytes_completed=Gauge(
            "trajflow_download_bytes_completed",
            "Planned bytes of this shard's items that are verified in place (fetched, skipped or reused).",
            registry=r,
        ),
        items=Counter(
            "trajflow_download_items",
            "Items finished, by outcome: fetched, skipped, reused, adopted (verified); missing (optional source); failed.",
            ["outcome"],
            registry=r,
        ),
        items_planned=Gauge("trajflow_download_items_planned", "Items assigned to this shard.", registry=r),
        bytes_planned=Gauge("trajflow_download_bytes_planned", "Bytes assigned to this shard.", registry=r),
        failures=Counter("trajflow_download_failures", "Failed attempts by reason.", ["reason"], registry=r),
        retries=Counter("trajflow_download_retries", "Retried attempts.", registry=r),
        inflight=Gauge("trajflow_download_inflight", "Requests in flight.", registry=r),
        duration=Gauge("trajflow_download_duration_seconds", "Wall time of this shard so far.", registry=r),
        throughput=Gauge("trajflow_download_throughput_bytes_per_second", "Mean throughput of this shard.", registry=r),
    )
    # Every label value exported at 0 from the start: rate()/increase() see nothing of a
    # series whose first sample already holds the first failure.
    from trajflow.download.failures import REASONS

    for reason in REASONS:
        sm.failures.labels(reason=reason)
    for outcome in DOWNLOAD_OUTCOMES:
        sm.items.labels(outcome=outcome)
    return sm


def preprocess_metrics() -> StageMetrics:
    sm = StageMetrics("preprocess")
    r = sm.registry
    sm.m.update(_common(r))
    sm.m.update(
        trajectories=Counter("trajflow_preprocess_trajectories", "Trajectories resampled and written.", registry=r),
        quarantined=Counter("trajflow_preprocess_quarantined", "Trajectories quarantined, by reason.", ["reason"], registry=r),
        bytes_in=Counter("trajflow_preprocess_bytes_in", "Raw bytes read.", registry=r),
        bytes_out=Counter("trajflow_preprocess_bytes_out", "Shard bytes written.", registry=r),
        resample_seconds=Histogram(
            "trajflow_preprocess_resample_seconds",
            "Time to resample one batch on the device.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        ),
        bandwidth=Gauge(
            "trajflow_preprocess_bandwidth_bytes_per_second", "Resampling bandwidth (bytes in+out per second).", registry=r
        ),
        throughput=Gauge(
            "trajflow_preprocess_throughput_trajectories_per_second", "Trajectories per second, end to end.", registry=r
        ),
    )
    return sm


def train_metrics() -> StageMetrics:
    sm = StageMetrics("train")
    r = sm.registry
    sm.m.update(_common(r))
    sm.m.update(
        loss=Gauge("trajflow_train_loss", "Mean loss of the last epoch, by split.", ["split"], registry=r),
        best_val_loss=Gauge("trajflow_train_best_val_loss", "Best validation loss so far.", registry=r),
        samples_per_second=Gauge("trajflow_train_samples_per_second", "Training samples per second (all ranks).", registry=r),
        step_seconds=Histogram(
            "trajflow_train_step_seconds",
            "Time of one optimiser step.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        ),
        steps=Counter("trajflow_train_steps", "Optimiser steps taken.", registry=r),
        epoch=Gauge("trajflow_train_epoch", "Current epoch (0-based).", registry=r),
        gpu_memory=Gauge("trajflow_train_gpu_memory_bytes", "Peak GPU memory allocated on this rank.", registry=r),
        checkpoint_time=Gauge(
            "trajflow_train_last_checkpoint_time_seconds", "Unix time of the newest checkpoint written.", registry=r
        ),
        learning_rate=Gauge("trajflow_train_learning_rate", "Learning rate the schedule gives the next optimiser step.", registry=r),
        restarts=Gauge(
            "trajflow_train_restarts", "Times the elastic agent restarted the worker group (TORCHELASTIC_RESTART_COUNT).", registry=r
        ),
    )
    return sm


CATALOGS = {"download": download_metrics, "preprocess": preprocess_metrics, "train": train_metrics}


def exported_names() -> set[str]:
    """Every sample name any stage exports (for checking alert rules and dashboards)."""
    out: set[str] = set()
    for make in CATALOGS.values():
        out |= make().names()
    return out


# how long a final push is tried again: after an ending of the stage's own, after a signal
FINAL_PUSH_RETRY_S = (30.0, 3.0)


class Pusher:
    """Push a stage's registry with grouping key {run, stage, shard}, the pod's namespace
    and release where the chart names them, and any further ``labels`` (training:
    local_rank); never raises.

    The namespace and release keep releases apart on one Pushgateway (in one namespace, or
    outside them, shared), and the namespace (scraped with honor_labels) gives their series
    the namespace the alert rules select, not the Pushgateway's."""

    def __init__(self, url: str, metrics: StageMetrics, run: str, shard: int | str, timeout: float = 5.0,
                 labels: Mapping[str, str] | None = None):
        self.url, self.metrics, self.timeout = url, metrics, timeout
        pod = {"namespace": os.environ.get(NAMESPACE_ENV, ""), "release": os.environ.get(RELEASE_ENV, "")}
        self.grouping = {"run": run, "stage": metrics.stage, "shard": str(shard),
                         **{k: v for k, v in pod.items() if v}, **(labels or {})}
        # the group an earlier version pushed without the release: left, it would keep the
        # shard's last state from before an upgrade (a failure) beside this one's
        self._legacy = {k: v for k, v in self.grouping.items() if k != "release"} if pod["release"] else None
        self._warned = False
        self._pushed = False  # the group holds something of this process's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def push(self) -> bool:
        if not self.url:
            return False
        from prometheus_client import delete_from_gateway, pushadd_to_gateway

        try:
            pushadd_to_gateway(
                self.url, job=PUSH_JOB, registry=self.metrics.registry, grouping_key=self.grouping, timeout=self.timeout
            )
            if self._legacy is not None:
                delete_from_gateway(self.url, job=PUSH_JOB, grouping_key=self._legacy, timeout=self.timeout)
                self._legacy = None
            self._warned = False
            self._pushed = True
            return True
        except Exception as exc:  # a metrics outage must never fail the data work
            if not self._warned:
                log.warning("could not push metrics to %s: %s (the work goes on)", self.url, exc)
                self._warned = True
            return False

    def start(self, interval_s: float) -> "Pusher":
        """Push now and then every `interval_s` seconds in the background until `stop()`.
        The first push exports the counters at 0 before anything can increment them."""
        if not self.url:
            return self

        def loop() -> None:
            self.push()
            while not self._stop.wait(interval_s):
                self.push()

        self._thread = threading.Thread(target=loop, name="metrics-push", daemon=True)
        self._thread.start()
        return self

    def forget(self) -> None:
        """Delete this process's own group: the last values of an earlier attempt, which a
        stage pushing only at its end would leave standing through the rerun (a diverged
        training's infinite loss, alerting). Never raises."""
        if not self.url:
            return
        from prometheus_client import delete_from_gateway

        try:
            delete_from_gateway(self.url, job=PUSH_JOB, grouping_key=self.grouping, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001  metrics never fail the work
            log.warning("could not delete the Pushgateway group %s at %s: %s", self.grouping, self.url, exc)

    def drop_shards_from(self, count: int) -> None:
        """Delete this run's groups of this stage whose shard number is ``count`` or more:
        left by a run with more shards, they would add to the dashboard's totals (shard 0
        does this, as it drops those shards' manifests); and this stage's groups of the
        release's earlier runs (`_drop`). Never raises."""
        self._drop(lambda labels: str(labels.get("shard", "")).isdigit() and int(labels["shard"]) >= count,
                   f"shards >= {count}", "a run with more shards")

    def drop_groups_but(self, keep: list[Mapping[str, str]]) -> None:
        """Delete this run's groups of this stage other than ``keep`` (the grouping keys of
        every process of the run: training's nodes and local ranks), which a run with more
        of them left behind; and this stage's groups of the release's earlier runs (`_drop`).
        Never raises."""
        kept = [dict(k) for k in keep]
        self._drop(lambda labels: labels not in kept, "other processes", "a run with more processes")

    def _groups(self) -> list[Any]:
        """Every group of the Pushgateway, in one answer (far larger than a push)."""
        import json
        import urllib.request

        base = (self.url if "://" in self.url else f"http://{self.url}").rstrip("/")
        with urllib.request.urlopen(f"{base}/api/v1/metrics", timeout=max(self.timeout, 30)) as resp:  # noqa: S310
            groups = json.load(resp)["data"]
        if not isinstance(groups, list):
            raise ValueError(f"not the Pushgateway's group list: {str(groups)[:200]}")
        return groups

    def group_is_mine(self) -> bool:
        """Whether this process is still the one pushing its group: no other process (the pod
        of a newer Job, for the same shard) pushed it since. False when that is unknown."""
        mine = self.metrics.registry.get_sample_value("trajflow_stage_start_time_seconds")
        if not self.url or not mine:
            return False
        try:
            groups = self._groups()
        except Exception as exc:  # noqa: BLE001  metrics never fail the data work
            log.warning("could not list the Pushgateway groups at %s: %s", self.url, exc)
            return False
        key = {"job": PUSH_JOB, **self.grouping}
        for group in groups:
            if isinstance(group, dict) and group.get("labels") == key:
                samples = (group.get("trajflow_stage_start_time_seconds") or {}).get("metrics") or []
                # a start time is this process's alone (another pod's differs by far more)
                return any(abs(float(sample.get("value", "nan")) - mine) < 1e-3 for sample in samples)
        return False

    def _drop(self, stale: Callable[[dict[str, str]], bool], which: str, why: str) -> None:
        """Delete this run's groups of this stage for which ``stale(grouping labels)``, and,
        in a release (the pod names it), this stage's groups of the release's other runs: a
        new run supersedes them (Prometheus keeps their history), and every group left would
        slow each later push (the Pushgateway checks a push against all it holds)."""
        if not self.url:
            return
        import urllib.error

        from prometheus_client import delete_from_gateway

        # this stage's groups; the namespace also when this pusher has none, and this
        # release's or none (an earlier version pushed none; its pods are gone)
        same = {"namespace": None, **{k: self.grouping[k] for k in ("stage", "namespace") if k in self.grouping}}
        run, release = self.grouping["run"], self.grouping.get("release")
        try:
            groups = self._groups()
        except Exception as exc:  # noqa: BLE001  metrics never fail the data work
            log.warning("could not list the Pushgateway groups at %s to remove those of %s and of earlier runs: %s",
                        self.url, which, exc)
            return
        deleted: dict[str, list[dict[str, str]]] = {}  # why -> grouping keys
        failed: list[str] = []
        for group in groups:
            labels = group.get("labels") if isinstance(group, dict) else None
            if not isinstance(labels, dict):
                continue
            if (labels.get("job") != PUSH_JOB or any(labels.get(k) != v for k, v in same.items())
                    or labels.get("release") not in (None, release)):
                continue
            key = {k: str(v) for k, v in labels.items() if k != "job"}
            if labels.get("run") == run:
                if not stale(key):
                    continue
                reason = why
            elif release is not None and labels.get("release") == release:
                reason = f"an earlier run of release {release}"
            else:  # a workstation's runs, or a run pushed without its release: whose is unknown
                continue
            try:
                delete_from_gateway(self.url, job=PUSH_JOB, timeout=self.timeout, grouping_key=key)
            except urllib.error.HTTPError as exc:  # this group refused: the others may still go
                failed.append(f"{key}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001  a gateway that stopped answering: no timeout per group
                failed.append(f"{key}: {exc} (the rest left alone)")
                break
            deleted.setdefault(reason, []).append(key)
        for reason, keys in deleted.items():  # a line per reason: an earlier run may have had 1000s of shards
            log.info("deleted %d Pushgateway group(s) of %s, such as %s", len(keys), reason, keys[0])
        if failed:
            log.warning("could not delete %d Pushgateway group(s) at %s, such as %s", len(failed), self.url, failed[0])

    def stop(self, success: bool, interrupted: bool = False, final: bool = True) -> None:
        """Final push with end time and success flag, and whether a signal stopped the shard
        (a pod deleted, drained or preempted: its retry resumes it, and it failed nothing);
        none without `final` (the group is another process's now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
        if not final:
            return
        self.metrics.end_time.set(time.time())
        self.metrics.success.set(1 if success else 0)
        self.metrics.interrupted.set(1 if interrupted else 0)
        # a lost final push leaves a group this process pushed saying "running" for good (the
        # lost-shard alert): tried again through a Pushgateway restart, briefly after a
        # SIGTERM, whose grace period is short
        deadline = time.monotonic() + (FINAL_PUSH_RETRY_S[1] if interrupted else FINAL_PUSH_RETRY_S[0])
        delay = 1.0
        while not self.push() and self._pushed and time.monotonic() + delay <= deadline:
            time.sleep(delay)
            delay = min(2 * delay, 8.0)
