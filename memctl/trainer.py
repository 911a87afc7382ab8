"""The training loop: sample at the curriculum's level, forward, loss, backward, clip,
step, then log / evaluate / checkpoint. It owns the random streams, the device, the
non-finite policy and the signal handling; it knows nothing of the command line.

Exact resume: everything that decides the next step (weights, optimizer, curriculum,
every random stream, the partly accumulated log interval) is in the checkpoint, and the
CSV logs are cut back to the checkpoint's step before training continues.
"""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from memctl import checkpoint
from memctl.curriculum import Curriculum, Trigger
from memctl.errors import StorageError, UserError
from memctl.models.base import detach_state
from memctl.recipe import DEVICE_PATTERN, Recipe
from memctl.registry import MODELS, TASKS
from memctl.rundir import CsvLog, RunDir, now
from memctl.tasks.base import Batch
from memctl.toolchain import cpp_compiler
from memctl.tracking import EVAL_BOOKKEEPING, MlflowLog

STOP_SIGNALS = {signal.SIGTERM: 0, signal.SIGINT: 130}
if hasattr(signal, "SIGUSR1"):  # SLURM's usual warning before a time limit
    STOP_SIGNALS[signal.SIGUSR1] = 0


class TrainingError(Exception):
    """Training cannot go on (e.g. non-finite loss past the policy's patience)."""


class Reporter(Protocol):
    """What the trainer tells whoever watches it (the CLI draws progress from this)."""

    def start(self, step: int, total: int, level: int) -> None: ...
    def log(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class SilentReporter:
    def start(self, step: int, total: int, level: int) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


TENSORBOARD_HINT = "tensorboard is not installed: pip install 'memctl[tensorboard]'"


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; a UserError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"log.tensorboard: {TENSORBOARD_HINT}") from None
    return SummaryWriter


class TensorBoardLog:
    """metrics.csv and eval.csv rows again as TensorBoard scalars (``log.tensorboard``),
    for people who watch runs there; the CSV files stay the record.

    ``train/<column>`` per metrics row and ``eval/<column>/level_<n>`` per eval row, at
    the row's step. The event file is opened at the first row and flushed after every
    write. ``truncate_after`` mirrors ``CsvLog.truncate_after`` on resume and rollback:
    the next writer hides every later event from TensorBoard (its ``purge_step``).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.writer: Any = None
        self.purge_step: int | None = None

    def _write(self, scalars: list[tuple[str, float, int]]) -> None:
        if self.writer is None:
            writer_class = summary_writer_class()
            self.writer = writer_class(str(self.directory), purge_step=self.purge_step)
        for tag, value, step in scalars:
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def add_metrics(self, row: dict[str, Any]) -> None:
        self._write([(f"train/{k}", v, row["step"]) for k, v in row.items() if k != "step"])

    def add_eval(self, rows: list[dict[str, Any]]) -> None:
        self._write([(f"eval/{k}/level_{row['level']}", v, row["step"])
                     for row in rows for k, v in row.items()
                     if k not in EVAL_BOOKKEEPING])  # fmt: skip

    def truncate_after(self, step: int) -> None:
        self.close()
        self.purge_step = step + 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def resolve_device(name: str, source: str = "device") -> torch.device:
    """The torch device a run asks for (``source`` names where it asked, for errors)."""
    if re.fullmatch(DEVICE_PATTERN, name) is None:
        raise UserError(f"{source} {name}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"{source} {name}: CUDA is not available here (torch {torch.__version__})"
            )
        if (device.index or 0) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UserError(f"{source} {name}: this machine has {count} CUDA device(s)")
    return device


def format_value(value: Any) -> Any:
    return float(f"{value:.10g}") if isinstance(value, float) else value


class Trainer:
    """Builds task, model, optimizer and curriculum from a recipe and runs the loop.

    Constructing a Trainer validates everything that can be wrong with a recipe before
    any file is written; ``attach`` then binds it to a run directory.

    best.pt: an evaluation at a higher curriculum level beats any at a lower level; at
    the same level the better primary metric wins (``task.higher_is_better`` says which
    way). The best value and its level are in every checkpoint, so a resumed run compares
    against the best of all its steps, not only of its own.

    Timing: ``wall_s`` is training time summed over every start and resume; the first
    step after each (re)start is left out of it and of ``steps_per_s``, because it pays
    for start-up (lazy initialisation, kernel builds, compilation). That first step's
    duration, counted from the start of the loop, is ``startup_s``.
    """

    def __init__(self, recipe: Recipe, device: str | None = None, reporter: Reporter | None = None):
        self.recipe = recipe
        self.reporter = reporter or SilentReporter()
        self.device = resolve_device(device or recipe.device, "--device" if device else "device")
        self.task = TASKS.get(recipe.task.type).cls(recipe.task)
        model_cls = MODELS.get(recipe.model.type).cls
        self.model = model_cls(recipe.model, self.task.input_size, self.task.output_size)
        self.model.to(self.device)
        if recipe.train.compile:
            compile_step = getattr(self.model, "compile_step", None)
            if compile_step is None:
                raise UserError(
                    f"train.compile: model {recipe.model.type!r} has no per-step cell to "
                    "compile; set train.compile: false"
                )
            if self.device.type == "cpu" and not cpp_compiler():
                raise UserError(
                    "train.compile: torch.compile on the CPU builds C++ and no compiler was "
                    "found ($CXX, g++, c++ or clang++); install one or set train.compile: false"
                )
            compile_step()
        if recipe.train.tbptt is not None:
            if not self.task.scored_along_sequence:
                raise UserError(
                    f"train.tbptt: task {recipe.task.type!r} scores only the end of each "
                    "sequence, which a chunk before the last never sees; set train.tbptt: null"
                )
            if hasattr(self.model, "auxiliary_loss"):
                raise UserError(
                    f"train.tbptt: model {recipe.model.type!r} trains partly by REINFORCE "
                    "over whole sequences; set train.tbptt: null"
                )
        self.optimizer = self._make_optimizer()
        self.curriculum = Curriculum(recipe.curriculum, self.task)
        self.columns = [
            "step", "samples", "wall_s", "level", "loss",
            *self.task.metric_names, "grad_norm", "lr", "steps_per_s",
        ]  # fmt: skip
        self.eval_columns = [
            "step", "time", "checkpoint", "checkpoint_step", "eval_seed", "level", "loss",
            *self.task.metric_names, "sequences",
        ]  # fmt: skip
        watched = {"train.lr_decay.metric": recipe.train.lr_decay.metric}
        if recipe.curriculum.type == "adaptive":
            watched["curriculum.metric"] = recipe.curriculum.metric
        for field, metric in watched.items():
            if metric is not None and metric not in self.columns:
                raise UserError(
                    f"{field}: {metric!r} is not a metrics.csv column of task "
                    f"{recipe.task.type!r} (columns: {', '.join(self.columns[4:])})"
                )
        decay = recipe.train.lr_decay
        self.lr_trigger = (
            Trigger(decay.metric, decay.threshold, decay.mode, decay.window)
            if decay.metric is not None
            else None
        )
        self.data_generator = torch.Generator().manual_seed(recipe.seed)
        self.step = 0
        self.samples = 0
        self.wall_s = 0.0
        self.lr_scale = 1.0
        self.best: float | None = None
        self.best_level = self.curriculum.level
        self.nan_in_a_row = 0
        self.last_nan_step = -1
        # The running clock: None outside train() and before its first step is done.
        self.clock: float | None = None
        self.clock_step = 0
        self.startup_s: float | None = None
        self._reset_interval()
        self.saved_step: int | None = None
        self.stop_signal: int | None = None
        self.run: RunDir | None = None

    # -- construction -------------------------------------------------------------

    def _make_optimizer(self) -> torch.optim.Optimizer:
        spec = self.recipe.train.optimizer
        params = self.model.parameters()
        if spec.name == "adam":
            return torch.optim.Adam(
                params,
                lr=spec.lr,
                betas=spec.betas,
                eps=spec.eps,
                weight_decay=spec.weight_decay,
                fused=True,  # one kernel for all parameters (CPU and CUDA alike)
            )
        if spec.name == "rmsprop":
            return torch.optim.RMSprop(
                params,
                lr=spec.lr,
                alpha=spec.alpha,
                eps=spec.eps,
                momentum=spec.momentum,
                weight_decay=spec.weight_decay,
                foreach=True,
            )
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            foreach=True,
        )

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.recipe.train.optimizer.lr * self.lr_scale

    def _maybe_decay_lr(self, row: dict[str, Any]) -> None:
        """``train.lr_decay``: once the watched metric passes, multiply the learning rate
        by ``factor`` (not below ``min_lr``) and watch a fresh window. Adam's steps stay
        about lr-sized however small the gradients get, which can throw a converged model
        off its solution; a smaller lr after convergence keeps it there. With
        ``after_curriculum`` only rows trained at the curriculum's last level count (the
        early, easy levels pass any threshold)."""
        decay, base = self.recipe.train.lr_decay, self.recipe.train.optimizer.lr
        if decay.after_curriculum and row["level"] < self.curriculum.max:
            return
        if self.lr_trigger is None or not self.lr_trigger.passed(row):
            return
        scale = max(self.lr_scale * decay.factor, decay.min_lr / base)
        self.lr_trigger.window = []
        if scale < self.lr_scale:
            self.lr_scale = scale
            self._set_lr()
            self.reporter.message(f"step {self.step}: lr decayed to {self.lr:.3g}")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def backend(self) -> str:
        """Which implementation runs the model's steps: the model's own answer where it
        has several (``describe_backend``, see ``memctl/models/base.py``), otherwise the
        compiled step or plain PyTorch autograd."""
        describe = getattr(self.model, "describe_backend", None)
        if describe is not None:
            return describe(self.recipe.train.batch_size)
        if self.recipe.train.compile:
            return "compiled (torch.compile step)"
        return "reference (PyTorch autograd)"

    def attach(self, run: RunDir) -> None:
        self.run = run
        self.metrics_log = CsvLog(run.metrics_file, self.columns)
        self.eval_log = CsvLog(run.eval_file, self.eval_columns)
        self.tensorboard = (
            TensorBoardLog(run.path / "tensorboard") if self.recipe.log.tensorboard else None
        )
        self.mlflow = MlflowLog(run, self.recipe) if self.recipe.log.mlflow else None

    # -- checkpoints --------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds; the running clock is banked first, so the saved
        times are those of this moment."""
        self._bank_time()
        return {
            "step": self.step,
            "samples": self.samples,
            "wall_s": self.wall_s,
            "lr_scale": self.lr_scale,
            "best": self.best,
            "best_level": self.best_level,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.recipe.train.optimizer.name,
            "curriculum": self.curriculum.state_dict(),
            "lr_decay_window": [] if self.lr_trigger is None else list(self.lr_trigger.window),
            "rng": checkpoint.rng_state(self.data_generator),
            "interval": {k: v.cpu() for k, v in self.sums.items()}
            | {"_count": self.count, "_seconds": self.interval_s, "_timed": self.interval_timed},
            "recipe_digest": self.recipe.digest(),
        }

    def load_state(self, state: dict[str, Any], source: str, overrides: list[str]) -> None:
        """Restore a checkpoint; refuse one whose weights do not fit this recipe's model."""
        saved = state["model"]
        current = self.model.state_dict()
        for key, tensor in current.items():
            old = saved.get(key)
            if old is None or old.shape != tensor.shape:
                old_shape = "missing" if old is None else tuple(old.shape)
                cause = f"--set {' '.join(overrides)}" if overrides else "the recipe"
                raise UserError(
                    f"{source}: refused: {cause} changes the model's shape "
                    f"({key}: checkpoint {old_shape}, now {tuple(tensor.shape)}); "
                    f"start a new run instead"
                )
        self.model.load_state_dict(saved)
        if state["optimizer_name"] == self.recipe.train.optimizer.name:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.samples = int(state["samples"])
        self.wall_s = float(state["wall_s"])
        self.lr_scale = float(state["lr_scale"])
        self.best = state["best"]
        self._set_lr()
        self.curriculum.load_state_dict(state["curriculum"])
        # Checkpoints from before best_level was saved: their best was taken at their level.
        self.best_level = int(state.get("best_level", self.curriculum.level))
        if self.lr_trigger is not None:
            self.lr_trigger.window = [float(v) for v in state.get("lr_decay_window", [])]
        checkpoint.set_rng_state(state["rng"], self.data_generator)
        interval = dict(state["interval"])
        self.count = int(interval.pop("_count"))
        self.interval_s = float(interval.pop("_seconds", 0.0))
        self.interval_timed = int(interval.pop("_timed", 0))
        self.sums = {k: v.to(self.device) for k, v in interval.items()}
        self.saved_step = self.step

    def save_checkpoint(self) -> None:
        assert self.run is not None
        state = self.state()
        checkpoint.save(self.run.checkpoints / f"step_{self.step}.pt", state)
        checkpoint.save(self.run.checkpoint_path("last"), state)
        self.saved_step = self.step
        for _, path in self.run.step_checkpoints()[: -self.recipe.train.keep_checkpoints]:
            path.unlink(missing_ok=True)

    # -- the loop -----------------------------------------------------------------

    def _reset_interval(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.interval_s = 0.0  # seconds of the interval's timed steps, banked
        self.interval_timed = 0  # steps in interval_s (a (re)start's first step is not)

    def _bank_time(self) -> None:
        """Move the time since the clock last started into ``wall_s`` and the interval."""
        if self.clock is None:
            return
        now_s = time.perf_counter()
        self.wall_s += now_s - self.clock
        self.interval_s += now_s - self.clock
        self.interval_timed += self.step - self.clock_step
        self.clock, self.clock_step = now_s, self.step

    def _start_clock(self) -> None:
        self.clock, self.clock_step = time.perf_counter(), self.step

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def _handle_nonfinite(self, loss: torch.Tensor) -> bool:
        """Apply ``train.on_nan``; True when the step still counts (skip), False after a
        rollback to the last checkpoint."""
        policy = self.recipe.train.on_nan
        step = self.step + 1
        self.nan_in_a_row += 1
        self.last_nan_step = max(self.last_nan_step, step)
        assert self.run is not None
        self.run.add_event("nonfinite", step=step, loss=float(loss.detach()), policy=policy)
        limit = self.recipe.train.max_nan_in_a_row
        if policy == "stop" or self.nan_in_a_row > limit:
            why = (
                "train.on_nan is stop" if policy == "stop" else f"after {limit} {policy}s in a row"
            )
            raise TrainingError(f"non-finite loss or gradient at step {step} ({why})")
        self.optimizer.zero_grad(set_to_none=True)
        if policy == "skip":
            self.reporter.message(f"step {step}: non-finite loss or gradient; step skipped")
            self.step = step
            self.samples += self.recipe.train.batch_size
            return True
        halved = self.lr_scale / 2
        nan_in_a_row, last_nan_step = self.nan_in_a_row, self.last_nan_step
        restored = self._restore_last()
        self.lr_scale = halved
        self.nan_in_a_row, self.last_nan_step = nan_in_a_row, last_nan_step
        self._set_lr()
        self.run.add_event("rollback", step=step, to_step=restored, lr=self.lr)
        self.reporter.message(
            f"step {step}: non-finite loss or gradient; rolled back to step {restored}, "
            f"learning rate now {self.lr:.3g}"
        )
        return False

    def _restore_last(self) -> int:
        assert self.run is not None
        path = self.run.checkpoint_path("last")
        self._bank_time()
        # Kept: the rolled-back steps took real time, and best.pt (which a rollback does
        # not undo) may come from them: a later model must beat that file, not an older one.
        kept = self.wall_s, self.best, self.best_level
        self.load_state(checkpoint.load(path), str(path), [])
        self.wall_s, self.best, self.best_level = kept
        self.metrics_log.truncate_after(self.step)
        self.eval_log.truncate_after(self.step)
        if self.tensorboard is not None:
            self.tensorboard.truncate_after(self.step)
        if self.clock is not None:
            self._start_clock()
        return self.step

    def train_step(self) -> bool:
        """One step; False when it rolled the run back to its last checkpoint, whose step
        was logged, evaluated and saved already."""
        train = self.recipe.train
        level = self.curriculum.level
        low, high = self.curriculum.batch_levels(self.data_generator)
        batch = self._sample(low, high)
        state = self._burn_in(low, high) if train.burn_in else None
        self.optimizer.zero_grad(set_to_none=True)
        if train.tbptt is None:
            outputs, _ = self.model(batch.inputs, state)
            loss = self.task.loss(outputs, batch)
            total = loss
            auxiliary = getattr(self.model, "auxiliary_loss", None)
            if auxiliary is not None:
                total = loss + auxiliary(self.task.sequence_losses(outputs, batch).detach())
            total.backward()
        else:
            outputs, loss = self._truncated_backward(batch, train.tbptt, state)
            total = loss
        max_norm = train.clip.norm if train.clip.norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if not bool(torch.isfinite(total) & torch.isfinite(grad_norm)):
            return self._handle_nonfinite(total)
        if train.clip.value is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), train.clip.value, foreach=True)
        self.optimizer.step()
        self.step += 1
        self.samples += train.batch_size
        if self.step > self.last_nan_step:
            self.nan_in_a_row = 0
        metrics = self.task.metrics(outputs.detach(), batch)
        self._accumulate({"loss": loss, **metrics, "grad_norm": grad_norm})
        self.level_used = level
        self.curriculum.after_step(self.step)
        return True

    def _sample(self, low: int, high: int) -> Batch:
        """A training batch of levels ``low``..``high``, on the device."""
        return self.task.sample(
            self.recipe.train.batch_size, self.data_generator, max_level=high, min_level=low
        ).to(self.device)

    def _burn_in(self, low: int, high: int) -> Any:
        """The state left by up to ``train.burn_in`` unscored batches (their number drawn
        uniformly), run one after the other from a fresh state without gradient, each
        drawn as the training batch is. The draws come after the training batch's, so a
        recipe without burn-in draws the same training batches."""
        bound = self.recipe.train.burn_in + 1
        count = int(torch.randint(bound, (), generator=self.data_generator))
        state = None
        with torch.no_grad():
            for _ in range(count):
                _, state = self.model(self._sample(low, high).inputs, state)
        return detach_state(state)

    def _truncated_backward(
        self, batch: Batch, chunk: int, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated backpropagation through time: forward and backward chunk by chunk of
        ``chunk`` time steps, the first from ``state``, each later one from the previous
        chunk's state detached, accumulating the gradients; (every chunk's outputs,
        detached, and the batch's loss).

        The task's loss is a mean over the scored steps, so a chunk's loss weighted by its
        share of them sums to the batch's loss; with one chunk the weight is exactly 1
        and the gradient is the untruncated one."""
        scored = batch.mask.sum().clamp_min(1)
        outputs, loss = [], batch.mask.new_zeros(())
        for start in range(0, batch.inputs.shape[0], chunk):
            piece = Batch(*(part[start : start + chunk] for part in batch))
            piece_outputs, state = self.model(piece.inputs, state)
            piece_loss = self.task.loss(piece_outputs, piece) * (piece.mask.sum() / scored)
            piece_loss.backward()
            state = detach_state(state)
            outputs.append(piece_outputs.detach())
            loss = loss + piece_loss.detach()
        return torch.cat(outputs), loss

    def _log_row(self) -> dict[str, Any]:
        self._bank_time()
        means = {k: float(v) / self.count for k, v in self.sums.items()}
        if self.interval_timed:
            steps_per_s = self.interval_timed / max(self.interval_s, 1e-9)
        else:  # the interval's one step is a (re)start's first: its own rate is all there is
            assert self.startup_s is not None
            steps_per_s = 1 / max(self.startup_s, 1e-9)
        row = {
            "step": self.step,
            "samples": self.samples,
            "wall_s": self.wall_s,
            "level": self.level_used,
            **means,
            "lr": self.lr,
            "steps_per_s": steps_per_s,
        }
        row = {k: format_value(v) for k, v in row.items()}
        self.metrics_log.append([row])
        if self.tensorboard is not None:
            self.tensorboard.add_metrics(row)
        if self.mlflow is not None:
            self.mlflow.add_metrics(row)
        self._reset_interval()
        return row

    def train(self, until_step: int) -> str:
        """Train up to ``until_step``; return 'finished' or 'interrupted'.

        The last step of ``train.steps`` always gets a metrics row, even part of a log
        interval, and a finished segment is evaluated ('final') before its last
        checkpoint, so that checkpoint holds the final best. A signal checkpoints
        without a row: the partial interval is in the checkpoint and resume continues it.
        A write that fails (full disk, read-only or vanished folder) is a StorageError
        that also names the last good checkpoint, from which resume continues.
        """
        try:
            return self._train(until_step)
        except StorageError as exc:
            assert self.run is not None
            last = self.run.checkpoint_path("last")
            if not last.is_file():  # the run folder vanished
                raise StorageError(f"{exc}; no checkpoint of this run is left") from None
            raise StorageError(
                f"{exc}; the last good checkpoint is {last} (step {self.saved_step}), "
                "resume continues from it"
            ) from None

    def _train(self, until_step: int) -> str:
        assert self.run is not None
        train = self.recipe.train
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        loop_start = time.perf_counter()
        self.clock, self.startup_s = None, None
        self.level_used = self.curriculum.level
        self.reporter.start(self.step, until_step, self.curriculum.level)
        try:
            while self.step < until_step and self.stop_signal is None:
                if not self.train_step():
                    continue
                if self.clock is None:
                    self.startup_s = time.perf_counter() - loop_start
                    self._start_clock()
                if self.count and (self.step % train.log_every == 0 or self.step == train.steps):
                    row = self._log_row()
                    self.curriculum.after_log(row)
                    self._maybe_decay_lr(row)
                    self.reporter.log(row)
                if train.eval_every and self.step % train.eval_every == 0:
                    self.evaluate_and_record("train")
                if self.step % train.checkpoint_every == 0 and self.step < until_step:
                    self.save_checkpoint()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._bank_time()
            self.clock = None
            self.reporter.stop()
        if self.stop_signal is None:
            self.final_eval = self.evaluate_and_record("final")
        if self.saved_step != self.step:
            self.save_checkpoint()
        return "interrupted" if self.stop_signal is not None else "finished"

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_signal = signum
        self.reporter.message(
            f"{signal.Signals(signum).name} received: finishing this step and checkpointing"
        )

    # -- evaluation -----------------------------------------------------------------

    def eval_levels(self, extra: list[int] | None = None, references: bool = True) -> list[int]:
        """The curriculum's level and ``extra``; by default ``eval.lengths`` and, with
        ``references``, the levels of the recipe's references, so that the final
        evaluation and ``memctl eval`` check every reference (the periodic evaluations
        leave them out: a long reference length would slow every one)."""
        if extra is None:
            extra = list(self.recipe.eval.lengths)
            extra += [r.at.level for r in self.recipe.reference] if references else []
        return sorted({self.curriculum.level, *extra})

    @torch.no_grad()
    def evaluate(
        self, levels: list[int], label: str, run_step: int | None = None
    ) -> list[dict[str, Any]]:
        """Held-out batches from the recipe's eval seed: the same data at every call.

        A row's ``step`` is where the run stood when it was written (``run_step``, by
        default this model's step), ``checkpoint_step`` the step of the weights evaluated
        (they differ when ``memctl eval`` reads best.pt or an older step); ``time`` and
        ``eval_seed`` tell evaluations of the same weights apart.
        """
        spec = self.recipe.eval
        batch_size = spec.batch_size or self.recipe.train.batch_size
        rows = []
        was_training = self.model.training
        self.model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for level in levels:
                if level < self.task.min_level:
                    raise UserError(
                        f"--lengths: {level} is below the task's minimum {self.task.min_level}"
                    )
                generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + level)
                sums: dict[str, float] = {}
                for _ in range(spec.batches):
                    batch = self.task.sample_eval(batch_size, level, generator).to(self.device)
                    outputs, _ = self.model(batch.inputs)
                    values = {
                        "loss": self.task.loss(outputs, batch),
                        **self.task.metrics(outputs, batch),
                    }
                    for key, value in values.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                means = {k: v / spec.batches for k, v in sums.items()}
                row = {
                    "step": self.step if run_step is None else run_step,
                    "time": now(),
                    "checkpoint": label,
                    "checkpoint_step": self.step,
                    "eval_seed": spec.seed,
                    "level": level,
                    **means,
                    "sequences": spec.batches * batch_size,
                }
                rows.append({k: format_value(v) for k, v in row.items()})
        self.model.train(was_training)
        return rows

    def evaluate_and_record(self, label: str) -> list[dict[str, Any]]:
        """Evaluate, append to eval.csv, and keep best.pt.

        The primary metric at the curriculum's current level decides: a higher level beats
        any lower one; at the same level the better value wins (``task.higher_is_better``).
        """
        assert self.run is not None
        rows = self.evaluate(self.eval_levels(references=label == "final"), label)
        self.eval_log.append(rows)
        if self.tensorboard is not None:
            self.tensorboard.add_eval(rows)
        if self.mlflow is not None:
            self.mlflow.add_eval(rows)
        level = self.curriculum.level
        current = next(r for r in rows if r["level"] == level)
        value = float(current[self.task.primary_metric])
        if self._beats_best(level, value):
            self.best, self.best_level = value, level
            checkpoint.save(self.run.checkpoint_path("best"), self.state())
        return rows

    def _beats_best(self, level: int, value: float) -> bool:
        if self.best is None:
            return True
        if level != self.best_level:
            return level > self.best_level
        return value > self.best if self.task.higher_is_better else value < self.best
