"""The ``memctl`` command line: parse, call the trainer, print with rich.

Errors a user can fix are one line on stderr and exit code 2; a run stopped by a
non-finite loss exits 1; SIGTERM exits 0 after checkpointing (cluster preemption),
SIGINT 130.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from memctl.errors import UserError

app = typer.Typer(
    help="Train and evaluate differentiable-memory neural networks from YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value by dotted key, e.g. --set train.steps=200"),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="auto, cpu or cuda (default: the recipe's)")
]
RunsDirOption = Annotated[Path, typer.Option("--runs-dir", help="Where run directories live")]

# Plain progress lines (no terminal) are printed at most this often.
PLAIN_PROGRESS_SECONDS = 5.0


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError into one line on stderr and exit code 2."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ConsoleReporter:
    """Progress for people: a rich bar on a terminal, periodic plain lines otherwise."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.last_line = 0.0
        self.last_row: dict[str, Any] | None = None
        self.printed: dict[str, Any] | None = None

    def start(self, step: int, total: int, level: int) -> None:
        self.total = total
        if not self.live:
            print(f"training from step {step} to {total} (level {level})", flush=True)
            return
        self.progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("level {task.fields[level]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn(f"{self.metric} {{task.fields[metric]}}"),
            TextColumn("{task.fields[speed]} steps/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.progress.start()
        self.bar = self.progress.add_task(
            "train", total=total, completed=step, level=level, loss="-", metric="-", speed="-"
        )

    def log(self, row: dict[str, Any]) -> None:
        self.last_row = row
        if self.progress is not None:
            self.progress.update(
                self.bar,
                completed=row["step"],
                level=row["level"],
                loss=_fmt(row["loss"]),
                metric=_fmt(row[self.metric]),
                speed=_fmt(row["steps_per_s"]),
            )
            return
        if time.monotonic() - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self._plain_line(row)

    def _plain_line(self, row: dict[str, Any]) -> None:
        self.last_line = time.monotonic()
        self.printed = row
        print(
            f"step {row['step']}/{self.total} level {row['level']} loss {_fmt(row['loss'])} "
            f"{self.metric} {_fmt(row[self.metric])} {_fmt(row['steps_per_s'])} steps/s",
            flush=True,
        )

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        elif self.last_row is not None and self.printed is not self.last_row:
            self._plain_line(self.last_row)


def print_eval_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    columns = [c for c in rows[0] if c not in ("step", "checkpoint")]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_fmt(row[c]) for c in columns))
    console.print(table)


def _finish_command(trainer: Any, run_path: Path, status: str) -> None:
    from memctl.trainer import STOP_SIGNALS

    if status == "interrupted":
        code = STOP_SIGNALS.get(trainer.stop_signal, 0)
        console.print(
            f"interrupted at step {trainer.step}; checkpoint saved. "
            f"Continue with: memctl resume {run_path}"
        )
        raise typer.Exit(code)
    print_eval_table(trainer.final_eval, f"{run_path.name}: evaluation at step {trainer.step}")
    console.print(f"finished: {run_path}")


def _run_training(start: Any) -> None:
    from memctl.trainer import TrainingError

    try:
        trainer, status, run_path = start()
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    _finish_command(trainer, run_path, status)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    overrides: SetOption = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Run name (default: the recipe's name)")
    ] = None,
    runs_dir: RunsDirOption = Path("runs"),
    device: DeviceOption = None,
) -> None:
    """Train a recipe into RUNS_DIR/NAME. An existing run of that name is never overwritten."""
    with user_errors():
        from memctl.recipe import load_recipe
        from memctl.registry import TASKS
        from memctl.trainer import start_run

        settings = list(overrides or [])
        if name is not None:
            settings.append(f"name={name}")
        loaded = load_recipe(recipe, settings)
        reporter = ConsoleReporter(TASKS.get(loaded.task.type).cls.primary_metric)

        def start() -> tuple[Any, str, Path]:
            trainer, status = start_run(loaded, runs_dir, settings, device, reporter, str(recipe))
            return trainer, status, runs_dir / loaded.name

        _run_training(start)


@app.command()
def resume(
    run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/copy_lstm")],
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Train this many more steps")
    ] = None,
    overrides: SetOption = None,
    device: DeviceOption = None,
) -> None:
    """Continue a run from its last checkpoint, optionally under changed settings."""
    with user_errors():
        from memctl.registry import TASKS
        from memctl.rundir import RunDir
        from memctl.trainer import load_run_recipe, resume_run

        task_type = load_run_recipe(RunDir.open(run)).task.type
        reporter = ConsoleReporter(TASKS.get(task_type).cls.primary_metric)

        def start() -> tuple[Any, str, Path]:
            trainer, status = resume_run(run, list(overrides or []), steps, device, reporter)
            return trainer, status, run

        _run_training(start)


def _parse_lengths(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--lengths {text!r}: expected comma-separated integers") from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths {text!r}: expected positive integers, e.g. 10,20,40")
    return lengths


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory")],
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="last, best, or a step number")
    ] = "last",
    lengths: Annotated[
        str | None,
        typer.Option(
            "--lengths",
            help="Comma-separated levels (sequence length, n, ...) to evaluate at, "
            "besides the trained one (default: the recipe's eval.lengths)",
        ),
    ] = None,
    device: DeviceOption = None,
) -> None:
    """Evaluate a checkpoint on held-out batches; print a table and append to eval.csv."""
    with user_errors():
        from memctl.trainer import evaluate_run

        rows = evaluate_run(run, checkpoint, _parse_lengths(lengths), device)
        print_eval_table(rows, f"{run.name}: {checkpoint} checkpoint (step {rows[0]['step']})")


@app.command("runs")
def list_runs(
    runs_dir: Annotated[Path, typer.Argument(help="Folder of runs")] = Path("runs"),
) -> None:
    """List runs: name, model, task, status, step, level, last loss and metric."""
    with user_errors():
        from memctl.rundir import RunDir

        if not runs_dir.is_dir():
            raise UserError(f"{runs_dir}: no such directory")
        runs = [RunDir(p) for p in sorted(runs_dir.iterdir()) if (p / "run.json").is_file()]
        rows = [run.summary() for run in runs]
        if not rows:
            console.print(f"no runs in {runs_dir}")
            return
        table = Table()
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*(_fmt(v) for v in row.values()))
        console.print(table)


def main() -> None:
    app()
