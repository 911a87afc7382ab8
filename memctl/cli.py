"""The ``memctl`` command line: parse, call the trainer, print with rich.

Errors a user can fix are one line on stderr and exit code 2; a run stopped by a
non-finite loss exits 1; SIGTERM exits 0 after checkpointing (cluster preemption),
SIGINT 130.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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


def _help_like_click() -> None:
    """Make typer's rich help read as click's: typer 0.29 prints a value type after every
    flag (``--dry-run <bool>``), although a flag takes no value (its plain help leaves it
    out), and writes a required argument in braces (``{recipe}``). Here flags show no type
    and arguments read ``RECIPE``, ``[RUNS_DIR]``, ``RUNS...``."""
    from typer.core import TyperArgument, TyperOption

    value_type = getattr(TyperOption, "display_type_rich", None)
    if value_type is not None:

        def flag_has_no_type(self: TyperOption, ctx: Any) -> str | None:
            return None if self.is_flag or self.count else value_type(self, ctx)

        TyperOption.display_type_rich = flag_has_no_type  # type: ignore[method-assign]

    def usage_pieces(self: TyperArgument, ctx: Any) -> list[str]:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return [f"{name}..." if self.nargs != 1 else name]

    TyperArgument.get_usage_pieces = usage_pieces  # type: ignore[method-assign]


_help_like_click()
app = typer.Typer(
    help="Train and evaluate differentiable-memory neural networks from YAML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
console = Console()


def _print_version(wanted: bool) -> None:
    if wanted:
        import torch

        import memctl

        print(f"memctl {memctl.__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print memctl's version and torch's, and exit.",
        ),
    ] = False,
    plugin: Annotated[
        list[str] | None,
        typer.Option(
            "--plugin",
            help="A Python file or importable module that registers tasks or models, imported "
            "before the command (repeatable; also MEMCTL_PLUGINS, ':'-separated)",
        ),
    ] = None,
) -> None:
    """The options of memctl itself, given before a command (the app's help describes it)."""
    with user_errors():
        from memctl import plugins

        plugins.load_named(plugin or [], os.environ.get(plugins.ENV_VAR))


SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value by dotted key, e.g. --set train.steps=200"),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: the recipe's)")
]
RunsDirOption = Annotated[Path, typer.Option("--runs-dir", help="Where run directories live")]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Skip the check that a step fits in the device's memory (estimated before "
        "anything is built or written)",
    ),
]
FromOption = Annotated[
    str, typer.Option("--from", help="Checkpoint to continue from: last, best or step_N")
]
TensorBoardOption = Annotated[
    bool,
    typer.Option(
        "--tensorboard",
        help="Also write TensorBoard event files into RUN/tensorboard "
        "(same as --set log.tensorboard=true)",
    ),
]
MlflowOption = Annotated[
    bool,
    typer.Option(
        "--mlflow",
        help="Also log to MLflow: MLFLOW_TRACKING_URI, default ./mlruns "
        "(same as --set log.mlflow=true)",
    ),
]

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


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object per row, nothing else (for programs)")
]


def _json_value(value: Any, numeric: bool) -> Any:
    """A cell as JSON: a ``numeric`` column's text as a number (null if it is none, such as
    ``-``), NaN and infinities as null."""
    if numeric and isinstance(value, str):
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                continue
        else:
            return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def print_json_rows(rows: list[dict[str, Any]], numeric: tuple[str, ...] = ()) -> None:
    """One JSON object per line on stdout: what ``--json`` prints. Cells of the ``numeric``
    columns, read as text from a CSV, are written as numbers."""
    for row in rows:
        print(json.dumps({key: _json_value(value, key in numeric) for key, value in row.items()}))


def print_eval_table(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    bookkeeping = ("step", "time", "checkpoint", "checkpoint_step", "eval_seed")
    columns = [c for c in rows[0] if c not in bookkeeping]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_fmt(row[c]) for c in columns))
    console.print(table)


def print_reference_checks(recipe: Any, rows: list[dict[str, Any]]) -> None:
    """One line per reference of the recipe: our figure beside it and whether it is met."""
    from memctl.report import check_references

    for check in check_references(recipe.reference, rows):
        console.print(check.line(), soft_wrap=True, highlight=False)


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
    print_reference_checks(trainer.recipe, trainer.final_eval)
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
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            help="Train to this total step (same as --set train.steps=N; "
            "resume --steps is N more steps)",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed of the run (same as --set seed=S)")
    ] = None,
    runs_dir: RunsDirOption = Path("runs"),
    device: DeviceOption = None,
    tensorboard: TensorBoardOption = False,
    mlflow: MlflowOption = False,
    force: ForceOption = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print what would run (as memctl show); create nothing"),
    ] = False,
) -> None:
    """Train a recipe into RUNS_DIR/NAME. An existing run of that name is never overwritten."""
    with user_errors():
        from memctl.lifecycle import start_run
        from memctl.recipe import load_recipe
        from memctl.registry import TASKS

        settings = list(overrides or []) + (["log.tensorboard=true"] if tensorboard else [])
        settings += ["log.mlflow=true"] if mlflow else []
        if name is not None:
            settings.append(f"name={name}")
        if steps is not None:
            settings.append(f"train.steps={steps}")
        if seed is not None:
            settings.append(f"seed={seed}")
        loaded = load_recipe(recipe, settings)
        if dry_run:
            _print_plan(loaded, device, recipe)
            return
        task_class = TASKS.get(loaded.task.type).cls.for_config(loaded.task)
        reporter = ConsoleReporter(task_class.primary_metric)

        def start() -> tuple[Any, str, Path]:
            trainer, status = start_run(
                loaded, runs_dir, settings, device, reporter, str(recipe), force
            )
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
    tensorboard: TensorBoardOption = False,
    mlflow: MlflowOption = False,
    force: ForceOption = False,
    start_from: FromOption = "last",
) -> None:
    """Continue a run from its last checkpoint (or --from another: what the run wrote
    after it is cut first), optionally under changed settings."""
    with user_errors():
        from memctl.lifecycle import load_run, resume_run
        from memctl.registry import TASKS

        task = load_run(run).recipe.task
        reporter = ConsoleReporter(TASKS.get(task.type).cls.for_config(task).primary_metric)
        settings = list(overrides or []) + (["log.tensorboard=true"] if tensorboard else [])
        settings += ["log.mlflow=true"] if mlflow else []

        def start() -> tuple[Any, str, Path]:
            trainer, status = resume_run(run, settings, steps, device, reporter, force, start_from)
            return trainer, status, run

        _run_training(start)


def _print_plan(recipe: Any, device: str | None, source: Path) -> None:
    import yaml

    from memctl.lifecycle import plan
    from memctl.report import reference_text

    try:
        found = plan(recipe, device)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    print(yaml.safe_dump(recipe.resolved(), sort_keys=False), end="")
    table = Table(title=f"{recipe.name}: nothing created")
    table.add_column("")
    table.add_column("")
    for key in ("parameters", "device", "backend", "memory", "available"):
        value = found[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    if not found["fits"]:
        console.print("it does not fit: train refuses it (or lower the sizes, or pass --force)")
    for reference in recipe.reference:
        console.print(reference_text(reference), soft_wrap=True, highlight=False)


@app.command()
def show(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file")],
    overrides: SetOption = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Same as --set train.steps=N")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Same as --set seed=S")] = None,
    device: DeviceOption = None,
) -> None:
    """The resolved recipe, the model's parameter count, the memory a training step needs
    against what the device has, and which implementation will run; creates nothing."""
    with user_errors():
        from memctl import plugins
        from memctl.recipe import load_recipe

        if (recipe.parent / "run.json").is_file():  # a run's recipe.yaml: its plugins
            plugins.load_for_runs([recipe.parent])
        settings = list(overrides or [])
        if steps is not None:
            settings.append(f"train.steps={steps}")
        if seed is not None:
            settings.append(f"seed={seed}")
        _print_plan(load_recipe(recipe, settings), device, recipe)


@app.command()
def fork(
    run: Annotated[Path, typer.Argument(help="Run directory to start from")],
    new_name: Annotated[str, typer.Argument(help="Name of the new run")],
    start_from: FromOption = "last",
    overrides: SetOption = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Train this many more steps")
    ] = None,
    runs_dir: Annotated[
        Path | None,
        typer.Option("--runs-dir", help="Where the new run goes (default: beside RUN)"),
    ] = None,
    device: DeviceOption = None,
    force: ForceOption = False,
) -> None:
    """A new run NEW_NAME from RUN's checkpoint (weights, optimizer, curriculum, random
    streams and its rows up to that step) that trains on, optionally under changed
    settings; RUN is not changed, and the new run's lineage names it."""
    with user_errors():
        from memctl.lifecycle import fork_run, load_run
        from memctl.registry import TASKS

        task = load_run(run).recipe.task
        reporter = ConsoleReporter(TASKS.get(task.type).cls.for_config(task).primary_metric)

        def start() -> tuple[Any, str, Path]:
            return fork_run(
                run, new_name, start_from, overrides, steps, runs_dir, device, reporter, force
            )

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
    batches: Annotated[
        int | None,
        typer.Option(
            "--batches",
            help="Held-out batches per level (default: the recipe's eval.batches); the "
            "first ones are the recipe's, so more batches extend the same sample",
        ),
    ] = None,
    device: DeviceOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a checkpoint on held-out batches; print a table and append to eval.csv.

    Below the table, each of the recipe's references beside our figure at its level, and
    whether it is met (the default levels include every reference's)."""
    with user_errors():
        from memctl.lifecycle import evaluate_run, load_run
        from memctl.report import check_references, reference_record

        rows = evaluate_run(run, checkpoint, _parse_lengths(lengths), device, batches, force)
        recipe = load_run(run).recipe
        if as_json:
            for row in rows:
                here = [r for r in recipe.reference if r.at.level == int(row["level"])]
                row["references"] = [reference_record(c) for c in check_references(here, [row])]
            print_json_rows(rows)
            return
        print_eval_table(
            rows, f"{run.name}: {checkpoint} checkpoint (step {rows[0]['checkpoint_step']})"
        )
        print_reference_checks(recipe, rows)


REPORT_HEADERS = ["recipe", "level", "metric", "median", "min", "max", "met", "reference",
                  "source", "seeds", "steps", "wall (s)"]  # fmt: skip


def _report_cells(frame: Any) -> list[list[str]]:
    """The report's rows for people (``REPORT_HEADERS``): ``met`` as seeds met / seeds,
    steps and wall time as medians over the finished seeds."""
    cells = []
    for row in frame.to_dict("records"):
        met = f"{row['met']}/{row['runs']}" if row["reference"] else ""
        wall = _fmt_cell(round(row["wall_s"])) if math.isfinite(row["wall_s"]) else "-"
        cells.append([row["recipe"], str(row["level"]), row["metric"], _fmt_cell(row["median"]),
                      _fmt_cell(row["min"]), _fmt_cell(row["max"]), met, row["reference"],
                      row["source"], row["seeds"], _fmt_cell(row["steps"]), wall])  # fmt: skip
    return cells


def _report_markdown(command: str, found: Any) -> str:
    from datetime import UTC, datetime

    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"`{command}` ({date})", ""]
    lines += [f"- machine: {line}" for line in found.machines] + [""]
    lines.append("| " + " | ".join(REPORT_HEADERS) + " |")
    lines.append("|" + "---|" * len(REPORT_HEADERS))
    for row in _report_cells(found.table):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    if found.notes:
        lines += ["", *(f"- {note}" for note in found.notes)]
    return "\n".join(lines)


def _report_table(command: str, found: Any) -> Table:
    """The report for a terminal: ``median [min, max]`` in one cell, the sources below."""
    table = Table(title=command)
    for header in ("recipe", "level", "metric", "median [min, max]", "met", "reference",
                   "seeds", "steps", "wall (s)"):  # fmt: skip
        table.add_column(header, justify="left" if header in ("recipe", "metric") else "right")
    sources = []
    for row in _report_cells(found.table):
        recipe, level, metric, median, low, high, met, reference, source, *rest = row
        table.add_row(recipe, level, metric, f"{median} [{low}, {high}]", met, reference, *rest)
        if source:
            sources.append(f"reference of {recipe} at level {level}: {source}")
    table.caption = "\n".join([*sources, *(f"machine: {m}" for m in found.machines),
                               *found.notes])  # fmt: skip
    table.caption_justify = "left"
    return table


@app.command("report")
def report(
    paths: Annotated[
        list[Path],
        typer.Argument(help="A sweep folder, or run directories (their seeds grouped by recipe)"),
    ],
    markdown: Annotated[
        bool,
        typer.Option("--markdown", help="A Markdown table with the command, date and machine"),
    ] = False,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV (for programs)")] = False,
) -> None:
    """Results over seeds: per recipe and evaluated level, the median, min and max of each
    reference's metric (the task's main metric where there is none), how many seeds met
    the reference, median steps and wall time, and the machines the runs trained on.

    Each run counts with its final checkpoint's latest evaluation at each level."""
    with user_errors():
        import shlex

        from memctl.report import build_report

        if markdown and csv:
            raise UserError("--markdown and --csv: choose one")
        found = build_report(paths)
        if csv:
            print(found.table.to_csv(index=False), end="")
            return
        words = ["memctl", "report", *map(str, paths)] + (["--markdown"] if markdown else [])
        if markdown:
            print(_report_markdown(shlex.join(words), found))
            return
        console.print(_report_table(shlex.join(words), found))


def _run_summaries(runs_dir: Path) -> list[dict[str, str]]:
    """``memctl runs``'s rows: each run in ``runs_dir``, and each started trial of each sweep
    there (a folder with trials.csv), named ``<sweep>/<trial>``."""
    from memctl.rundir import RunDir

    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no such directory")
    rows = []
    for path in sorted(runs_dir.iterdir()):
        if (path / "run.json").is_file():
            rows.append(RunDir(path).summary())
        elif (path / "trials.csv").is_file():
            for trial in sorted(p for p in path.iterdir() if (p / "run.json").is_file()):
                rows.append({**RunDir(trial).summary(), "name": f"{path.name}/{trial.name}"})
    return rows


@app.command("runs")
def list_runs(
    runs_dir: Annotated[Path, typer.Argument(help="Folder of runs")] = Path("runs"),
    as_json: JsonOption = False,
) -> None:
    """List runs: name, model, task, status, step, level, last loss and metric.

    Trials of a sweep in RUNS_DIR are listed as SWEEP/TRIAL once they have started (every
    trial, started or not: memctl sweep status RUNS_DIR/SWEEP)."""
    with user_errors():
        rows = _run_summaries(runs_dir)
        if as_json:
            print_json_rows(rows, numeric=("step", "level", "loss"))
            return
        if not rows:
            console.print(f"no runs in {runs_dir}")
            return
        table = Table()
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*(_fmt(v) for v in row.values()))
        console.print(table)


@app.command()
def plot(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories, or sweep folders (one line per group)")
    ],
    metric: Annotated[
        str | None,
        typer.Option("--metric", help="metrics.csv column (default: the run's main metric)"),
    ] = None,
    x: Annotated[str, typer.Option("--x", help="x axis: step, wall_s or samples")] = "step",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Figure file; its extension (.png, .pdf, .svg) sets the format "
            "(default: <first run>/plots/<metric>.png, eval_<metric>.png with --eval)",
        ),
    ] = None,
    evaluations: Annotated[
        bool,
        typer.Option(
            "--eval",
            help="Plot eval.csv's metric against step instead, one line per evaluated level",
        ),
    ] = False,
    smooth: Annotated[
        int,
        typer.Option(
            "--smooth",
            help="Moving average of each run's metric over this many logged rows (1: as logged)",
        ),
    ] = 1,
) -> None:
    """Learning curves of runs in one figure; sweep groups as median and min-max band.

    The y axis names the metric's meaning and unit, as the run's task describes it."""
    with user_errors():
        from memctl import plugins
        from memctl.viz import plot_curves

        plugins.load_for_runs(runs)
        written = plot_curves(runs, metric, x, out, smooth, evaluations)
        console.print(str(written.path), soft_wrap=True)


@app.command()
def inspect(
    run: Annotated[Path, typer.Argument(help="Run directory")],
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="last, best, or a step number (or step_N)")
    ] = "last",
    length: Annotated[
        int | None,
        typer.Option(
            "--length", help="Level of the sample: sequence length, n, ... (default: the run's)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample's generator")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the figures (default: <run>/inspect)")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="File format: png, pdf or svg")] = "png",
    device: DeviceOption = None,
) -> None:
    """Heatmaps of one sample through a checkpoint: inputs, outputs, heads, memory.

    One figure per quantity of the model's trace, over time."""
    with user_errors():
        from memctl.viz import check_format, plot_trace, trace_sample

        check_format(fmt, "--format")
        trace = trace_sample(run, checkpoint, length, seed, device)
        for written in plot_trace(trace, out if out is not None else run / "inspect", fmt):
            console.print(str(written.path), soft_wrap=True)


# -- what there is: models, tasks, recipes ---------------------------------------------


def _entry_table(entry: Any) -> Table:
    """One model's or task's settings as a table; below it the summary, and for a task its
    curriculum parameter and metrics."""
    table = Table(title=f"{entry.name}  ({entry.class_path})", title_justify="left")
    for column in ("key", "type", "default", "bounds", "description"):
        table.add_column(column, overflow="fold")
    for setting in entry.settings:
        table.add_row(setting.key, setting.type, setting.default, setting.bounds,
                      setting.description)  # fmt: skip
    notes = [entry.summary]
    if entry.level_field:
        notes.append(f"curriculum parameter: {entry.level_field}")
    if entry.metrics:
        notes.append(f"metrics: {entry.metrics[0]} (main), {', '.join(entry.metrics[1:])}")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def _print_entries(kind: str, name: str | None) -> None:
    from memctl.catalog import registry_entries
    from memctl.registry import MODELS, TASKS

    registry = {"model": MODELS, "task": TASKS}[kind]
    for entry in registry_entries(registry, name):
        console.print(_entry_table(entry))


@app.command("models")
def list_models(
    name: Annotated[
        str | None, typer.Argument(help="One model type, e.g. dnc (default: every one)")
    ] = None,
) -> None:
    """Registered models (recipe model.type) with their settings: type, default, bounds."""
    with user_errors():
        _print_entries("model", name)


@app.command("tasks")
def list_tasks(
    name: Annotated[
        str | None, typer.Argument(help="One task type, e.g. copy (default: every one)")
    ] = None,
) -> None:
    """Registered tasks (recipe task.type): settings, curriculum parameter, metrics."""
    with user_errors():
        _print_entries("task", name)


@app.command("recipes")
def list_recipes(
    directory: Annotated[Path, typer.Argument(help="Folder of recipe files")] = Path("recipes"),
) -> None:
    """Recipe and sweep files (*.yaml) of a folder, each with its first comment line."""
    with user_errors():
        from memctl.catalog import recipe_files

        files = recipe_files(directory)
        if not files:
            console.print(f"no recipes in {directory}")
            return
        table = Table()
        table.add_column("recipe", no_wrap=True)
        table.add_column("what", overflow="fold")
        for item in files:
            table.add_row(str(item.path), item.summary)
        console.print(table)


def main() -> None:
    app()


# -- sweeps ----------------------------------------------------------------------------


class SweepGroup(typer.core.TyperGroup):
    """``memctl sweep FILE ...`` is ``memctl sweep run FILE ...``: a first argument that is
    no subcommand (and no option) names the sweep to run."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(
    cls=SweepGroup,
    no_args_is_help=True,
    help="Sweeps over settings and seeds: `memctl sweep FILE` runs one (same as "
    "`memctl sweep run FILE`); `status` and `summary` follow and summarise it.",
)
app.add_typer(sweep_app, name="sweep")

STATUS_STYLES = {"finished": "green", "running": "cyan", "queued": "blue", "pending": "dim",
                 "interrupted": "yellow", "failed": "red"}  # fmt: skip


def _trials_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("trial", "status", "step", "metric", "attempts", "job", "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = STATUS_STYLES.get(row["status"], "")
        metric = f"{row['metric']}={_fmt_cell(row['value'])}" if row.get("value") != "" else "-"
        table.add_row(row["trial"], f"[{style}]{row['status']}[/]", str(row["step"]), metric,
                      str(row["attempts"]), str(row["job_id"]), str(row["error"])[:80])  # fmt: skip
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    table.caption = ", ".join(f"{n} {status}" for status, n in counts.items())
    return table


def _fmt_cell(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if number.is_integer() else f"{number:.4g}"


def _frame_table(frame: Any, title: str) -> Table:
    """A summary for people: ``median [min, max]`` cells; ``--csv`` has every column."""
    import pandas as pd

    frame = frame.copy()
    for stat in ("final", "eval"):
        if f"{stat}_median" in frame:
            spread = [f"{_fmt_cell(m)} [{_fmt_cell(lo)}, {_fmt_cell(hi)}]" for m, lo, hi in
                      zip(frame[f"{stat}_median"], frame[f"{stat}_min"], frame[f"{stat}_max"],
                          strict=True)]  # fmt: skip
            frame = frame.drop(columns=[f"{stat}_min", f"{stat}_max"])
            frame[f"{stat}_median"] = spread
    frame = frame.rename(columns={"level_median": "level median",
                                  "final_median": "final median [min, max]",
                                  "best_median": "best median",
                                  "eval_median": "eval median [min, max]"})  # fmt: skip
    table = Table(title=title)
    for column in frame.columns:
        if column != "metric":
            numeric = pd.api.types.is_numeric_dtype(frame[column])
            table.add_column(str(column), justify="right" if numeric else "left")
    for values in frame.drop(columns="metric").itertuples(index=False):
        table.add_row(*(_fmt_cell(v) for v in values))
    return table


def _key_values(options: list[str] | None, flag: str) -> dict[str, str]:
    pairs = {}
    for text in options or []:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {text!r}: expected KEY=VALUE, e.g. {flag} account=lab")
        pairs[key] = value
    return pairs


@sweep_app.command("run")
def sweep_run(
    file: Annotated[Path, typer.Argument(help="Sweep file (YAML), or a sweep folder to continue")],
    executor: Annotated[
        str | None, typer.Option("--executor", help="local or slurm (default: the sweep file's)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Local trials at once")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the trials; write and run nothing")
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Sweep name (default: the file's)")
    ] = None,
    runs_dir: RunsDirOption = Path("runs"),
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Run failed trials again")
    ] = False,
    partition: Annotated[str | None, typer.Option("--partition", help="SLURM partition")] = None,
    time_min: Annotated[
        int | None, typer.Option("--time", min=1, help="SLURM time limit per trial, minutes")
    ] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", min=1, help="SLURM CPUs per trial")] = None,
    gpus: Annotated[int | None, typer.Option("--gpus", min=0, help="SLURM GPUs per trial")] = None,
    mem_gb: Annotated[
        float | None, typer.Option("--mem", help="SLURM memory per trial, GB")
    ] = None,
    parallelism: Annotated[
        int | None, typer.Option("--parallelism", min=1, help="SLURM array tasks at once")
    ] = None,
    sbatch: Annotated[
        list[str] | None,
        typer.Option("--sbatch", help="Extra sbatch option KEY=VALUE (repeatable)"),
    ] = None,
) -> None:
    """Run a sweep, or continue it: finished trials are skipped, interrupted ones resumed."""
    with user_errors():
        from memctl.sweep import configure, make_executor, plan_sweep, run_sweep

        plan = plan_sweep(file, runs_dir, name)
        flags = {"partition": partition, "time_min": time_min, "cpus_per_task": cpus,
                 "gpus_per_node": gpus, "mem_gb": mem_gb,
                 "array_parallelism": parallelism}  # fmt: skip
        slurm = {key: value for key, value in flags.items() if value is not None}
        extra = _key_values(sbatch, "--sbatch")
        if extra:
            slurm["sbatch"] = {**plan.sweep.slurm.sbatch, **extra}
        configure(plan, executor, workers, slurm)
        if dry_run:
            table = Table(title=f"{plan.name}: {len(plan.trials)} trials ({plan.sweep_dir})")
            table.add_column("trial")
            keys = list(plan.trials[0].params) if plan.trials else []
            for key in keys:
                table.add_column(key, justify="right")
            for trial in plan.trials:
                table.add_row(trial.name, *(_fmt_cell(trial.params[k]) for k in keys))
            console.print(table)
            console.print(f"dry run: nothing written or submitted ({plan.sweep.executor})")
            return
        from rich.live import Live

        runner = make_executor(plan)
        title = f"{plan.name} ({runner.kind}): {plan.sweep_dir}"
        live = Live(console=console, auto_refresh=False) if console.is_terminal else None
        shown: dict[str, str] = {}

        def show(rows: list[dict[str, Any]]) -> None:
            if live is not None:
                live.update(_trials_table(rows, title), refresh=True)
                return
            for row in rows:
                if shown.get(row["trial"]) != row["status"]:
                    shown[row["trial"]] = row["status"]
                    print(f"{row['trial']}: {row['status']} (step {row['step']})", flush=True)

        try:
            if live is not None:
                live.start()
            rows = run_sweep(plan, runner, retry_failed, on_update=show)
        except KeyboardInterrupt:
            if live is not None:
                live.stop()
            if runner.kind == "slurm":
                console.print(f"detached; jobs keep running: memctl sweep status {plan.sweep_dir}")
                raise typer.Exit(130) from None
            console.print(f"interrupted; trials checkpointed. Continue with: memctl sweep {file}")
            raise typer.Exit(130) from None
        if live is not None:
            live.stop()
        else:
            console.print(_trials_table(rows, title))
        failed = [row["trial"] for row in rows if row["status"] == "failed"]
        if failed:
            console.print(f"{len(failed)} failed (errors in trials.csv and <trial>.log); "
                          f"retry with: memctl sweep {file} --retry-failed")  # fmt: skip
            raise typer.Exit(1)


@sweep_app.command("status")
def sweep_status_command(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep folder, e.g. runs/fw_sweep")],
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV (for programs)")] = False,
) -> None:
    """Every trial of a sweep: status, step, latest metric, attempts, job, error."""
    with user_errors():
        import pandas as pd

        from memctl.sweep import sweep_status

        rows = sweep_status(sweep_dir)
        if csv:
            print(pd.DataFrame(rows).to_csv(index=False), end="")
            return
        console.print(_trials_table(rows, str(sweep_dir)))


@sweep_app.command("summary")
def sweep_summary(
    sweep_dir: Annotated[Path, typer.Argument(help="Sweep folder, e.g. runs/fw_sweep")],
    metric: Annotated[
        str | None, typer.Option("--metric", help="metrics.csv column (default: the task's)")
    ] = None,
    group_by: Annotated[
        list[str] | None,
        typer.Option(
            "--group-by",
            help="Recipe key to group by, e.g. model.type (repeatable; "
            "default: every varied setting but the seed)",
        ),
    ] = None,
    trials: Annotated[
        bool, typer.Option("--trials", help="One row per trial instead of per group")
    ] = False,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV (for programs)")] = False,
) -> None:
    """Final and best metric per trial, and per group the median and spread over seeds."""
    with user_errors():
        from memctl.sweep import summarise, trial_table

        keys = [k for text in group_by or [] for k in text.split(",") if k] or None
        if trials:
            frame = trial_table(sweep_dir, metric, keys)
        else:
            frame = summarise(sweep_dir, metric, keys)
        if csv:
            print(frame.to_csv(index=False), end="")
            return
        if frame.empty:
            console.print(f"no trials in {sweep_dir}")
            return
        console.print(_frame_table(frame, f"{sweep_dir.name}: {frame['metric'].iloc[0]}"))
