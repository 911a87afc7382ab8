"""Sweeps: a sweep file expanded into resolved trial recipes, run by an executor, summarised.

A sweep file is YAML (loaded safely) and validated like a recipe, with one-line errors::

    name: fw_sizes                 # default: the file's stem
    base: fw_assoc.yaml            # the recipe every trial starts from, relative to this file
    set: {train.steps: 2000}       # dotted keys fixed for every trial
    grid:                          # dotted keys to lists: every combination
      model.type: [rnn_ln_fw, lstm]
      model.hidden: [20, 50]
    random:                        # dotted keys to distributions, drawn ``trials`` times
      train.optimizer.lr: {loguniform: [1.0e-4, 1.0e-2]}   # also uniform, randint, choice
    trials: 4
    seed: 0                        # seeds the random draws
    seeds: [0, 1, 2]               # recipe seeds, crossed with everything else
    executor: local                # or slurm
    workers: 2                     # local worker processes
    slurm: {partition: gpu, time_min: 120, cpus_per_task: 4, gpus_per_node: 1, mem_gb: 16,
            array_parallelism: 8, sbatch: {account: lab}, setup: ["module load cuda"]}

The random draws are made once and shared by every grid point (paired comparisons).
Setting a section's ``type`` (``model.type: lstm``) starts that section from the new type's
defaults plus the trial's own settings for it; the base recipe's other keys there are dropped.

Trial names are deterministic and readable: ``<sweep>-<label>=<value>-...-seed=<n>``, the
label being a key's last part (its section for ``type``: ``model=lstm``), ``r<i>`` marking
the i-th random draw, values sanitised so that a name cannot leave the sweep folder.

``runs/<sweep>/``::

    sweep.yaml              the sweep as validated, base recipe path made absolute
    trials.csv              one row per trial: status, step, latest metric, attempts, job, error,
                            then the trial's varied settings
    recipes/<trial>.yaml    each trial's resolved recipe
    <trial>/                its run directory (``memctl train ... --runs-dir runs/<sweep>``)
    <trial>.log             its output, every attempt appended
    slurm/                  submitit's files (SLURM executor only)
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import math
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import Field, field_validator, model_validator

from memctl import plugins
from memctl.errors import UserError
from memctl.executors import (
    LocalExecutor,
    SlurmExecutor,
    SlurmSettings,
    TrialLaunch,
    TrialState,
    squeue_states,
)
from memctl.recipe import (
    NAME_PATTERN,
    Recipe,
    Section,
    _validate,
    apply_overrides,
    key_suggestion,
    parse_override,
    read_yaml,
    validate_recipe,
)
from memctl.registry import TASKS, task_class
from memctl.rundir import RunDir, atomic_write

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None}
TRIAL_COLUMNS = ["trial", "status", "step", "metric", "value", "attempts", "job_id", "error"]
ACTIVE = ("queued", "running")
MAX_NAME = 128
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SlurmSection(Section):
    partition: str | None = None
    time_min: int = Field(60, ge=1, description="time limit of each array task, minutes")
    cpus_per_task: int = Field(1, ge=1, description="also the trial's torch threads")
    gpus_per_node: int = Field(0, ge=0)
    mem_gb: float | None = Field(None, gt=0)
    array_parallelism: int = Field(16, ge=1, description="array tasks running at once")
    signal_delay_s: int = Field(90, ge=1, description="SIGUSR2 this long before the limit")
    sbatch: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="extra sbatch options, e.g. {account: lab}"
    )
    setup: list[str] = Field(default_factory=list, description="shell lines run before the task")

    @model_validator(mode="after")
    def _warning_before_limit(self) -> SlurmSection:
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(
                f"signal_delay_s ({self.signal_delay_s}) must be shorter than time_min "
                f"({self.time_min} min): the checkpoint warning would come at the start"
            )
        return self

    def settings(self) -> SlurmSettings:
        data = self.model_dump()
        data["sbatch"] = tuple((k, str(v)) for k, v in self.sbatch.items())
        data["setup"] = tuple(self.setup)
        return SlurmSettings(**data)


def _check_keys(keys: Any) -> Any:
    for key in keys:
        if not KEY_PATTERN.match(str(key)):
            raise ValueError(f"{key!r} is not a dotted key such as train.optimizer.lr")
    return keys


class SweepFile(Section):
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: the file's stem")
    base: str = Field(description="recipe file, relative to the sweep file")
    set: dict[str, Any] = Field(default_factory=dict, description="fixed dotted keys")
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    random: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    trials: int = Field(1, ge=1, description="random draws")
    seed: int = Field(0, description="seeds the random draws")
    seeds: list[int] = Field(default_factory=list)
    executor: Literal["local", "slurm"] = "local"
    workers: int = Field(1, ge=1)
    slurm: SlurmSection = SlurmSection()

    @field_validator("set", "grid", "random")
    @classmethod
    def _dotted_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_keys(value)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"{key}: expected a non-empty list of values")
        return value

    @field_validator("random")
    @classmethod
    def _distributions(cls, value: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
        expected = "one of {uniform: [low, high]}, {loguniform: [low, high]}, " + (
            "{randint: [low, high]}, {choice: [a, b, ...]}"
        )
        for key, spec in value.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: expected {expected}")
            kind, args = next(iter(spec.items()))
            arity = DISTRIBUTIONS[kind]
            if arity is None:
                if not args:
                    raise ValueError(f"{key}: choice needs at least one value")
                continue
            if len(args) != arity:
                raise ValueError(f"{key}: {kind} needs [low, high]")
            try:
                low, high = (float(a) for a in args)
            except (TypeError, ValueError):
                raise ValueError(f"{key}: {kind} bounds must be numbers") from None
            if low > high or (kind == "loguniform" and low <= 0):
                raise ValueError(f"{key}: {kind} needs 0 < low <= high" if kind == "loguniform"
                                 else f"{key}: {kind} needs low <= high")  # fmt: skip
        return value


def draw(spec: dict[str, list[Any]], rng: random.Random) -> Any:
    """One value from a validated distribution ``{kind: args}``."""
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return args[rng.randrange(len(args))]
    low, high = float(args[0]), float(args[1])
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randint(math.ceil(low), math.floor(high))


@dataclass
class PlannedTrial:
    name: str
    params: dict[str, Any]
    recipe: Recipe


@dataclass
class Plan:
    """A validated sweep: its settings, folder and resolved trials."""

    name: str
    sweep: SweepFile
    source: Path
    base: Path
    sweep_dir: Path
    trials: list[PlannedTrial] = field(default_factory=list)

    def launches(self) -> list[TrialLaunch]:
        recipes = self.sweep_dir / "recipes"
        options = tuple(plugins.arguments())
        return [
            TrialLaunch(t.name, recipes / f"{t.name}.yaml", self.sweep_dir, options)
            for t in self.trials
        ]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and "type" in value:
        return str(value["type"])
    return str(value)


def sanitise(text: str) -> str:
    """Keep a name part inside NAME_PATTERN's alphabet (no separators, no '=')."""
    return re.sub(r"[^A-Za-z0-9._+,-]", "_", text)


def labels(keys: list[str]) -> dict[str, str]:
    """Short labels for dotted keys: the last part (the section's name for ``type``)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        short[key] = parts[-2] if parts[-1] == "type" and len(parts) > 1 else parts[-1]
    counts: dict[str, int] = {}
    for label in short.values():
        counts[label] = counts.get(label, 0) + 1
    return {key: label if counts[label] == 1 else key for key, label in short.items()}


def trial_name(sweep: str, parts: list[str]) -> str:
    name = "-".join([sweep, *parts])
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


def override_text(key: str, value: Any) -> str:
    """``key=value`` for memctl.recipe's overrides, the value written as YAML that reads back."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).removesuffix("\n...\n")
    return f"{key}={text.strip()}"


def _check_path(data: dict[str, Any], key: str, where: str) -> None:
    node: Any = data
    path = key.split(".")
    for depth, part in enumerate(path):
        if not isinstance(node, dict) or part not in node:
            suggestion = key_suggestion(data, path, depth)
            raise UserError(f"{where}: {key}: no such key in the recipe{suggestion}")
        node = node[part]


def resolve_trial(
    base: dict[str, Any], settings: dict[str, Any], name: str, seed: int | None, where: str
) -> Recipe:
    """The base recipe with ``settings`` (dotted key -> value) applied, validated."""
    data = dict(base)
    for section in ("model", "task"):
        new_type = settings.get(f"{section}.type")
        if new_type is not None and new_type != base[section]["type"]:
            data[section] = {"type": new_type}
    data = validate_recipe(data, where).resolved()
    for key in settings:
        _check_path(data, key, where)
    overrides = [override_text(key, value) for key, value in settings.items()]
    overrides.append(override_text("name", name))
    if seed is not None:
        overrides.append(override_text("seed", seed))
    for text in overrides:
        key, value = parse_override(text)
        if value != settings.get(".".join(key), value):
            raise UserError(f"{where}: {'.'.join(key)}: value {value!r} does not survive YAML")
    return validate_recipe(apply_overrides(data, overrides, where), where)


def load_sweep(path: Path) -> SweepFile:
    return _validate(SweepFile, read_yaml(path), "", str(path))


def plan_sweep(path: Path, runs_dir: Path, name: str | None = None) -> Plan:
    """Validate a sweep file and expand it into resolved trial recipes (nothing is written).

    ``path`` may also be an existing sweep folder (``runs/<sweep>``): its sweep.yaml is
    expanded again, so that running it continues the sweep.
    """
    path = Path(path)
    if path.is_dir():
        stored = path / "sweep.yaml"
        if not stored.is_file():
            raise UserError(f"{path}: not a memctl sweep folder (no sweep.yaml)")
        data = read_yaml(stored)
        source = Path(data.pop("source", stored)) if isinstance(data, dict) else stored
        sweep = _validate(SweepFile, data, "", str(stored))
        runs_dir, name = path.parent, name or path.name
    else:
        sweep, source = load_sweep(path), path
    sweep_name = name or sweep.name or path.stem
    if not re.match(NAME_PATTERN, sweep_name):
        raise UserError(f"{path}: name: {sweep_name!r} is not a valid sweep name")
    base_path = (path.parent / sweep.base).resolve()
    base = validate_recipe(read_yaml(base_path), str(base_path)).resolved()
    plan = Plan(sweep_name, sweep, source, base_path, Path(runs_dir) / sweep_name)

    grid_keys = list(sweep.grid)
    random_keys = list(sweep.random)
    short = labels([*grid_keys, *random_keys])
    rng = random.Random(sweep.seed)
    draws = [
        {key: draw(spec, rng) for key, spec in sweep.random.items()} for _ in range(sweep.trials)
    ]
    if not random_keys:
        draws = [{}]
    seeds: list[int | None] = list(sweep.seeds) or [None]
    names: set[str] = set()
    for point in itertools.product(*(sweep.grid[key] for key in grid_keys)):
        for index, drawn in enumerate(draws):
            for seed in seeds:
                params = dict(zip(grid_keys, point, strict=True)) | drawn
                parts = [f"{short[k]}={sanitise(format_value(v))}" for k, v in params.items()]
                if random_keys:
                    parts.insert(len(grid_keys), f"r{index}")
                if seed is not None:
                    parts.append(f"seed={seed}")
                trial = trial_name(sweep_name, parts)
                if trial in names:
                    raise UserError(f"{path}: two trials would both be named {trial!r}")
                names.add(trial)
                where = f"{path}: trial {trial}"
                settings = {**sweep.set, **params}
                recipe = resolve_trial(base, settings, trial, seed, where)
                record = dict(params) if seed is None else {**params, "seed": seed}
                plan.trials.append(PlannedTrial(trial, record, recipe))
    return plan


# -- the sweep folder -----------------------------------------------------------------


def read_trials_csv(sweep_dir: Path) -> list[dict[str, str]]:
    path = Path(sweep_dir) / "trials.csv"
    if not path.is_file():
        raise UserError(f"{sweep_dir}: not a memctl sweep (no trials.csv)")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_trials_csv(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(TRIAL_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(sweep_dir) / "trials.csv", buffer.getvalue())


def prepare(plan: Plan) -> list[dict[str, Any]]:
    """Create or continue ``runs/<sweep>/``: sweep.yaml, trial recipes, trials.csv.

    A trial that already exists must have the same resolved recipe: a changed sweep file
    or base recipe is a new sweep (``--name``), not a silent mix of two.
    """
    sweep_dir = plan.sweep_dir
    recipes = sweep_dir / "recipes"
    previous = {row["trial"]: row for row in read_trials_csv(sweep_dir)} if (
        sweep_dir / "trials.csv"
    ).is_file() else {}  # fmt: skip
    for trial in plan.trials:
        stored = recipes / f"{trial.name}.yaml"
        if stored.is_file():
            old = validate_recipe(read_yaml(stored), str(stored))
            if old.digest() != trial.recipe.digest():
                raise UserError(
                    f"{stored}: trial {trial.name} differs from the sweep file's "
                    f"(was {plan.source} or {plan.base} changed?); start a new sweep with --name"
                )
    try:
        recipes.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{sweep_dir}: cannot create sweep directory ({exc.strerror})") from None
    resolved = plan.sweep.model_dump(mode="json")
    resolved.update(name=plan.name, base=str(plan.base), source=str(plan.source.resolve()))
    atomic_write(sweep_dir / "sweep.yaml", yaml.safe_dump(resolved, sort_keys=False))
    rows = []
    for trial in plan.trials:
        stored = recipes / f"{trial.name}.yaml"
        if not stored.is_file():
            atomic_write(stored, yaml.safe_dump(trial.recipe.resolved(), sort_keys=False))
        row = previous.pop(trial.name, {})
        rows.append({**{c: row.get(c, "") for c in TRIAL_COLUMNS}, "trial": trial.name,
                     **{k: format_value(v) for k, v in trial.params.items()}})  # fmt: skip
    rows.extend(previous.values())  # trials of an earlier version of the sweep stay listed
    rows = [refresh_row(sweep_dir, row, None) for row in rows]
    write_trials_csv(sweep_dir, rows)
    return rows


def refresh_row(sweep_dir: Path, row: dict[str, Any], state: TrialState | None) -> dict[str, Any]:
    """A trials.csv row brought up to date from the executor and the trial's run directory."""
    row = dict(row)
    run = RunDir(Path(sweep_dir) / row["trial"])
    has_run = run.run_file.is_file()
    info = run.read_info() if has_run else {}
    if state is not None and state.state in ACTIVE:
        row["status"] = state.state
    elif has_run:
        row["status"] = run.status()
    elif state is not None:
        row["status"] = state.state
    else:
        row["status"] = row.get("status") if row.get("status") == "failed" else "pending"
    if state is not None:
        row["job_id"] = state.job_id or row.get("job_id", "")
        row["error"] = state.error
    if row["status"] == "failed" and info.get("error"):
        row["error"] = info["error"]
    elif row["status"] != "failed":
        row["error"] = ""
    row["attempts"] = len(info.get("lineage", [])) or row.get("attempts", "") or 0
    last = run.last_metrics() if has_run else {}
    metric = primary_metric(Path(sweep_dir) / "recipes" / f"{row['trial']}.yaml")
    row.update(step=last.get("step", row.get("step") or 0), metric=metric,
               value=last.get(metric, row.get("value", "")))  # fmt: skip
    return row


def primary_metric(recipe_file: Path) -> str:
    """The metric a trial's task ranks by (``bit_errors``, ``error``, ...)."""
    if not recipe_file.is_file():
        return ""
    return _primary_metric(recipe_file, recipe_file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _primary_metric(recipe_file: Path, mtime_ns: int) -> str:
    # Polled for every trial every second: each recipe version is parsed once.
    found = task_class((yaml.safe_load(recipe_file.read_text()) or {}).get("task"))
    return found.primary_metric if found is not None else ""


def sweep_status(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every trial's row, refreshed from its run directory (read-only)."""
    return [refresh_row(sweep_dir, row, None) for row in read_trials_csv(sweep_dir)]


def configure(
    plan: Plan,
    executor: str | None = None,
    workers: int | None = None,
    slurm: dict[str, Any] | None = None,
) -> None:
    """Apply command-line settings over the sweep file's, validated the same way."""
    data = plan.sweep.model_dump()
    if executor is not None:
        data["executor"] = executor
    if workers is not None:
        data["workers"] = workers
    data["slurm"].update(slurm or {})
    plan.sweep = _validate(SweepFile, data, "", "command line")


def make_executor(
    plan: Plan, kind: str | None = None, workers: int | None = None
) -> LocalExecutor | SlurmExecutor:
    """The sweep's executor (the sweep file's unless ``kind``/``workers`` say otherwise)."""
    kind = kind or plan.sweep.executor
    if kind == "local":
        return LocalExecutor(workers or plan.sweep.workers)
    if kind == "slurm":
        return SlurmExecutor(plan.sweep_dir, plan.name, plan.sweep.slurm.settings())
    raise UserError(f"--executor {kind!r}: expected local or slurm")


def run_sweep(
    plan: Plan,
    executor: LocalExecutor | SlurmExecutor,
    retry_failed: bool = False,
    on_update: Callable[[list[dict[str, Any]]], None] | None = None,
    poll_s: float = 1.0,
) -> list[dict[str, Any]]:
    """Run (or continue) a sweep until no trial is queued or running; its final rows.

    Finished trials are skipped, interrupted ones resumed from their checkpoints, failed
    ones retried only with ``retry_failed``; a trial still queued or running on SLURM from
    an earlier invocation is watched rather than submitted twice. A failing trial never
    stops the others. On KeyboardInterrupt the executor is asked to stop (local trials
    checkpoint), the rows are written, and the interrupt propagates.
    """
    rows = prepare(plan)
    by_name = {row["trial"]: row for row in rows}
    launches = plan.launches()
    watched: set[str] = set()
    if isinstance(executor, SlurmExecutor):
        live = squeue_states([by_name[t.name].get("job_id", "") for t in launches])
        for trial in launches:
            if by_name[trial.name].get("job_id") in live:
                executor.attach(trial, by_name[trial.name]["job_id"])
                watched.add(trial.name)
    todo = []
    for trial in launches:
        status = by_name[trial.name]["status"]
        if trial.name in watched or status in ("finished", "running"):
            continue
        if status == "failed" and not retry_failed:
            continue
        todo.append(trial)

    def update() -> None:
        states = executor.poll()
        for name, row in list(by_name.items()):
            by_name[name] = refresh_row(plan.sweep_dir, row, states.get(name))
        current = list(by_name.values())
        write_trials_csv(plan.sweep_dir, current)
        if on_update is not None:
            on_update(current)

    # SIGTERM (a sweep driver killed, or itself a batch job) stops the trials like Ctrl-C,
    # and so does SIGINT even where the shell started this process with SIGINT ignored.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    try:
        executor.submit(todo)
        update()
        while executor.active():
            time.sleep(poll_s)
            update()
    except KeyboardInterrupt:
        executor.interrupt()
        while executor.active():
            try:
                time.sleep(poll_s)
                update()
            except KeyboardInterrupt:
                executor.interrupt()
        update()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return list(by_name.values())


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# -- summary --------------------------------------------------------------------------


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def trial_table(sweep_dir: Path, metric: str | None = None,
                keys: list[str] | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per trial: status, step, the last logged curriculum level, the final and
    best ``metric`` in metrics.csv (best among the rows at that last level: a curriculum's
    easier levels do not count), and the final evaluation at that level from eval.csv.

    ``keys`` adds recipe settings (dotted) as columns, e.g. ``model.type``.
    """
    sweep_dir = Path(sweep_dir)
    records = []
    for row in sweep_status(sweep_dir):
        recipe_file = sweep_dir / "recipes" / f"{row['trial']}.yaml"
        recipe = _flatten(yaml.safe_load(recipe_file.read_text())) if recipe_file.is_file() else {}
        name = metric or row["metric"]
        record: dict[str, Any] = {"trial": row["trial"], "status": row["status"],
                                  "step": int(row["step"] or 0), "metric": name}  # fmt: skip
        for key in keys or []:
            if key not in recipe:
                raise UserError(f"--group-by {key}: no such recipe setting in {recipe_file}")
            record[key] = recipe[key]
        record.update(level=math.nan, final=math.nan, best=math.nan, eval=math.nan)
        metrics_file = sweep_dir / row["trial"] / "metrics.csv"
        if metrics_file.is_file():
            frame = pd.read_csv(metrics_file)
            if name not in frame.columns:
                known = ", ".join(frame.columns[4:])
                raise UserError(f"--metric {name}: not a column of {metrics_file} ({known})")
            if len(frame):
                higher = TASKS.get(recipe["task.type"]).cls.metric_higher_is_better(name)
                level = int(frame["level"].iloc[-1])
                at_level = frame.loc[frame["level"] == level, name]
                record["level"] = level
                record["final"] = float(frame[name].iloc[-1])
                record["best"] = float(at_level.max() if higher else at_level.min())
                eval_file = sweep_dir / row["trial"] / "eval.csv"
                if eval_file.is_file():
                    evals = pd.read_csv(eval_file)
                    chosen = evals[(evals["checkpoint"] == "final") & (evals["level"] == level)]
                    if len(chosen) and name in chosen.columns:
                        record["eval"] = float(chosen[name].iloc[-1])
        records.append(record)
    return pd.DataFrame.from_records(records)


def varied_keys(sweep_dir: Path) -> list[str]:
    """The settings a sweep varies (trials.csv's parameter columns), seed excluded."""
    rows = read_trials_csv(sweep_dir)
    columns = list(rows[0]) if rows else []
    return [c for c in columns if c not in TRIAL_COLUMNS and c != "seed"]


def summarise(sweep_dir: Path, metric: str | None = None,
              group_by: list[str] | None = None) -> pd.DataFrame:  # fmt: skip
    """Per group of trials (default: every varied setting but the seed), over its seeds:
    count, and median, min and max of the final, best and evaluated metric."""
    keys = group_by if group_by is not None else varied_keys(sweep_dir)
    table = trial_table(sweep_dir, metric, keys)
    if table.empty:
        return table
    if not keys:
        table = table.assign(sweep=Path(sweep_dir).name)
        keys = ["sweep"]
    grouped = table.groupby(keys, sort=False, dropna=False)
    summary = grouped.agg(
        metric=("metric", "first"),
        n=("trial", "count"),
        finished=("status", lambda s: int((s == "finished").sum())),
        level_median=("level", "median"),
        final_median=("final", "median"),
        final_min=("final", "min"),
        final_max=("final", "max"),
        best_median=("best", "median"),
        eval_median=("eval", "median"),
        eval_min=("eval", "min"),
        eval_max=("eval", "max"),
    )
    return summary.reset_index()
