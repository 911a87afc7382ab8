"""Results against references: a recipe's ``reference`` entries checked on evaluation rows,
and ``memctl report``'s table over the seeds of a sweep or of separate runs.

The report reads run directories only. Per run it takes the final checkpoint's latest
evaluation at each level: the rows of eval.csv whose ``checkpoint_step`` is the run's
final step and whose checkpoint is ``final`` (the trainer's own) or ``last`` (a later
``memctl eval RUN``), the last such row per level. Runs are grouped when their resolved
recipes agree on everything but ``name``, ``seed`` and ``log``; a group is named by its
runs' common name prefix (``ntm_copy-seed=0``, ``ntm_copy-seed=1``: ``ntm_copy``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memctl import plugins
from memctl.errors import UserError
from memctl.recipe import Recipe, ReferenceSection, read_yaml, validate_recipe
from memctl.registry import TASKS
from memctl.rundir import RunDir

# Recipe settings that do not change what a run trains: runs differing only in them are
# seeds of one recipe.
NOT_TRAINING = ("name", "seed", "log")

COLUMNS = ["recipe", "level", "metric", "runs", "evaluated", "median", "min", "max", "met",
           "reference", "source", "seeds", "steps", "wall_s"]  # fmt: skip


@dataclass(frozen=True)
class ReferenceCheck:
    """A reference against our figure at its level (``ours`` None: not evaluated there)."""

    reference: ReferenceSection
    ours: float | None

    @property
    def met(self) -> bool:
        return self.ours is not None and self.reference.met_by(self.ours)

    def line(self) -> str:
        """``reference (Graves et al. 2014): bit_errors < 1 at level 50 - ours 0.43: met``."""
        head = f"reference ({self.reference.source}): {self.reference.condition()}"
        if self.ours is None:
            return f"{head} - not evaluated at level {self.reference.at.level}"
        return f"{head} - ours {self.ours:.4g}: {'met' if self.met else 'not met'}"


def reference_text(reference: ReferenceSection) -> str:
    """What ``memctl show`` lists: the source, the condition and the note."""
    note = f" ({reference.note})" if reference.note else ""
    return f"reference ({reference.source}): {reference.condition()}{note}"


def check_references(
    references: list[ReferenceSection], rows: list[dict[str, Any]]
) -> list[ReferenceCheck]:
    """Each reference against the evaluation ``rows`` (eval.csv rows, as the trainer
    writes them) at its level; the last row at a level counts."""
    by_level = {int(row["level"]): row for row in rows}
    checks = []
    for reference in references:
        row = by_level.get(reference.at.level)
        ours = None if row is None else float(row[reference.metric])
        checks.append(ReferenceCheck(reference, ours))
    return checks


def reference_record(check: ReferenceCheck) -> dict[str, Any]:
    """A check as plain data, for ``--json``."""
    data = check.reference.model_dump(mode="json")
    ours = check.ours if check.ours is not None and math.isfinite(check.ours) else None
    return {**data, "ours": ours, "met": check.met}


# -- memctl report ----------------------------------------------------------------------


@dataclass
class RunResult:
    """One run as the report reads it; ``rows`` empty when it has no final evaluation."""

    name: str
    recipe: Recipe
    status: str
    info: dict[str, Any]
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    steps: float = math.nan
    wall_s: float = math.nan


@dataclass
class Report:
    """``memctl report``'s table (``COLUMNS``), the machines the runs trained on (with
    how many runs each) and a line for each run without a final evaluation."""

    table: pd.DataFrame
    machines: list[str]
    notes: list[str]


def collect_runs(paths: list[Path]) -> list[RunResult]:
    """The runs named on the command line: a sweep folder (trials.csv) gives every trial in
    trials.csv's order, one that never started (or failed before its first step) from its
    stored recipe, without figures; a run directory is itself."""
    plugins.load_for_runs(Path(path) for path in paths if Path(path).is_dir())
    runs: list[RunResult] = []
    for path in map(Path, paths):
        if (path / "trials.csv").is_file():
            from memctl.sweep import read_trials_csv

            for row in read_trials_csv(path):
                if (path / row["trial"] / "run.json").is_file():
                    runs.append(read_run(path / row["trial"]))
                    continue
                stored = path / "recipes" / f"{row['trial']}.yaml"
                recipe = validate_recipe(read_yaml(stored), str(stored))
                runs.append(RunResult(row["trial"], recipe, row["status"] or "pending", {}))
        elif (path / "run.json").is_file():
            runs.append(read_run(path))
        elif path.is_dir():
            raise UserError(
                f"{path}: not a memctl run or sweep folder (no run.json, no trials.csv)"
            )
        else:
            raise UserError(f"{path}: no such run directory or sweep folder")
    if not runs:
        raise UserError(f"{', '.join(map(str, paths))}: no trials")
    return runs


def read_run(path: Path) -> RunResult:
    run = RunDir.open(path)
    info = run.read_info()
    recipe = validate_recipe(read_yaml(run.recipe_file), str(run.recipe_file))
    result = RunResult(run.name, recipe, run.status(), info)
    if result.status != "finished" or not run.eval_file.is_file():
        return result
    last = run.last_metrics()
    final_step = int(info.get("step", last.get("step", -1)))
    evals = pd.read_csv(run.eval_file)
    chosen = evals[(evals["checkpoint_step"] == final_step)
                   & evals["checkpoint"].isin(["final", "last"])]  # fmt: skip
    for row in chosen.to_dict("records"):
        result.rows[int(row["level"])] = row
    result.steps = float(final_step)
    result.wall_s = float(last["wall_s"]) if "wall_s" in last else math.nan
    return result


def group_label(names: list[str]) -> str:
    """The runs' common name prefix without a trailing ``seed=`` and separators."""
    prefix = names[0]
    for name in names[1:]:
        while not name.startswith(prefix):
            prefix = prefix[:-1]
    label = re.sub(r"[-_.,+=]*(seed=?\d*)?$", "", prefix)
    return label or names[0]


def _group_key(recipe: Recipe) -> str:
    data = {k: v for k, v in recipe.resolved().items() if k not in NOT_TRAINING}
    return json.dumps(data, sort_keys=True)


def _seeds(runs: list[RunResult]) -> str:
    return ",".join(str(run.recipe.seed) for run in runs)


def _median(values: list[float]) -> float:
    return float(pd.Series(values, dtype=float).median()) if values else math.nan


def _rows_of_group(label: str, runs: list[RunResult]) -> list[dict[str, Any]]:
    recipe = runs[0].recipe
    task = TASKS.get(recipe.task.type).cls.for_config(recipe.task)
    levels = sorted({level for run in runs for level in run.rows}
                    | {reference.at.level for reference in recipe.reference})  # fmt: skip
    finished = [run for run in runs if run.status == "finished"]
    common = {
        "recipe": label,
        "runs": len(runs),
        "seeds": _seeds(runs),
        "steps": _median([run.steps for run in finished]),
        "wall_s": _median([run.wall_s for run in finished]),
    }
    records = []
    for level in levels:
        references: list[ReferenceSection | None] = [
            reference for reference in recipe.reference if reference.at.level == level
        ]
        for reference in references or [None]:
            metric = reference.metric if reference is not None else task.primary_metric
            values = [float(run.rows[level][metric]) for run in runs if level in run.rows]
            record = {
                **common,
                "level": level,
                "metric": metric,
                "evaluated": len(values),
                "median": _median(values),
                "min": min(values) if values else math.nan,
                "max": max(values) if values else math.nan,
                "met": "",
                "reference": "",
                "source": "",
            }
            if reference is not None:
                sign = "<" if reference.lower_is_better else ">="
                record.update(met=sum(reference.met_by(v) for v in values),
                              reference=f"{sign} {reference.value:g}",
                              source=reference.source)  # fmt: skip
            records.append(record)
    return records


def machine_line(info: dict[str, Any]) -> str:
    """``torch 2.13.0, 2 threads, AMD EPYC 7B13, cpu`` from a run.json."""
    torch_version = info.get("versions", {}).get("torch", "?")
    threads = info.get("threads", "?")
    unit = "thread" if threads == 1 else "threads"
    where = f"{info.get('cpu', '?')}, {info.get('device', '?')}"
    return f"torch {torch_version}, {threads} {unit}, {where}"


def build_report(paths: list[Path]) -> Report:
    """The report over the runs at ``paths`` (sweep folders or run directories)."""
    runs = collect_runs(paths)
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(_group_key(run.recipe), []).append(run)
    records = []
    for members in groups.values():
        records += _rows_of_group(group_label([run.name for run in members]), members)
    machines = Counter(machine_line(run.info) for run in runs if run.info)
    notes = [f"{run.name}: {run.status}, no final evaluation" for run in runs if not run.rows]
    return Report(
        pd.DataFrame.from_records(records, columns=COLUMNS),
        [f"{line}: {count} run{'s' if count > 1 else ''}" for line, count in machines.items()],
        notes,
    )
