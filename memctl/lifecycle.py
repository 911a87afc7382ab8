"""The life of a run directory: start a run, resume it, evaluate one of its checkpoints,
and ``load_run``, through which every command that opens an existing run goes (eval,
resume, inspect, plot), so that a run is read and checked in one way only.

The process's random streams are seeded here, where a run starts: a ``Trainer`` built
only to evaluate or inspect a checkpoint leaves them alone, and a resumed one gets them
back from the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import memctl
from memctl import checkpoint, plugins, preflight
from memctl.errors import UserError
from memctl.models.base import parameter_count
from memctl.recipe import Recipe, apply_overrides, read_yaml, validate_recipe
from memctl.rundir import RunDir, atomic_write, format_size, now, pid_alive
from memctl.tracking import mlflow_client_class
from memctl.trainer import Reporter, Trainer, TrainingError, resolve_device, summary_writer_class

# Recipe fields that name or place a run: the directory is named after them, so a
# resume cannot change them (a new run can).
FIXED_ON_RESUME = ("name",)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global streams (model initialisation, dropout);
    the data stream is the trainer's own generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    source = Path(memctl.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(trainer: Trainer) -> dict[str, Any]:
    """Where a run (or a segment of it) trains: device, implementation, host, the cores
    this process may use, threads."""
    return {
        "device": str(trainer.device),
        "backend": trainer.backend,
        "host": socket.gethostname(),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }


def run_info(recipe: Recipe, trainer: Trainer, overrides: list[str]) -> dict[str, Any]:
    return {
        "name": recipe.name,
        "status": "running",
        "created": now(),
        "model": recipe.model.type,
        "task": recipe.task.type,
        "metric": trainer.task.primary_metric,
        "parameters": parameter_count(trainer.model),
        "seed": recipe.seed,
        **machine_info(trainer),
        "versions": {
            "memctl": memctl.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "git_commit": git_commit(),
        "recipe_digest": recipe.digest(),
        "plugins": plugins.records(),
        "lineage": [
            {"event": "train", "time": now(), "step": 0, "overrides": overrides, "argv": sys.argv}
        ],
        "events": [],
    }


def check_training(recipe: Recipe, device: str | None, source: str) -> None:
    """Refuse a recipe whose training step needs more memory than the device has."""
    place = resolve_device(device or recipe.device, "--device" if device else "device")
    batch = recipe.train.batch_size
    what = f"{source}: {preflight.model_sizes(recipe)}, train.batch_size={batch}"
    preflight.check(recipe, place, batch, preflight.training_level(recipe), True, what)


@dataclass
class LoadedRun:
    """An existing run, read and checked: its directory, its recipe (with any overrides
    applied) and, when a checkpoint was asked for, a trainer holding that checkpoint."""

    run: RunDir
    recipe: Recipe
    trainer: Trainer | None = None
    checkpoint: Path | None = None
    label: str | None = None
    state: dict[str, Any] | None = None


def checkpoint_label(which: str) -> str:
    """``last``, ``best`` or ``step_<N>``, as eval.csv names a checkpoint."""
    which = which.removeprefix("step_")
    return which if which in ("last", "best") else f"step_{int(which)}"


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def load_run(
    path: Path,
    which: str | None = None,
    device: str | None = None,
    overrides: list[str] | None = None,
    *,
    more_steps: int | None = None,
    settings: dict[str, Any] | None = None,
    settings_source: str = "--set",
    reporter: Reporter | None = None,
    check_memory: bool = False,
) -> LoadedRun:
    """Open the run at ``path`` and validate its recipe; with ``which`` (``last``,
    ``best``, ``<N>`` or ``step_<N>``) also build its trainer from that checkpoint.

    ``overrides`` are the user's ``--set`` values (refused for fields that name the run);
    ``more_steps`` sets ``train.steps`` to the checkpoint's step plus that many;
    ``settings`` are dotted values the calling command sets itself (``settings_source``
    names them in errors, e.g. ``--batches``). ``check_memory`` refuses a recipe whose
    training step would not fit the device, before the model is built."""
    overrides = list(overrides or [])
    run = RunDir.open(path)
    plugins.load_recorded(run.read_info().get("plugins", []), str(run.run_file))
    recipe = validate_recipe(read_yaml(run.recipe_file), str(run.recipe_file))
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in FIXED_ON_RESUME:
            raise UserError(
                f"--set {key}: cannot change on an existing run ({key} names its directory "
                f"{run.path}); start a new run with train --set {key}=... instead"
            )
    if which is None:
        return LoadedRun(run, recipe)
    ckpt_path = run.checkpoint_path(which.removeprefix("step_"))
    label = checkpoint_label(which)
    state = checkpoint.load(ckpt_path)
    if overrides or more_steps is not None or settings:
        data = apply_overrides(recipe.resolved(), overrides, str(run.recipe_file))
        if more_steps is not None:
            data["train"]["steps"] = int(state["step"]) + more_steps
        for key, value in (settings or {}).items():
            _set(data, key, value)
        source = "--set" if overrides or more_steps is not None else settings_source
        recipe = validate_recipe(data, f"{run.recipe_file} with {source}")
    if check_memory:
        check_training(recipe, device, str(run.recipe_file))
    trainer = Trainer(recipe, device, reporter)
    trainer.load_state(state, str(ckpt_path), overrides)
    return LoadedRun(run, recipe, trainer, ckpt_path, label, state)


def plan(recipe: Recipe, device: str | None = None) -> dict[str, Any]:
    """What ``memctl train`` would do with ``recipe``, creating nothing: the model's
    parameter count, the pre-flight estimate of a training step against what the device
    has, and the implementation that would run (the model is built for that only when it
    fits; the process's random streams are left alone)."""
    place = resolve_device(device or recipe.device, "--device" if device else "device")
    level = preflight.training_level(recipe)
    found = preflight.estimate(recipe, recipe.train.batch_size, level, True)
    free, kind = preflight.available(place)
    fits = found.total <= free
    with torch.random.fork_rng(devices=[]):
        backend = Trainer(recipe, device).backend if fits else "not built: it does not fit"
    return {
        "parameters": found.parameter_count,
        "device": str(place),
        "memory": f"{preflight.describe(found)} at level {level}, batch {recipe.train.batch_size}",
        "available": f"{format_size(free)} ({kind})",
        "fits": fits,
        "backend": backend,
    }


def _finish(trainer: Trainer, run: RunDir) -> str:
    """Run the loop to the recipe's step count and record how it ended."""
    try:
        status = trainer.train(trainer.recipe.train.steps)
    except TrainingError as exc:
        run.update_info(status="failed", error=str(exc), step=trainer.step)
        _close_mlflow(trainer, run, "failed")
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:
        with contextlib.suppress(UserError):
            run.update_info(status="failed", error=f"out of memory at step {trainer.step + 1}")
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(
            f"{run.path}: out of memory at step {trainer.step + 1} ({reason}); lower the "
            "model or batch sizes"
        ) from None
    except BaseException as exc:
        with contextlib.suppress(UserError):  # the runs folder may be what failed
            run.update_info(status="failed", error=f"{exc.__class__.__name__}: {exc}")
        _close_mlflow(trainer, run, "failed")
        raise
    run.update_info(
        status=status,
        step=trainer.step,
        level=trainer.curriculum.level,
        startup_s=trainer.startup_s,
    )
    if trainer.tensorboard is not None:
        trainer.tensorboard.close()
    _close_mlflow(trainer, run, status)
    return status


def _close_mlflow(trainer: Trainer, run: RunDir, status: str) -> None:
    if trainer.mlflow is not None:
        trainer.mlflow.close(status, run.checkpoint_path("last"))


def start_run(
    recipe: Recipe,
    runs_dir: Path,
    overrides: list[str],
    device: str | None = None,
    reporter: Reporter | None = None,
    source: str = "recipe",
    force: bool = False,
) -> tuple[Trainer, str]:
    """Create ``runs_dir/<name>`` and train the recipe there. ``force`` skips the check of
    what a step will allocate."""
    seed_everything(recipe.seed)
    try:
        if not force:
            check_training(recipe, device, source)
        trainer = Trainer(recipe, device, reporter)
        if recipe.log.tensorboard:
            summary_writer_class()
        if recipe.log.mlflow:
            mlflow_client_class()
        backend = trainer.backend
    except UserError as exc:
        message = str(exc)
        raise UserError(message if message.startswith(source) else f"{source}: {message}") from None
    run = RunDir.create(runs_dir, recipe.name)
    run.write_recipe(recipe.resolved())
    run.write_info(run_info(recipe, trainer, overrides))
    trainer.attach(run)
    trainer.reporter.message(
        f"{recipe.model.type} on {recipe.task.type}: "
        f"{parameter_count(trainer.model):,} parameters, device {trainer.device}, {backend}"
    )
    try:
        trainer.save_checkpoint()  # step 0: the rollback target before the first checkpoint
        return trainer, _finish(trainer, run)
    except BaseException:
        if trainer.step == 0:
            # Nothing was trained: leave no directory that blocks the name.
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def _final_rows(run: RunDir, step: int) -> list[dict[str, Any]]:
    """The final evaluation's rows at ``step`` already in eval.csv (a run stopped after
    writing them but before recording its status)."""
    if not run.eval_file.is_file() or run.eval_file.stat().st_size == 0:
        return []
    frame = pd.read_csv(run.eval_file)
    if "checkpoint" not in frame:
        return []
    chosen = frame[(frame["checkpoint"] == "final") & (frame["step"] == step)]
    return chosen.to_dict("records")


def _cut_after(run: RunDir, trainer: Trainer) -> list[str]:
    """Make ``run`` end at the trainer's step: later metrics and eval rows, step
    checkpoints and a later best.pt go (the trainer then forgets that best). Returns what
    was cut, for the user."""
    step, cut = trainer.step, []
    for log in (trainer.metrics_log, trainer.eval_log):
        before = log.path.read_bytes() if log.path.is_file() else b""
        log.truncate_after(step)
        if before and log.path.read_bytes() != before:
            cut.append(f"{log.path.name} rows after step {step}")
    later = [path for number, path in run.step_checkpoints() if number > step]
    for path in later:
        path.unlink()
    if later:
        cut.append(", ".join(path.name for path in later))
    best = run.checkpoint_path("best")
    if best.is_file() and int(checkpoint.load(best)["step"]) > step:
        best.unlink()
        trainer.best = None
        cut.append("best.pt (a later step)")
    return cut


def resume_run(
    path: Path,
    overrides: list[str],
    more_steps: int | None = None,
    device: str | None = None,
    reporter: Reporter | None = None,
    force: bool = False,
    which: str = "last",
) -> tuple[Trainer, str]:
    """Continue a run from its last checkpoint, or from ``which`` (``best``, ``step_N``):
    then what the run wrote after that step is cut first. A run whose last checkpoint is
    at its final step but which never recorded its end (killed during the final
    evaluation) is finished: evaluated once, and its status set."""
    run = RunDir.open(path)
    info = run.read_info()
    if run.status() == "running" and pid_alive(int(info.get("pid", -1))):
        raise UserError(f"{path}: still running (pid {info['pid']}); stop it before resuming")
    loaded = load_run(
        path,
        which,
        device,
        overrides,
        more_steps=more_steps,
        reporter=reporter,
        check_memory=not force,
    )
    trainer, recipe = loaded.trainer, loaded.recipe
    assert trainer is not None
    if recipe.log.tensorboard:
        summary_writer_class()
    if recipe.log.mlflow:
        mlflow_client_class()
    unfinished = (
        which == "last" and run.status() != "finished" and trainer.step == recipe.train.steps
    )
    if trainer.step >= recipe.train.steps and not unfinished:
        raise UserError(
            f"{path}: {loaded.label} is at step {trainer.step} of "
            f"train.steps={recipe.train.steps}; use --steps N to train N more"
        )
    trainer.attach(run)
    cut = _cut_after(run, trainer) if which != "last" else []
    trainer.metrics_log.truncate_after(trainer.step)
    trainer.eval_log.truncate_after(trainer.step)
    if trainer.tensorboard is not None:
        trainer.tensorboard.truncate_after(trainer.step)
    run.write_recipe(recipe.resolved())
    info["lineage"].append(
        {
            "event": "resume",
            "time": now(),
            "step": trainer.step,
            "from": loaded.label,
            "overrides": overrides + ([f"train.steps={recipe.train.steps}"] if more_steps else []),
            "argv": sys.argv,
        }
    )
    info.update(
        status="running",
        **machine_info(trainer),
        recipe_digest=recipe.digest(),
        plugins=plugins.records(),
    )
    run.write_info(info)
    if cut:
        trainer.reporter.message(f"resuming from {loaded.label}: cut {'; '.join(cut)}")
    if unfinished:
        trainer.reporter.message(f"finishing {run.name} at step {trainer.step}")
        rows = _final_rows(run, trainer.step)
        trainer.final_eval = rows or trainer.evaluate_and_record("final")
        run.update_info(status="finished", step=trainer.step, level=trainer.curriculum.level)
        _close_mlflow(trainer, run, "finished")
        return trainer, "finished"
    trainer.reporter.message(f"resuming {run.name} at step {trainer.step}, {trainer.backend}")
    if which != "last":
        trainer.save_checkpoint()  # last.pt is now the step continued from
    return trainer, _finish(trainer, run)


def fork_run(
    path: Path,
    name: str,
    which: str = "last",
    overrides: list[str] | None = None,
    more_steps: int | None = None,
    runs_dir: Path | None = None,
    device: str | None = None,
    reporter: Reporter | None = None,
    force: bool = False,
) -> tuple[Trainer, str, Path]:
    """A new run ``name`` that starts from checkpoint ``which`` of the run at ``path``
    (weights, optimizer, curriculum, random streams, and its rows up to that step) and
    trains on; the parent is not changed, and the new run's lineage names it."""
    overrides = list(overrides or [])
    loaded = load_run(
        path,
        which,
        device,
        overrides,
        more_steps=more_steps,
        settings={"name": name},
        settings_source="the new name",
        reporter=reporter,
        check_memory=not force,
    )
    trainer, recipe, parent = loaded.trainer, loaded.recipe, loaded.run
    assert trainer is not None
    if recipe.log.mlflow:
        mlflow_client_class()
    if trainer.step >= recipe.train.steps:
        raise UserError(
            f"{path}: {loaded.label} is at step {trainer.step} of "
            f"train.steps={recipe.train.steps}; use --steps N to train N more"
        )
    runs_dir = parent.path.parent if runs_dir is None else runs_dir
    run = RunDir.create(runs_dir, recipe.name)
    for source, target in (
        (parent.metrics_file, run.metrics_file),
        (parent.eval_file, run.eval_file),
    ):
        if source.is_file():
            atomic_write(target, source.read_bytes())
    best = parent.checkpoint_path("best")
    if best.is_file() and int(checkpoint.load(best)["step"]) <= trainer.step:
        atomic_write(run.checkpoint_path("best"), best.read_bytes())
    else:
        trainer.best = None
    run.write_recipe(recipe.resolved())
    info = run_info(recipe, trainer, overrides)
    info["lineage"] = [
        {
            "event": "fork",
            "time": now(),
            "step": trainer.step,
            "parent": str(parent.path),
            "from": loaded.label,
            "overrides": overrides + ([f"train.steps={recipe.train.steps}"] if more_steps else []),
            "argv": sys.argv,
        }
    ]
    run.write_info(info)
    trainer.attach(run)
    trainer.metrics_log.truncate_after(trainer.step)
    trainer.eval_log.truncate_after(trainer.step)
    trainer.reporter.message(
        f"{run.name}: forked from {parent.name} at {loaded.label} (step {trainer.step}), "
        f"{trainer.backend}"
    )
    trainer.save_checkpoint()
    return trainer, _finish(trainer, run), run.path


def evaluate_run(
    path: Path,
    which: str,
    lengths: list[int] | None,
    device: str | None = None,
    batches: int | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate a checkpoint on the recipe's held-out batches, or on the first
    ``batches`` of the same held-out stream (more sequences: a finer estimate where
    errors are rare and large, as with long copies), and append the rows to eval.csv."""
    # A compiled step pays its compile time back over thousands of training steps, not
    # over one evaluation; the eager step computes the same to float tolerance.
    settings: dict[str, Any] = {"train.compile": False}
    if batches is not None:
        settings["eval.batches"] = batches
    loaded = load_run(
        path,
        which,
        device,
        settings=settings,
        settings_source="--batches" if batches is not None else "eval",
    )
    trainer = loaded.trainer
    assert trainer is not None and loaded.label is not None
    levels = trainer.eval_levels(lengths)
    batch = loaded.recipe.eval.batch_size or loaded.recipe.train.batch_size
    for level in [] if force else [n for n in levels if n >= trainer.task.min_level]:
        what = f"evaluation at level {level} (batch {batch})"
        preflight.check(loaded.recipe, trainer.device, batch, level, False, what)
    trainer.attach(loaded.run)
    last = loaded.state if which == "last" else checkpoint.load(loaded.run.checkpoint_path("last"))
    rows = trainer.evaluate(levels, loaded.label, int(last["step"]))
    trainer.eval_log.append(rows)
    return rows
