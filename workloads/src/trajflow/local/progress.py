"""What `trajflow run` shows while it works: a live table on a terminal, plain lines otherwise."""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from trajflow.log import stdout_to_devnull

if TYPE_CHECKING:
    from trajflow.local.runner import Runner, Task

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}


@dataclass
class StageStatus:
    stage: str
    title: str
    total: int
    finished: int
    skipped: int
    running: int
    failed: int
    stopped: int
    waiting_note: str
    seconds: float | None
    detail: str
    epoch: int | None = None
    epochs: int | None = None

    @property
    def state(self) -> str:
        if self.failed:
            return "failed"
        if self.finished == self.total:
            return "done"
        if self.running:
            return "running"
        if self.stopped:
            return "stopped"
        return "waiting"


def _fmt_float(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def training_detail(fields: dict[str, Any], epochs: int | None) -> tuple[str, int | None]:
    """`epoch 3/10 · train loss 0.12 · val loss 0.10` from the latest training log fields."""
    parts, epoch = [], None
    if isinstance(fields.get("epochs"), int):
        epochs = fields["epochs"]
    if "epoch" in fields:
        try:
            epoch = int(fields["epoch"]) + 1  # logged 0-based, shown 1-based
        except (TypeError, ValueError):
            epoch = None
        if epoch is not None:
            parts.append(f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}")
    if epoch is None and "initial_val_loss" in fields:
        return f"initial val loss {_fmt_float(fields['initial_val_loss'])}", None
    for key, name in (("train_loss", "train loss"), ("val_loss", "val loss")):
        if key in fields:
            parts.append(f"{name} {_fmt_float(fields[key])}")
    if isinstance(fields.get("samples_per_second"), (int, float)):
        parts.append(f"{fields['samples_per_second']:,.0f} samples/s")
    return " · ".join(parts), epoch


def stage_statuses(runner: "Runner") -> list[StageStatus]:
    from trajflow.local import runner as r

    now = runner.now()
    out = []
    for stage in runner.plan.stages:
        tasks = runner.stage_tasks(stage.stage)
        starts = [t.started for t in tasks if t.started is not None]
        ends = [t.ended if t.ended is not None else now for t in tasks if t.started is not None]
        seconds = (max(ends) - min(starts)) if starts else None
        running = [t for t in tasks if t.state == r.RUNNING]
        waiting = [t for t in tasks if t.state in (r.WAITING, r.RETRY) and t.note]
        epochs = getattr(stage.config, "epochs", None) if stage.stage == "training" else None
        detail, epoch = "", None
        if stage.stage == "training" and tasks:
            detail, epoch = training_detail(tasks[0].fields, epochs)
            if not detail and running:
                detail = running[0].last_message
        elif running:
            latest = running[-1]
            detail = f"shard {latest.shard}: {latest.last_message}" if latest.last_message else ""
        out.append(
            StageStatus(
                stage=stage.stage,
                title=stage.command,
                total=len(tasks),
                finished=sum(1 for t in tasks if t.state in r.FINISHED),
                skipped=sum(1 for t in tasks if t.state == r.SKIPPED),
                running=len(running),
                failed=sum(1 for t in tasks if t.state == r.FAILED),
                stopped=sum(1 for t in tasks if t.state == r.STOPPED),
                waiting_note=waiting[0].note if waiting else "",
                seconds=seconds,
                detail=detail,
                epoch=epoch,
                epochs=epochs,
            )
        )
    return out


def describe_plan(runner: "Runner") -> str:
    parts = []
    for stage in runner.plan.stages:
        title = stage.command
        if stage.stage == "training":
            parts.append(f"{title} ({stage.nproc_per_node} DDP process(es))")
        else:
            parts.append(f"{title} ({stage.shards} shard(s), {stage.parallelism} at once)")
    disabled = f"; disabled: {', '.join(runner.plan.disabled)}" if runner.plan.disabled else ""
    return f"run {runner.plan.global_.run_id} at {runner.plan.root}: {', '.join(parts)}{disabled}"


class PlainView:
    """Timestamped lines for logs and CI: runner events, child warnings and errors, epochs,
    and a status line every `status_every` seconds."""

    def __init__(self, stream: IO[str] | None = None, verbose: bool = False, status_every: float = 15.0):
        self.stream = stream or sys.stdout
        self.verbose = verbose
        self.status_every = status_every
        self.runner: Runner | None = None
        self._last_status = 0.0
        self._last_epoch: int | None = None

    def _print(self, text: str) -> None:
        elapsed = self.runner.now() if self.runner is not None else 0.0
        stamp = time.strftime("%H:%M:%S")
        try:
            for i, line in enumerate(text.splitlines() or [""]):
                prefix = f"{stamp} [{elapsed:7.1f}s] " if i == 0 else " " * 22
                self.stream.write(prefix + line + "\n")
            self.stream.flush()
        except BrokenPipeError:
            # the reader went away (`trajflow run ... | tee` killed): the run goes on, and its
            # logs and report stay in the work dir
            if self.stream is sys.stdout:
                stdout_to_devnull()
            self.stream = open(os.devnull, "w")

    def start(self, runner: "Runner") -> None:
        self.runner = runner
        self._last_status = runner.now()
        self._print(describe_plan(runner))

    def event(self, text: str, level: int = logging.INFO) -> None:
        prefix = {logging.WARNING: "WARNING ", logging.ERROR: "ERROR "}.get(level, "")
        self._print(prefix + text)

    def child_record(self, task: "Task", record: dict[str, Any]) -> None:
        level = _LEVELS.get(str(record.get("level", "info")).lower(), logging.INFO)
        if task.stage.stage == "training":
            detail, epoch = training_detail(task.fields, getattr(task.stage.config, "epochs", None))
            if epoch is not None and epoch != self._last_epoch and ("val_loss" in record or "train_loss" in record):
                self._last_epoch = epoch
                self._print(f"{task.label}: {detail}")
                return
        if level >= logging.WARNING or self.verbose:
            name = logging.getLevelName(level) + " " if level >= logging.WARNING else ""
            self._print(f"{task.label}: {name}{record.get('msg', '')}")

    def refresh(self) -> None:
        if self.runner is None or self.runner.now() - self._last_status < self.status_every:
            return
        self._last_status = self.runner.now()
        parts = []
        for s in stage_statuses(self.runner):
            text = f"{s.title} {s.finished}/{s.total}"
            if s.running:
                text += f" ({s.running} running)"
            elif s.state == "waiting" and s.waiting_note:
                text += f" ({s.waiting_note})"
            if s.stage == "training" and s.detail:
                text += f" {s.detail}"
            parts.append(text)
        self._print("status: " + " · ".join(parts))

    def stop(self) -> None:
        pass


class LiveView:
    """A table that redraws in place (rich Live), with runner events printed above it."""

    ICONS = {"done": "[green]✓[/]", "failed": "[red]✗[/]", "stopped": "[yellow]■[/]", "waiting": "[dim]·[/]"}

    def __init__(self, console: Any = None):
        from rich.console import Console

        self.console = console or Console()
        self.runner: Runner | None = None
        self.live: Any = None
        self._spinners: dict[str, Any] = {}

    def start(self, runner: "Runner") -> None:
        from rich.live import Live

        self.runner = runner
        self.console.print(f"[bold]trajflow run[/] · {describe_plan(runner)}", highlight=False)
        self.live = Live(get_renderable=self._render, console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def _icon(self, status: StageStatus) -> Any:
        from rich.spinner import Spinner

        if status.state == "running":
            return self._spinners.setdefault(status.stage, Spinner("dots", style="cyan"))
        return self.ICONS[status.state]

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, show_header=True, header_style="bold", expand=False, pad_edge=False)
        table.add_column("", width=1)
        table.add_column("stage")
        table.add_column("progress", width=24)
        table.add_column("shards", justify="right")
        table.add_column("time", justify="right")
        table.add_column("")
        if self.runner is None:
            return table
        for s in stage_statuses(self.runner):
            if s.stage == "training" and s.epochs and s.epoch is not None and s.state != "done":
                bar = ProgressBar(total=s.epochs, completed=min(s.epoch, s.epochs), width=24)
            else:
                bar = ProgressBar(total=max(s.total, 1), completed=s.finished, width=24)
            counts = f"{s.finished}/{s.total}"
            if s.skipped:
                counts += f" ({s.skipped} skipped)"
            seconds = f"{s.seconds:.1f}s" if s.seconds is not None else ""
            if s.state == "waiting":
                detail = Text(s.waiting_note or "waiting", style="dim")
            elif s.state == "failed":
                detail = Text("failed (see above)", style="red")
            else:
                detail = Text(s.detail, overflow="ellipsis", no_wrap=True)
            table.add_row(self._icon(s), s.title, bar, counts, seconds, detail)
        return table

    def event(self, text: str, level: int = logging.INFO) -> None:
        style = {logging.WARNING: "yellow", logging.ERROR: "red"}.get(level, "dim")
        elapsed = self.runner.now() if self.runner is not None else 0.0
        self.console.print(f"{elapsed:7.1f}s {text}", style=style, highlight=False, markup=False, soft_wrap=True)

    def child_record(self, task: "Task", record: dict[str, Any]) -> None:
        level = _LEVELS.get(str(record.get("level", "info")).lower(), logging.INFO)
        if level >= logging.WARNING and not record.get("raw"):
            self.event(f"{task.label}: {record.get('msg', '')}", level)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.refresh()

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def make_view(plain: bool | None = None, verbose: bool = False) -> Any:
    """LiveView on a terminal, PlainView otherwise (or when asked)."""
    from rich.console import Console

    console = Console()
    if plain is None:
        plain = not console.is_terminal or console.is_dumb_terminal
    return PlainView(verbose=verbose) if plain else LiveView(console)
