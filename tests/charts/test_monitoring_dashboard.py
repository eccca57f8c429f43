"""The dashboard's shard-state queries evaluated by `promtool test rules` on a crafted set of
series (every variable at its default, All): a shard is one (run, stage, shard), so a finished
earlier run does not hide the current run's shard, a retried training pod (the failed pod's
pushed final values next to the new pod's scraped ranks) is running, not failed, a shard
stopped by a signal has not failed, its live figures are shown rather than the failed pod's, and panels about running shards leave
finished ones out, and killed ones too: a pushed shard whose pushes stopped without an end time
(OOM, SIGKILL) is not running."""
from __future__ import annotations

from typing import Any

import yaml
from monitoring_helpers import dashboard_of, dashboard_queries, promtool, render_monitoring

from trajflow.testing import requires_tool

needs_promtool = requires_tool("promtool", why="it comes with the Debian package `prometheus` (ci/scripts/install-test-tools.sh)")

PUSHED = 'namespace="trajflow", release="trajflow", job="trajflow"'
SCRAPED = ('namespace="trajflow", release="trajflow", job="trajflow/trajflow-monitoring-training", '
           'pod="trajflow-training-0a1b2c3d-0-x2"')
# another release in the namespace, pushing to the same Pushgateway under the same runId
OTHER_RELEASE = 'namespace="trajflow", release="other", job="trajflow"'


def _shard(labels: str, run: str, stage: str, shard: str, *, end: float, success: float, start: float,
           progress: float, extra: str = "", killed: bool = False, **gauges: float) -> list[dict[str, str]]:
    """The shard's series; a pushed one's group also has the Pushgateway's push time: pushed
    every minute while it runs, frozen at its end (or, killed, at its last push)."""
    sel = f'{labels}, run="{run}", stage="{stage}", shard="{shard}"{extra}'
    values = {"trajflow_stage_end_time_seconds": end, "trajflow_stage_success": success,
              "trajflow_stage_start_time_seconds": start, "trajflow_stage_last_progress_time_seconds": progress, **gauges}
    out = [{"series": f"{name}{{{sel}}}", "values": f"{value:g}x10"} for name, value in values.items()]
    if labels == PUSHED:
        pushes = "0+60x10" if end == 0 and not killed else f"{end or progress:g}x10"
        out.append({"series": f"push_time_seconds{{{sel}}}", "values": pushes})
    return out


TRAIN_FIGURES = {
    when: [("trajflow_train_loss", ', split="train"', loss), ("trajflow_train_best_val_loss", "", best),
           ("trajflow_train_samples_per_second", "", rate), ("trajflow_train_learning_rate", "", lr)]
    for when, loss, best, rate, lr in [("pushed", 0.5, 0.13, 100, 0.002), ("live", 0.3, 0.1, 200, 0.001)]
}

# evaluated at 5m: time() is 300
SERIES: list[dict[str, str]] = [
    # download: an earlier run's shard 0 finished well (still in the Pushgateway); the current
    # run's shard 0 is running and its shard 1 failed
    *_shard(PUSHED, "old", "download", "0", end=1000, success=1, start=5, progress=990),
    *_shard(PUSHED, "new", "download", "0", end=0, success=0, start=100, progress=270,
            trajflow_download_inflight=3, trajflow_download_bytes_completed=50, trajflow_download_bytes_planned=100),
    *_shard(PUSHED, "new", "download", "1", end=200, success=0, start=100, progress=150),
    # shard 2 was SIGKILLed while planning (nothing planned yet): end time 0 and its last values
    # stay in the Pushgateway, but its pushes stopped
    *_shard(PUSHED, "new", "download", "2", end=0, success=0, start=100, progress=120, killed=True,
            trajflow_download_inflight=4, trajflow_download_bytes_completed=0, trajflow_download_bytes_planned=0),
    # the other release's download shard 1 of run "new" succeeded: it must not hide this one's failure
    *_shard(OTHER_RELEASE, "new", "download", "1", end=200, success=1, start=100, progress=190),
    # shard 3 was stopped by a signal (a drained node): it did not fail
    *_shard(PUSHED, "new", "download", "3", end=180, success=0, start=100, progress=170, trajflow_stage_interrupted=1),
    # training: the first pod failed and pushed its final values; the retried pod is scraped
    *_shard(PUSHED, "r1", "train", "0", end=100, success=0, start=10, progress=90, extra=', local_rank="0"'),
    *_shard(SCRAPED, "r1", "train", "0", end=0, success=0, start=200, progress=280, extra=', local_rank="0"'),
    # another run's training pod: rank 0 failed, and its SIGTERM stopped rank 1, which must not hide it
    *_shard(PUSHED, "r2", "train", "0", end=150, success=0, start=10, progress=140, extra=', local_rank="0"',
            trajflow_stage_interrupted=0),
    *_shard(PUSHED, "r2", "train", "0", end=150, success=0, start=10, progress=140, extra=', local_rank="1"',
            trajflow_stage_interrupted=1),
    # the failed training pod's pushed final figures stay in the Pushgateway while the retried
    # pod's two ranks are scraped live, each counting every optimiser step
    *[{"series": f'{name}{{{PUSHED}, run="r1", shard="0", local_rank="0"{extra}}}', "values": f"{value:g}x10"}
      for name, extra, value in TRAIN_FIGURES["pushed"]],
    *[{"series": f'{name}{{{SCRAPED}, run="r1", shard="0", local_rank="{rank}"{extra}}}', "values": f"{value:g}x10"}
      for rank in "01" for name, extra, value in TRAIN_FIGURES["live"]],
    *[{"series": f'trajflow_train_steps_total{{{SCRAPED}, run="r1", shard="0", local_rank="{rank}"}}',
       "values": "0+600x10"} for rank in "01"],
    # preprocessing: shards 0 and 1 finished (their last bandwidth stays pushed), shard 2 runs
    *_shard(PUSHED, "r1", "preprocess", "0", end=250, success=1, start=20, progress=250,
            trajflow_preprocess_bandwidth_bytes_per_second=1e9),
    *_shard(PUSHED, "r1", "preprocess", "1", end=250, success=1, start=20, progress=250,
            trajflow_preprocess_bandwidth_bytes_per_second=1e9),
    *_shard(PUSHED, "r1", "preprocess", "2", end=0, success=0, start=60, progress=290,
            trajflow_preprocess_bandwidth_bytes_per_second=1e9),
    # shard 3 was OOM-killed: its last values stay, its pushes stopped
    *_shard(PUSHED, "r1", "preprocess", "3", end=0, success=0, start=20, progress=40, killed=True,
            trajflow_preprocess_bandwidth_bytes_per_second=1e9),
]

# the panels keep releases (and namespaces) apart: the samples expected are this release's,
# unless they name another or none (a total)
OTHER_RELEASES = '{namespace="trajflow", release="other", '


def _ours(labels: str) -> str:
    if labels == "{}" or labels.startswith(OTHER_RELEASES):
        return labels
    return '{namespace="trajflow", release="trajflow", ' + labels[1:]


EXPECTED: dict[str, list[tuple[str, float]]] = {
    "panel 'Shards running' A": [('{stage="download"}', 1), ('{stage="train"}', 1), ('{stage="preprocess"}', 1)],
    "panel 'Shards succeeded' A": [('{stage="download"}', 1), ('{stage="preprocess"}', 2),
                                   (OTHER_RELEASES + 'stage="download"}', 1)],
    "panel 'Shards failed' A": [('{stage="download"}', 1), ('{stage="train"}', 1)],
    # by name, with the time since the last push: the failed ones, and the killed ones (lost)
    "panel 'Shards needing attention' A": [
        ('{run="new", stage="download", shard="1", state="failed"}', 100),
        ('{run="r2", stage="train", shard="0", state="failed"}', 150),
        ('{run="new", stage="download", shard="2", state="lost"}', 180),
        ('{run="r1", stage="preprocess", shard="3", state="lost"}', 260)],
    "panel 'Time since last progress' A": [
        ('{stage="download", shard="0"}', 30), ('{stage="train", shard="0"}', 20), ('{stage="preprocess", shard="2"}', 10)],
    "panel 'Shard wall time' B": [
        ('{stage="download", shard="0"}', 200), ('{stage="train", shard="0"}', 100), ('{stage="preprocess", shard="2"}', 240)],
    "panel 'Preprocessing I/O' C": [("{}", 1e9)],
    "panel 'Downloads in flight' A": [('{shard="0"}', 3)],
    # by run (and release), and nothing for a shard with nothing planned
    "panel 'Download progress by shard' A": [('{run="new", shard="0"}', 0.5)],
    # the old run's success does not hide the new run's running and failed download shard 0 and 1
    "panel 'Stage outcome' A": [
        ('{run="old", stage="download", shard="0"}', 1), ('{run="new", stage="download", shard="0"}', 0),
        ('{run="new", stage="download", shard="1"}', 0), ('{run="new", stage="download", shard="2"}', 0),
        ('{run="new", stage="download", shard="3"}', 0),
        (OTHER_RELEASES + 'run="new", stage="download", shard="1"}', 1),
        ('{run="r1", stage="train", shard="0"}', 0), ('{run="r2", stage="train", shard="0"}', 0),
        ('{run="r1", stage="preprocess", shard="0"}', 1), ('{run="r1", stage="preprocess", shard="1"}', 1),
        ('{run="r1", stage="preprocess", shard="2"}', 0), ('{run="r1", stage="preprocess", shard="3"}', 0)],
    # the live figures, not the failed attempt's; steps/s of the run, not summed over its ranks
    "panel 'Training loss' A": [('{run="r1", split="train"}', 0.3)],
    "panel 'Training loss' B": [('{run="r1"}', 0.1)],
    "panel 'Training samples/s' A": [('{run="r1"}', 200)],
    "panel 'Training samples/s' B": [('{run="r1"}', 10)],
    "panel 'Learning rate' A": [('{run="r1"}', 0.001)],
}


@needs_promtool
def test_overview_and_running_shard_panels_count_each_run_stage_shard_once(tmp_path: Any) -> None:
    queries = dict(dashboard_queries(dashboard_of(render_monitoring({}))))
    assert set(EXPECTED) <= set(queries), set(EXPECTED) - set(queries)
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "name": "dashboard shard states",
            "interval": "1m",
            "input_series": SERIES,
            "promql_expr_test": [
                {"expr": queries[where], "eval_time": "5m",
                 "exp_samples": [{"labels": _ours(labels), "value": value} for labels, value in samples]}
                for where, samples in EXPECTED.items()
            ],
        }],
    }
    (tmp_path / "dashboard_test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    result = promtool("test", "rules", "dashboard_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "SUCCESS" in result.stdout
