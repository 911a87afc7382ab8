"""Learning curves and memory heatmaps as PNG, PDF or SVG files, for ``memctl plot`` and
``inspect``.

matplotlib (the ``plot`` extra) is imported inside the functions that draw, and only its
object-oriented API is used (``Figure``, no pyplot): no window, no global state, the Agg
renderer. Every file is written atomically, in the format its extension names, and
reported as a ``Written`` (its path and the number of data panels, colour bars not
counted).

Curves read ``metrics.csv`` (or ``eval.csv``) with pandas; the y axis names the metric's
meaning and unit from the task's ``metric_descriptions``. A run that is still being
written may end in a torn line; only complete rows are plotted. Heatmaps come from a
model's optional ``trace`` (the contract in ``memctl/models/base.py``): one figure per
quantity, titled with the papers' symbols (w^r, w^w, M, u, a, L, ||A(t)||_F).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from memctl.errors import UserError
from memctl.rundir import RunDir, atomic_write

INSTALL_HINT = "matplotlib is not installed: pip install 'memctl[plot]'"
X_AXES = {"step": "training step", "wall_s": "wall-clock seconds", "samples": "training sequences"}
# A y axis whose positive values span more than this ratio is drawn on a log scale.
LOG_SCALE_RATIO = 100.0
DPI = 100
# The file formats written; a file's name ends in one of them.
FORMATS = ("png", "pdf", "svg")
# Weightings over more slots than this are cropped to the slots some head used: an NTM
# on copy touches ~20 of its 128 slots, and the rest would squash them into a few pixels.
CROP_SLOTS_ABOVE = 32
# A slot counts as used when some head gives it at least this weight at some step.
USED_WEIGHT = 0.01


@dataclass(frozen=True)
class Written:
    """A figure written to ``path``: its data panels (colour bars not counted) and the
    entries of its legends."""

    path: Path
    panels: int
    legend: tuple[str, ...] = ()


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return Figure


def check_format(fmt: str, flag: str) -> str:
    """``fmt`` lower-cased if it is one of FORMATS, else a UserError naming ``flag``."""
    if fmt.lower() not in FORMATS:
        raise UserError(f"{flag} {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt.lower()


def format_of(path: Path) -> str:
    """The format a file name asks for: its extension, one of FORMATS."""
    if path.suffix.lower().lstrip(".") not in FORMATS:
        raise UserError(f"--out {path}: expected a file name ending in .png, .pdf or .svg")
    return path.suffix.lower().lstrip(".")


def _save(figure: Any, path: Path) -> Written:
    """Write ``figure`` atomically in the format ``path``'s extension names."""
    fmt = format_of(path)
    panels = [axes for axes in figure.axes if axes.get_label() != "<colorbar>"]
    legend = tuple(
        text.get_text()
        for axes in panels
        if axes.get_legend()
        for text in axes.get_legend().get_texts()
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=DPI)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue())
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return Written(path, len(panels), legend)


# -- learning curves ------------------------------------------------------------------


# When each log file gets its rows, for the error that a file has none yet.
WRITTEN_EVERY = {
    "metrics.csv": "one is written every train.log_every steps",
    "eval.csv": "rows are written every train.eval_every steps, at the end, and by memctl eval",
}


def read_metrics(path: Path) -> pd.DataFrame:
    """The complete rows of a metrics.csv or eval.csv; a torn last line (a run still
    writing) is left out. A missing file or one without a complete row is a UserError
    naming it."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (has the run started?)")
    lines = path.read_text().splitlines(keepends=True)
    if not lines or not lines[0].endswith("\n"):
        raise UserError(f"{path}: empty file, no header yet (has the run started?)")
    width = len(lines[0].split(","))
    rows = [line for line in lines[1:] if line.endswith("\n") and len(line.split(",")) == width]
    if not rows:
        raise UserError(f"{path}: no logged rows yet ({WRITTEN_EVERY.get(path.name, '')})")
    try:
        return pd.read_csv(io.StringIO(lines[0] + "".join(rows)))
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{path}: unreadable CSV ({exc})") from None


@dataclass
class Series:
    """One line of a curves figure: a run, or a sweep group (its seeds' runs)."""

    label: str
    runs: list[Path]
    from_sweep: bool
    frames: list[pd.DataFrame] = field(default_factory=list)


def _runs_and_groups(paths: list[Path]) -> list[Series]:
    """Each run directory is one series; a sweep folder gives one series per group of
    trials that differ only in their seed."""
    from memctl.sweep import labels, read_trials_csv, varied_keys

    series = []
    for path in paths:
        if (path / "run.json").is_file():
            series.append(Series(path.name, [path], from_sweep=False))
        elif (path / "trials.csv").is_file():
            keys = varied_keys(path)
            short = labels(keys)
            groups: dict[tuple[str, ...], list[Path]] = {}
            for row in read_trials_csv(path):
                groups.setdefault(tuple(row[k] for k in keys), []).append(path / row["trial"])
            for values, runs in groups.items():
                parts = [f"{short[k]}={v}" for k, v in zip(keys, values, strict=True)]
                series.append(Series(", ".join(parts) or path.name, runs, from_sweep=True))
        elif path.is_dir():
            raise UserError(f"{path}: not a memctl run or sweep (no run.json or trials.csv)")
        else:
            raise UserError(f"{path}: no such run directory")
    return series


def _primary_metric(series: list[Series]) -> str:
    for run in (run for s in series for run in s.runs):
        if (run / "run.json").is_file():
            metric = RunDir(run).read_info().get("metric")
            if isinstance(metric, str):
                return metric
    raise UserError(f"{series[0].runs[0]}: run.json names no metric; give --metric")


def _load(series: list[Series], metric: str, x: str, log: str) -> list[Series]:
    """Read every run's ``log`` (metrics.csv or eval.csv); sweep trials that have logged
    nothing yet are skipped, a run given on its own must have rows."""
    loaded = []
    for item in series:
        for run in item.runs:
            path = run / log
            try:
                frame = read_metrics(path)
            except UserError:
                if not item.from_sweep:
                    raise
                continue
            missing = [c for c in (metric, x, "level") if c not in frame.columns]
            if missing:
                flag = "--metric" if metric in missing else "--x"
                columns = ", ".join(frame.columns)
                raise UserError(f"{flag} {missing[0]}: not a column of {path} ({columns})")
            item.frames.append(frame)
        if item.frames:
            loaded.append(item)
    if not loaded:
        raise UserError(f"{series[0].runs[0].parent}: no trial has logged rows yet")
    return loaded


def wants_log_scale(values: pd.Series) -> bool:
    """Whether the positive ``values`` span more than LOG_SCALE_RATIO (two decades)."""
    positive = values[values > 0]
    return bool(len(positive)) and positive.max() / positive.min() > LOG_SCALE_RATIO


def _aligned(frames: list[pd.DataFrame], column: str) -> pd.DataFrame:
    """``column`` of every frame side by side, one row per logged step."""
    return pd.concat([f.set_index("step")[column] for f in frames], axis=1, keys=range(len(frames)))


def metric_label(series: list[Series], metric: str) -> str:
    """The y axis label: the metric and, where the first started run's task describes it,
    its meaning and unit (``bit_errors (wrong bits per sequence)``)."""
    import memctl.tasks  # noqa: F401  (registers the tasks)
    from memctl.registry import task_class

    run = next(run for item in series for run in item.runs if (run / "run.json").is_file())
    recipe = RunDir(run).recipe_file
    section = (yaml.safe_load(recipe.read_text()) or {}).get("task") if recipe.is_file() else None
    if section is None:  # no task in a recipe: the type run.json names, at its defaults
        section = {"type": RunDir(run).read_info().get("task")}
    found = task_class(section)
    description = found.metric_descriptions.get(metric) if found is not None else None
    return f"{metric} ({description})" if description else metric


def smoothed(frame: pd.DataFrame, column: str, rows: int) -> pd.DataFrame:
    """``frame`` with ``column`` replaced by its moving average over the last ``rows``
    rows (fewer at the start), so that a noisy curve shows its trend."""
    if rows == 1:
        return frame
    return frame.assign(**{column: frame[column].rolling(rows, min_periods=1).mean()})


@dataclass
class Line:
    """One drawn line: ``table`` holds the metric per step (index), one column per seed."""

    label: str
    table: pd.DataFrame
    xs: Any
    level: pd.Series | None = None


def _training_lines(item: Series, metric: str, x: str, smooth: int) -> list[Line]:
    table = _aligned([smoothed(f, metric, smooth) for f in item.frames], metric)
    xs = table.index if x == "step" else _aligned(item.frames, x).median(axis=1)
    level = _aligned(item.frames, "level").median(axis=1).round()
    return [Line(item.label, table, xs.to_numpy(), level)]


def _eval_lines(item: Series, metric: str, smooth: int) -> list[Line]:
    """One line per evaluated level; a step evaluated twice (memctl eval after the run's
    own evaluation) counts with its latest row."""
    lines = []
    for level in sorted(set().union(*(f["level"].unique() for f in item.frames))):
        rows = [f[f["level"] == level].drop_duplicates("step", keep="last") for f in item.frames]
        frames = [smoothed(f.sort_values("step"), metric, smooth) for f in rows if len(f)]
        table = _aligned(frames, metric)
        lines.append(Line(f"{item.label}, level {level}", table, table.index.to_numpy()))
    return lines


def plot_curves(
    paths: list[Path],
    metric: str | None,
    x: str,
    out: Path | None,
    smooth: int = 1,
    evaluations: bool = False,
) -> Written:
    """One figure, one line per run or per sweep group (the median over its seeds with a
    min-max band); dotted vertical lines where the curriculum level changes. With
    ``evaluations``, eval.csv's metric instead, one line per evaluated level. ``smooth``:
    each run's metric as a moving average over that many logged rows."""
    if x not in X_AXES:
        raise UserError(f"--x {x!r}: expected one of {', '.join(X_AXES)}")
    if evaluations and x != "step":
        raise UserError(f"--x {x!r}: eval.csv is plotted against step only")
    if smooth < 1:
        raise UserError(f"--smooth {smooth}: expected a number of rows, at least 1")
    if out is not None:
        format_of(out)
    series = _runs_and_groups(paths)
    metric = metric or _primary_metric(series)
    series = _load(series, metric, x, "eval.csv" if evaluations else "metrics.csv")
    lines = [
        line
        for item in series
        for line in (
            _eval_lines(item, metric, smooth)
            if evaluations
            else _training_lines(item, metric, x, smooth)
        )
    ]
    Figure = _figure_class()
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.add_subplot()
    values = []
    level_changes = False
    for index, line in enumerate(lines):
        colour = f"C{index % 10}"
        median = line.table.median(axis=1)
        seeds = line.table.shape[1]
        label = line.label if seeds == 1 else f"{line.label} (median of {seeds} seeds)"
        # One logged row is no line: it is drawn as a point.
        marker = "o" if len(line.xs) == 1 else None
        axes.plot(line.xs, median, color=colour, label=label, linewidth=1.4, marker=marker)
        values.append(median)
        if seeds > 1:
            low, high = line.table.min(axis=1), line.table.max(axis=1)
            axes.fill_between(line.xs, low, high, color=colour, alpha=0.2, linewidth=0)
            values += [low, high]
        if line.level is not None:
            changed = (line.level.diff().fillna(0) != 0).to_numpy()
            for position in line.xs[changed]:
                axes.axvline(position, color=colour, linestyle=":", linewidth=1.0, alpha=0.8)
                level_changes = True
    if wants_log_scale(pd.concat(values)):
        axes.set_yscale("log", nonpositive="mask")
    if level_changes:
        axes.plot([], [], color="grey", linestyle=":", label="curriculum level change")
    axes.set_xlabel(X_AXES[x])
    axes.set_ylabel(metric_label(series, metric))
    title = f"{'evaluation ' if evaluations else ''}{metric} against {X_AXES[x]}"
    axes.set_title(title + (f", moving average of {smooth} rows" if smooth > 1 else ""))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if out is None:
        name = metric if x == "step" else f"{metric}_{x}"
        out = paths[0] / "plots" / f"{'eval_' if evaluations else ''}{name}.png"
    return _save(figure, out)


# -- inspect: one sample through a checkpoint ------------------------------------------


@dataclass
class SampleTrace:
    """One sequence through a model, batch dimension removed, on the CPU.

    inputs ``[T, I]``, targets ``[T, O]``, outputs ``[T, O]`` (as the task reads them,
    named by ``output_name``), and the model's trace quantities (time first).
    """

    run: str
    step: int
    level: int
    inputs: torch.Tensor
    targets: torch.Tensor
    outputs: torch.Tensor
    output_name: str
    quantities: dict[str, torch.Tensor]


def trace_sample(
    path: Path, which: str, level: int | None, seed: int, device: str | None = None
) -> SampleTrace:
    """Load a checkpoint as ``memctl eval`` does, draw one sequence at ``level`` (default:
    the curriculum's level in the checkpoint) from a generator seeded with ``seed``, and
    run the model's ``trace`` (or plain forward) on it in eval mode without gradients."""
    from memctl.lifecycle import load_run

    loaded = load_run(path, which, device)
    run, trainer = loaded.run, loaded.trainer
    assert trainer is not None
    task, model = trainer.task, trainer.model
    level = trainer.curriculum.level if level is None else level
    if level < task.min_level:
        raise UserError(f"--length {level}: below the task's minimum {task.min_level}")
    generator = torch.Generator().manual_seed(seed)
    batch = task.sample(1, generator, max_level=level, min_level=level).to(trainer.device)
    model.eval()
    with torch.no_grad():
        trace = getattr(model, "trace", None)
        if callable(trace):
            logits, quantities = trace(batch.inputs)
        else:
            logits, _ = model(batch.inputs)
            quantities = {}
        outputs, output_name = task.output_view(logits)
    first = {name: value[:, 0].float().cpu() for name, value in quantities.items()}
    return SampleTrace(
        run=run.name,
        step=trainer.step,
        level=level,
        inputs=batch.inputs[:, 0].float().cpu(),
        targets=batch.targets[:, 0].float().cpu(),
        outputs=outputs[:, 0].float().cpu(),
        output_name=output_name,
        quantities=first,
    )


# name -> (title with the paper's symbol, what a row of the heatmap is)
QUANTITIES = {
    "read_weights": (r"read weighting $w^r_t$", "memory slot $i$"),
    "write_weights": (r"write weighting $w^w_t$", "memory slot $i$"),
    "allocation": (r"allocation weighting $a_t$", "memory slot $i$"),
    "usage": (r"usage $u_t$", "memory slot $i$"),
    "precedence": (r"precedence $p_t$", "memory slot $i$"),
    "leaf_attention": (r"leaf attention $a_t$", "leaf $i$"),
    "hidden": (r"hidden state $h_t$", "unit"),
    "fast_weight_norm": (r"fast-weight norm $\|A(t)\|_F$", r"$\|A(t)\|_F$"),
    "memory": (r"memory $M$", "memory slot $i$"),
    "link": (r"temporal link matrix $L_T$", r"slot $i$ (written after $j$)"),
}
WEIGHTINGS = ("read_weights", "write_weights", "allocation")
TIME = "time step $t$"


def used_slots(*weightings: torch.Tensor) -> list[int] | None:
    """The slots to show for ``weightings [T, K, N]``, in order: the shortest circular run
    of slots holding every slot some head gave weight, two more on each side. Circular,
    since shifts wrap around (an NTM head at slot 0 leaks onto slot N-1). None (show all)
    for a memory of at most CROP_SLOTS_ABOVE slots or when less than a quarter would go."""
    slots = weightings[0].shape[-1]
    peak = torch.stack([w.amax(dim=(0, 1)) for w in weightings]).amax(0)
    used = torch.nonzero(peak >= USED_WEIGHT).flatten().tolist()
    if slots <= CROP_SLOTS_ABOVE or not used:
        return None
    # The largest circular gap between used slots is what the window leaves out.
    gaps = [((used[(k + 1) % len(used)] - used[k]) % slots or slots, k) for k in range(len(used))]
    gap, before = max(gaps)
    length = slots - gap + 1 + 4
    if length > 3 * slots // 4:
        return None
    start = used[(before + 1) % len(used)] - 2
    return [(start + row) % slots for row in range(length)]


def _heatmap(
    figure: Any,
    axes: Any,
    data: torch.Tensor,
    title: str,
    xlabel: str,
    ylabel: str,
    rows: list[int] | None = None,
    unit_range: bool = False,
    bound: float | None = None,
    slots: list[int] | None = None,
) -> None:
    """``data [X, Y]`` with X along the horizontal axis, row 0 at the top; ``rows``
    selects and orders the Y shown (ticks name the original indices, or with ``slots``
    the memory slot each Y stands for: a sparse memory's trace). Colours: 0..1 for
    weightings and probabilities (``unit_range``), else -bound..bound (default: the
    data's largest magnitude)."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator

    shown_rows = rows if rows is not None else list(range(data.shape[1]))
    image = data[:, shown_rows].T.numpy()
    if unit_range:
        limits = {"vmin": 0.0, "vmax": 1.0, "cmap": "viridis"}
    else:
        bound = max(float(data.abs().max()) if bound is None else bound, 1e-12)
        limits = {"vmin": -bound, "vmax": bound, "cmap": "RdBu_r"}
    extent = (-0.5, data.shape[0] - 0.5, len(shown_rows) - 0.5, -0.5)
    shown = axes.imshow(image, aspect="auto", interpolation="nearest", extent=extent, **limits)
    figure.colorbar(shown, ax=axes, fraction=0.05, pad=0.02)
    axes.set_title(title, fontsize="medium")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    if slots is not None:  # evenly spaced ticks naming the slots the rows stand for
        ticks = MaxNLocator(nbins=8, integer=True).tick_values(0, len(shown_rows) - 1)
        every = max(int(ticks[1] - ticks[0]), 1)
        positions = list(range(0, len(shown_rows), every))
        axes.yaxis.set_major_locator(FixedLocator(positions))
        names = [str(slots[shown_rows[row]]) for row in positions]
        axes.yaxis.set_major_formatter(FixedFormatter(names))
    elif rows is not None:  # ticks at round slot numbers, wherever the window starts
        ticks = MaxNLocator(nbins=8, integer=True).tick_values(0, len(rows) - 1)
        every = max(int(ticks[1] - ticks[0]), 1)
        positions = [row for row, slot in enumerate(rows) if slot % every == 0]
        axes.yaxis.set_major_locator(FixedLocator(positions))
        axes.yaxis.set_major_formatter(FixedFormatter([str(rows[row]) for row in positions]))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)


def _touched_slots(trace: SampleTrace) -> list[int] | None:
    """The slot indices a sparse memory's trace covers (its ``slots`` quantity), if any."""
    slots = trace.quantities.get("slots")
    return None if slots is None else [int(slot) for slot in slots[0]]


def _crop_note(rows: list[int] | None, slots: int) -> str:
    return "" if rows is None else f" ({rows[0]} to {rows[-1]} of {slots})"


def _headline(trace: SampleTrace) -> str:
    return f"{trace.run}, step {trace.step}, level {trace.level}"


def _plot_io(Figure: Any, trace: SampleTrace) -> Any:
    figure = Figure(figsize=(7, 6.5), layout="constrained")
    panels = figure.subplots(3, 1, sharex=True)
    for axes, data, title in (
        (panels[0], trace.inputs, r"input $x_t$"),
        (panels[1], trace.targets, "target"),
        (panels[2], trace.outputs, trace.output_name),
    ):
        bits = bool(data.min() >= 0 and data.max() <= 1)  # else real values (adding, min)
        _heatmap(figure, axes, data, title, "", "channel", unit_range=bits)
    panels[2].set_xlabel(TIME)
    figure.suptitle(_headline(trace))
    return figure


def _plot_heads(Figure: Any, trace: SampleTrace, names: tuple[str, ...]) -> Any:
    """Every head of the weightings ``names`` side by side (time along x, slots down)."""
    tensors = [trace.quantities[name] for name in names]
    rows = used_slots(*tensors)
    slots = tensors[0].shape[-1]
    touched = _touched_slots(trace)
    panels = [
        (name, head) for name, t in zip(names, tensors, strict=True) for head in range(t.shape[1])
    ]
    figure = Figure(figsize=(3.6 * len(panels) + 0.6, 4.2), layout="constrained")
    grid = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (name, head) in zip(grid, panels, strict=True):
        title = QUANTITIES[name][0]
        if trace.quantities[name].shape[1] > 1:
            title += f", head {head + 1}"
        ylabel = QUANTITIES[name][1] + ("" if touched else _crop_note(rows, slots))
        data = trace.quantities[name][:, head]
        _heatmap(figure, axes, data, title, TIME, ylabel, rows, True, slots=touched)
    figure.suptitle(_headline(trace))
    return figure


def _plot_quantity(Figure: Any, trace: SampleTrace, name: str) -> Any:
    from matplotlib.ticker import MaxNLocator

    data = trace.quantities[name]
    title, ylabel = QUANTITIES.get(name, (name, "index"))
    if name in WEIGHTINGS:
        return _plot_heads(Figure, trace, (name,))
    if name == "memory":
        figure = Figure(figsize=(7, 5), layout="constrained")
        before, after = figure.subplots(1, 2)
        steps = data.shape[0] - 1
        bound = float(data[[0, -1]].abs().max())  # one colour scale for both
        for axes, matrix, label in ((before, data[0], "$M_0$ (before)"),
                                    (after, data[-1], f"$M_{{{steps}}}$ (after)")):  # fmt: skip
            _heatmap(
                figure,
                axes,
                matrix.T,
                f"memory {label}",
                "word element $j$",
                ylabel,
                bound=bound,
                slots=_touched_slots(trace),
            )
        figure.suptitle(_headline(trace))
        return figure
    if name == "link":
        figure = Figure(figsize=(5.5, 5), layout="constrained")
        axes = figure.add_subplot()
        _heatmap(figure, axes, data[-1].T, title, r"slot $j$", ylabel, unit_range=True)
        figure.suptitle(_headline(trace))
        return figure
    if data.dim() == 1:
        figure = Figure(figsize=(7, 3.5), layout="constrained")
        axes = figure.add_subplot()
        axes.plot(range(len(data)), data.numpy(), marker=".")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_title(title)
        axes.set_xlabel(TIME)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        figure.suptitle(_headline(trace))
        return figure
    if data.dim() == 2:
        figure = Figure(figsize=(7, 4), layout="constrained")
        axes = figure.add_subplot()
        bounded = bool(data.min() >= 0 and data.max() <= 1)
        slots = _touched_slots(trace) if name == "usage" else None
        _heatmap(figure, axes, data, title, TIME, ylabel, unit_range=bounded, slots=slots)
        figure.suptitle(_headline(trace))
        return figure
    raise ValueError(f"trace quantity {name!r}: unexpected shape {tuple(data.shape)}")


def plot_trace(trace: SampleTrace, out_dir: Path, fmt: str = "png") -> list[Written]:
    """``io.<fmt>`` (input, target, output), one file per trace quantity, and
    ``heads.<fmt>`` (write and read weightings together, as the NTM paper's figures) when
    both exist; ``fmt`` is one of FORMATS."""
    fmt = check_format(fmt, "--format")
    Figure = _figure_class()
    written = [_save(_plot_io(Figure, trace), out_dir / f"io.{fmt}")]
    for name in trace.quantities:
        if name == "slots":  # which slots the others' rows are, not a figure of its own
            continue
        written.append(_save(_plot_quantity(Figure, trace, name), out_dir / f"{name}.{fmt}"))
    if {"read_weights", "write_weights"} <= trace.quantities.keys():
        figure = _plot_heads(Figure, trace, ("write_weights", "read_weights"))
        written.append(_save(figure, out_dir / f"heads.{fmt}"))
    return written
