"""The end of `trajflow run`: a summary on the terminal, `summary.json`, and a report
(`report.png` with the loss curve and the stage timeline, `report.html` embedding it)."""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import os
import platform
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trajflow.errors import FINAL_EXIT_CODES
from trajflow.files import replace_file, write_via_temporary
from trajflow.resources import human_bytes
from trajflow.storage import Storage, read_manifest, read_train_metrics
from trajflow.storage.manifest import TRAIN_ARTIFACT_DIR, TRAIN_CHECKPOINT_DIR, TRAIN_MODEL_KEY
from trajflow.storage.wait import is_storage_error
from trajflow.train.curves import finite_number, plot_losses

if TYPE_CHECKING:
    from trajflow.local.runner import Runner, RunResult

log = logging.getLogger(__name__)

STAGE_COLOURS = {"downloader": "#4C78A8", "preprocessing": "#F58518", "training": "#54A24B"}


@dataclass
class StageSummary:
    stage: str
    title: str
    shards: int
    ran: int
    skipped: int
    failed: int
    seconds: float | None  # wall time of this invocation's work on the stage
    figures: dict[str, Any] = field(default_factory=dict)
    # started, but found their earlier output done and kept it though the settings changed
    kept: int = 0

    def shard_text(self) -> str:
        text = f"{self.ran} ran" + (f", {self.kept} kept" if self.kept else "")
        text += f", {self.skipped} skipped" if self.skipped else ""
        return text + (f", {self.failed} failed" if self.failed else "") + f" of {self.shards}"

    def time_text(self) -> str:
        return "" if self.seconds is None else f"{self.seconds:.1f}s"

    def throughput(self) -> str:
        f = self.figures
        if self.stage == "downloader" and f.get("bytes") is not None:
            text = f"{human_bytes(f['bytes'])} in {f.get('items', 0)} files"
            if f.get("bytes_per_second"):
                text += f", {human_bytes(f['bytes_per_second'])}/s"
            return text
        if self.stage == "preprocessing" and f.get("trajectories") is not None:
            quarantined = f.get("quarantined", 0)
            text = f"{f['trajectories'] - quarantined} trajectories"
            if quarantined:
                text += f" ({quarantined} more quarantined)"
            text += f" → {f.get('frames', 0):,} frames"
            if f.get("rate_hz"):
                text += f" at {f['rate_hz']:g} Hz"
            if f.get("trajectories_per_second"):
                text += f", {f['trajectories_per_second']:.1f} traj/s"
            return text
        if self.stage == "training" and f.get("best_val_loss") is not None:
            # the exported model is the best epoch's; after early stopping the last is worse
            best, final = f["best_val_loss"], f["final_val_loss"]
            text = f"val loss {best:.4g}"
            if f.get("initial_val_loss"):
                text = f"val loss {f['initial_val_loss']:.4g} → {best:.4g} ({best / f['initial_val_loss']:.1%} of initial)"
            if final != best:
                text += f" at epoch {f['best_epoch'] + 1} (last epoch {final:.4g})"  # 1-based, as the live view
            text += f", {f.get('epochs', 0)} epochs"
            if f.get("samples_per_second"):
                text += f", {f['samples_per_second']:,.0f} samples/s"
            return text
        return ""


def _manifests(storage: Storage, stage: str, shards: int) -> list[dict[str, Any]]:
    """The stage's manifests there are; the first the store fails to give ends the reading,
    and the report then goes without their figures (a store that is down gives none)."""
    out = []
    for shard in range(shards):
        try:
            doc = read_manifest(storage, stage, shard)
        except ValueError as exc:  # a torn or foreign manifest: the others still count
            log.warning("cannot read %s manifest %d: %s", stage, shard, exc)
            continue
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            log.warning("cannot read %s manifest %d: %s", stage, shard, exc)
            break
        if doc is not None:
            out.append(doc)
    return out


def _location(root: str, key: str) -> str:
    """``key`` under the run root: a path to paste when the root is on a filesystem."""
    if root.startswith("file://"):
        return str(Path(urllib.parse.unquote(urllib.parse.urlparse(root).path)) / key)
    return f"{root}/{key}"


def training_history(storage: Storage | None, logged: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-epoch metrics and the run's summary: the training's own metrics.json in the run
    root when it wrote one (and `storage` is given), else what its log lines carried
    during this run."""

    doc = None
    if storage is not None:
        try:
            doc = read_train_metrics(storage)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            log.warning("cannot read the training's metrics in %s (%s): the report takes its log lines", storage.uri, exc)
    if doc is not None and isinstance(doc.get("history"), list):
        rows = [r for r in doc["history"] if isinstance(r, dict)]
        return rows, doc
    by_epoch: dict[Any, dict[str, Any]] = {}
    for row in logged:
        by_epoch.setdefault(row.get("epoch"), {}).update(row)
    return [by_epoch[e] for e in sorted(by_epoch, key=lambda e: (e is None, e))], {}


def summarize(runner: "Runner") -> tuple[list[StageSummary], list[dict[str, Any]]]:
    from trajflow.local import runner as r

    storage = runner.storage
    stages, history = [], []
    for plan in runner.plan.stages:
        tasks = runner.stage_tasks(plan.stage)
        ran = [t for t in tasks if t.state == r.DONE]
        spans = [(t.started, t.ended) for t in tasks if t.started is not None and t.ended is not None]
        seconds = (max(e for _, e in spans) - min(s for s, _ in spans)) if spans else None
        summary = StageSummary(
            plan.stage, plan.command, len(tasks), len(ran),
            sum(1 for t in tasks if t.state == r.SKIPPED), sum(1 for t in tasks if t.state == r.FAILED), seconds,
        )
        f = summary.figures
        if plan.stage == "downloader":
            docs = _manifests(storage, "download", plan.shards)
            items = [i for d in docs for i in d.get("items", []) if isinstance(i, dict)]
            f["items"] = len(items)
            f["bytes"] = int(sum(finite_number(i.get("size")) or 0 for i in items))
            # what the shards received in this run, as their final log lines say: a resumed
            # shard's items verified in place were not moved again
            received = [finite_number(t.fields["summary"].get("bytes_received")) for t in ran
                        if isinstance(t.fields.get("summary"), dict)]
            if seconds and received:
                f["bytes_per_second"] = sum(r or 0 for r in received) / seconds
        elif plan.stage == "preprocessing":
            from trajflow.preprocess.stage import stale_settings

            docs = _manifests(storage, "preprocess", plan.shards)
            f["trajectories"] = int(sum(finite_number(d.get("trajectories")) or finite_number(d.get("num_episodes")) or 0
                                        for d in docs))
            f["frames"] = int(sum(finite_number(d.get("num_frames")) or 0 for d in docs))
            f["quarantined"] = int(sum(finite_number(d.get("quarantined")) or 0 for d in docs))
            rates = {d.get("rate_hz") for d in docs if finite_number(d.get("rate_hz"))}
            f["rate_hz"] = float(rates.pop()) if len(rates) == 1 else 0.0
            # shards this run made, not those its processes found done (their summary says skipped)
            made = {t.shard for t in ran
                    if not (isinstance(t.fields.get("summary"), dict) and t.fields["summary"].get("skipped"))}
            if seconds and made:
                work = sum(finite_number(d.get("trajectories")) or 0 for d in docs if d.get("shard") in made)
                f["trajectories_per_second"] = work / seconds
            summary.kept = sum(1 for t in ran if isinstance(t.fields.get("summary"), dict) and t.fields["summary"].get("stale"))
            summary.ran -= summary.kept
            # of every done shard, also those the runner skipped: they hold what they were made
            # with until remade, whichever run last started their process
            stale = [c for c in (stale_settings(d, plan.config) for d in docs) if c]
            if stale:
                f["stale_shards"] = len(stale)
                f["stale_settings"] = list(dict.fromkeys(c for changes in stale for c in changes))
        else:
            if tasks and tasks[0].state in r.FINISHED:
                history, doc = training_history(storage, tasks[0].history)
            else:  # metrics.json may be an earlier run's: show only what this run's training said
                history, doc = training_history(None, tasks[0].history if tasks else [])
            scored = [(h.get("epoch", i), v) for i, h in enumerate(history) if (v := finite_number(h.get("val_loss"))) is not None]
            trains = [v for v in (finite_number(h.get("train_loss")) for h in history) if v is not None]
            initial = finite_number(doc.get("initial_val_loss"))
            if initial is None and tasks:  # an interrupted run: its log said it (a resumed one did not)
                initial = finite_number(tasks[0].fields.get("initial_val_loss"))
            if scored:
                best_epoch, best = min(scored, key=lambda e: e[1])  # the earliest on a tie, as training picks
                f.update(final_val_loss=scored[-1][1], best_val_loss=best, best_epoch=best_epoch, epochs=len(history))
            if scored and initial is not None:
                f["initial_val_loss"] = initial
            if trains:
                f["final_train_loss"] = trains[-1]
            speed = finite_number(doc.get("samples_per_second"))
            speeds = [v for v in (finite_number(h.get("samples_per_second")) for h in history) if v]
            if speed or speeds:
                f["samples_per_second"] = speed or sorted(speeds)[len(speeds) // 2]
            for key in ("status", "world_size", "device"):
                if doc.get(key) is not None:
                    f[key] = doc[key]
            finished = tasks[0].fields.get("already_finished") if tasks and tasks[0].state == r.DONE else None
            if isinstance(finished, str):  # resumed from the final checkpoint: trained nothing
                summary.ran, summary.kept = summary.ran - 1, 1
                f["already_finished"] = finished
        stages.append(summary)
    return stages, history


def summary_document(runner: "Runner", result: "RunResult", stages: list[StageSummary], history: list[dict[str, Any]],
                     report: Path | None) -> dict[str, Any]:
    return {
        "runId": runner.plan.global_.run_id,
        "root": runner.plan.root,
        "exitCode": result.exit_code,
        "interruptedBy": result.interrupted_by,
        "seconds": round(result.seconds, 3),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stages": {
            s.title: {"shards": s.shards, "ran": s.ran, "kept": s.kept, "skipped": s.skipped, "failed": s.failed,
                      "seconds": None if s.seconds is None else round(s.seconds, 3), **s.figures}
            for s in stages
        },
        "tasks": [
            {"task": t.key, "state": t.state, "attempts": t.attempts, "started": t.started, "ended": t.ended,
             "exitCode": t.exit_code, "log": str(t.log_path.resolve())}
            for t in result.tasks
        ],
        "history": history,
        "report": str(report) if report else None,
        "results": results_of(runner.plan.root, result.exit_code, [p.stage for p in runner.plan.stages]),
    }


def results_of(root: str, exit_code: int, stages: list[str]) -> dict[str, str] | None:
    """Where a successful run's model and checkpoints are."""
    if exit_code != 0 or "training" not in stages:
        return None
    return {"model": _location(root, TRAIN_MODEL_KEY), "checkpoints": _location(root, TRAIN_CHECKPOINT_DIR) + "/"}


def notes(doc: dict[str, Any], stages: list[StageSummary]) -> list[str]:
    """What the table hides and a user must act on: results kept from earlier settings."""
    out = []
    for s in stages:
        f = s.figures
        if f.get("stale_settings"):
            out.append(
                f"{s.title}: {f['stale_shards']} of {s.shards} shards were kept as made with earlier settings, not "
                f"remade with this preprocessing.config (kept -> configured: {', '.join(f['stale_settings'])}); to "
                f"remake them with it, use a new global.runId, or delete {_location(doc['root'], 'resampled')}/ and "
                f"{_location(doc['root'], TRAIN_CHECKPOINT_DIR)}/ and run again")
        if f.get("already_finished"):
            out.append(f["already_finished"])  # names the stage itself
    return out


# ---- the picture ----------------------------------------------------------------------


def render_png(path: Path, runner: "Runner", result: "RunResult", history: list[dict[str, Any]], initial: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    if not plot_losses(ax_loss, history, initial):
        ax_loss.text(0.5, 0.5, "no training metrics in this run", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_title("Loss per epoch")

    ran = [t for t in result.tasks if t.started is not None and t.ended is not None]
    labels: list[str] = []
    for row, task in enumerate(ran):
        colour = STAGE_COLOURS.get(task.stage.stage, "grey")
        hatch = "//" if task.state not in ("done",) else None
        ax_time.barh(row, task.ended - task.started, left=task.started, color=colour, hatch=hatch, edgecolor="white")
        labels.append(task.label)
    if ran:
        ax_time.set_yticks(range(len(ran)), labels)
        ax_time.invert_yaxis()
    else:
        skipped = sum(1 for t in result.tasks if t.state == "skipped")
        ax_time.text(0.5, 0.5, f"nothing to do: {skipped} task(s) were done earlier", ha="center", va="center",
                     transform=ax_time.transAxes)
        ax_time.set_yticks([])
    ax_time.set_title(f"Stage timeline (this run, {result.seconds:.1f}s)")
    ax_time.set_xlabel("seconds since start")
    ax_time.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"trajflow run {runner.plan.global_.run_id}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_via_temporary(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
    finally:
        plt.close(fig)


def render_html(path: Path, png: Path, doc: dict[str, Any], stages: list[StageSummary], runner: "Runner") -> None:
    e = html.escape
    image = base64.b64encode(png.read_bytes()).decode()
    status = "succeeded" if doc["exitCode"] == 0 else f"ended with exit code {doc['exitCode']}"
    rows = "".join(
        f"<tr><td>{e(s.title)}</td><td>{e(s.shard_text())}</td><td>{e(s.time_text())}</td><td>{e(s.throughput())}</td></tr>"
        for s in stages
    )
    def took(task: dict[str, Any]) -> str:
        if task["started"] is None or task["ended"] is None:
            return ""
        return f"{task['ended'] - task['started']:.1f}s"

    tasks = "".join(
        f"<tr><td>{e(t['task'])}</td><td>{e(t['state'])}</td><td>{t['attempts']}</td>"
        f"<td>{took(t)}</td><td><code>{e(t['log'])}</code></td></tr>"
        for t in doc["tasks"]
    )
    train = next((s.figures for s in stages if s.stage == "training" and s.figures), None)
    training = ""
    if train:
        labels = (("status", "status"), ("initial_val_loss", "validation loss before training"),
                  ("best_val_loss", "best validation loss"), ("final_val_loss", "final validation loss"),
                  ("final_train_loss", "final training loss"), ("epochs", "epochs"), ("world_size", "processes"),
                  ("device", "device"), ("samples_per_second", "samples per second"))
        cells = "".join(
            f"<tr><td>{e(label)}</td><td>{e(f'{train[key]:.6g}' if isinstance(train[key], float) else str(train[key]))}</td></tr>"
            for key, label in labels if train.get(key) is not None
        )
        training = (f"<h2>Training</h2><table>{cells}</table><p>Model, metrics and loss curve: "
                    f"<code>{e(doc['root'])}/{TRAIN_ARTIFACT_DIR}/</code></p>")
    warnings = "".join(f'<p class="warn">{e(note)}</p>' for note in notes(doc, stages))
    configs = "".join(f"<li>{e(stage)}: <code>{e(str(p))}</code></li>" for stage, p in runner.config_paths.items())
    machine = f"{platform.node()} · {os.cpu_count()} cores · Python {platform.python_version()}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trajflow run {e(doc['runId'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }}
img {{ max-width: 100%; }} code {{ font-size: .9em; }} .muted {{ color: #666; }} .warn {{ color: #a15c00; }}
</style></head><body>
<h1>trajflow run <code>{e(doc['runId'])}</code></h1>
<p>{e(status)} in {doc['seconds']:.1f}s · root <code>{e(doc['root'])}</code></p>
<p class="muted">{e(doc['finished'])} · {e(machine)}</p>
<table><tr><th>stage</th><th>shards</th><th>time</th><th>throughput / result</th></tr>{rows}</table>
{warnings}
<img alt="loss per epoch and stage timeline" src="data:image/png;base64,{image}">
{training}
<h2>Tasks</h2>
<table><tr><th>task</th><th>state</th><th>attempts</th><th>time</th><th>log</th></tr>{tasks}</table>
<h2>Rendered stage configs</h2><ul>{configs}</ul>
</body></html>
"""
    replace_file(path, page)


def write_report(runner: "Runner", result: "RunResult", report_path: Path | None = None) -> tuple[dict[str, Any], list[StageSummary]]:
    """Write summary.json, report.png and report.html under the work dir; return the summary."""
    stages, history = summarize(runner)
    html_path = (report_path or runner.work_dir / "report.html").resolve()
    png_path = html_path.with_suffix(".png")
    written: Path | None = None
    try:
        initial = next((s.figures.get("initial_val_loss") for s in stages if s.stage == "training"), None)
        render_png(png_path, runner, result, history, initial)
        doc = summary_document(runner, result, stages, history, html_path)
        render_html(html_path, png_path, doc, stages, runner)
        written = html_path
    except Exception as exc:  # the run's outcome must not hinge on drawing a picture
        log.warning("could not write the report: %s: %s", type(exc).__name__, exc)
    doc = summary_document(runner, result, stages, history, written)
    summary_path = runner.work_dir / "summary.json"
    try:
        replace_file(summary_path, json.dumps(doc, indent=1, default=str))
    except OSError as exc:  # the summary is still printed
        log.error("could not write %s: %s", summary_path, exc.strerror or exc)
    return doc, stages


def print_summary(console: Any, doc: dict[str, Any], stages: list[StageSummary]) -> None:
    """The last thing a user sees: per-stage times and results, and where the report is."""
    from rich.table import Table

    title = "done" if doc["exitCode"] == 0 else ("interrupted" if doc["interruptedBy"] else f"failed (exit code {doc['exitCode']})")
    table = Table(title=f"trajflow run {doc['runId']}: {title} in {doc['seconds']:.1f}s", title_justify="left", box=None,
                  header_style="bold", pad_edge=False)
    for column in ("stage", "shards", "time", "throughput / result"):
        table.add_column(column, justify="right" if column == "time" else "left")
    for s in stages:
        table.add_row(s.title, s.shard_text(), s.time_text(), s.throughput())
    console.print(table)
    for note in notes(doc, stages):
        console.print(note, style="yellow", highlight=False, soft_wrap=True)
    # shards kept from earlier settings stay so on a rerun: the error may be theirs
    stale = " (the ones kept from earlier settings too: see above)" if any(s.figures.get("stale_settings") for s in stages) else ""
    if doc["exitCode"] in FINAL_EXIT_CODES:  # a rerun as it is fails again
        console.print(f"finished shards are kept{stale}: fix what the error above names, then the same command resumes "
                      "from them", style="yellow", highlight=False)
    elif doc["exitCode"] != 0:
        console.print(f"finished shards are kept{stale}: the same command, run again, resumes from them", style="yellow",
                      highlight=False)
    if doc.get("report"):
        console.print(f"report: {doc['report']}", highlight=False, soft_wrap=True)
    if doc.get("results"):
        console.print(f"model: {doc['results']['model']} (metrics, loss curve and config beside it)", highlight=False,
                      soft_wrap=True)
        console.print(f"checkpoints: {doc['results']['checkpoints']}", highlight=False, soft_wrap=True)
