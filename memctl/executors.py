"""Where sweep trials run: local worker processes, or a SLURM job array through submitit.

Every trial is one ``memctl train`` (or ``memctl resume``) process whose output goes to
``<sweep dir>/<trial>.log``, beside its run directory ``<sweep dir>/<trial>/``. Whether a
trial starts fresh or resumes is decided when it starts, from its run directory, so a
trial that is re-launched (a re-run sweep, a requeued SLURM job) carries on from its last
checkpoint and the trainer's resume keeps metrics.csv exact.

Signals: the trainer checkpoints and exits on SIGTERM, SIGINT and SIGUSR1. The local
executor forwards Ctrl-C to its trials as one SIGINT each. On SLURM, submitit asks for
SIGUSR2 ``signal_delay_s`` before the time limit (and tests send it to mimic preemption);
its handler calls ``SlurmTrial.checkpoint``, which passes SIGUSR1 to the trainer, waits
for its checkpoint, then lets submitit requeue the array task.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memctl.errors import UserError
from memctl.rundir import RunDir

# How long a trial gets to finish its step and checkpoint after a stop signal.
CHECKPOINT_GRACE_S = 60.0
POLL_S = 0.2


@dataclass(frozen=True)
class TrialLaunch:
    """What an executor needs to run one trial: its resolved recipe, its sweep folder and
    the ``--plugin`` options that a fresh trial's ``memctl train`` needs (a resumed one
    loads its plugins from its run.json, checked)."""

    name: str
    recipe_file: Path
    sweep_dir: Path
    plugins: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.sweep_dir / self.name

    @property
    def log_file(self) -> Path:
        return self.sweep_dir / f"{self.name}.log"


@dataclass
class TrialState:
    """What an executor knows of a trial: ``queued`` or ``running``, then how its run
    ended: ``finished``, ``interrupted`` (checkpointed; a re-run resumes it) or ``failed``."""

    state: str
    job_id: str = ""
    error: str = ""


def memctl_command() -> list[str]:
    """The ``memctl`` entry point of this interpreter's environment."""
    script = Path(sys.executable).with_name("memctl")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "memctl"]


def trial_arguments(trial: TrialLaunch) -> list[str] | None:
    """``memctl`` arguments that carry the trial on; None when it has finished.

    A run directory without a checkpoint (stopped before its first one was written)
    holds no training state; it is removed and the trial starts again.
    """
    run_dir = trial.run_dir
    if (run_dir / "run.json").is_file():
        if RunDir(run_dir).read_info()["status"] == "finished":
            return None
        if (run_dir / "checkpoints" / "last.pt").is_file():
            return ["resume", str(run_dir)]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return [*trial.plugins, "train", str(trial.recipe_file), "--runs-dir", str(trial.sweep_dir)]


def thread_environment(threads: int) -> dict[str, str]:
    """Environment of a trial process: torch's intra-op pool sized to its share of cores."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def last_log_line(path: Path) -> str:
    """The last non-empty line of a trial log: the one-line error of a failed trial."""
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 8192))
        lines = handle.read().decode(errors="replace").splitlines()
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def trial_error(trial: TrialLaunch, exit_code: int | None) -> str:
    """Why a trial failed: run.json's error, else its log's last line, else the exit code."""
    if (trial.run_dir / "run.json").is_file():
        error = RunDir(trial.run_dir).read_info().get("error")
        if error:
            return str(error)
    return last_log_line(trial.log_file) or f"exited with code {exit_code}"


def ended_state(trial: TrialLaunch, exit_code: int | None) -> TrialState:
    """After a trial process ended: its run's status, or failed with the reason."""
    if (trial.run_dir / "run.json").is_file():
        status = RunDir(trial.run_dir).status()
        if status in ("finished", "interrupted"):
            return TrialState(status)
    return TrialState("failed", error=trial_error(trial, exit_code))


def start_trial(
    trial: TrialLaunch, threads: int, *, new_session: bool, ignore_usr2: bool = False
) -> subprocess.Popen | None:
    """Start ``memctl train|resume`` for a trial, appending its output to the trial log."""
    arguments = trial_arguments(trial)
    if arguments is None:
        return None
    trial.log_file.parent.mkdir(parents=True, exist_ok=True)
    with trial.log_file.open("ab") as log:
        log.write(f"--- memctl {' '.join(arguments)}\n".encode())
        log.flush()

        def preexec() -> None:
            # A sweep started in the background inherits an ignored SIGINT; its trials
            # must still stop on the one SIGINT that ``interrupt`` sends them.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if ignore_usr2:
                # SLURM signals the job step's whole process group with submitit's
                # SIGUSR2, whose default action would kill the trainer before it could
                # checkpoint.
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)

        return subprocess.Popen(
            [*memctl_command(), *arguments],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=thread_environment(threads),
            start_new_session=new_session,
            preexec_fn=preexec,
        )


def wait_for_exit(process: subprocess.Popen, timeout: float | None = None) -> int | None:
    """Poll until the process exits (signal handlers stay free to run); its code or None."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while process.poll() is None:
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)
    return process.returncode


class LocalExecutor:
    """Runs trials as up to ``workers`` concurrent processes on this machine.

    Each trial gets ``cores // workers`` torch threads so trials do not oversubscribe the
    CPU. Trials run in their own sessions: a Ctrl-C reaches this process only, and
    ``interrupt`` forwards exactly one SIGINT to each running trial, which checkpoints.
    """

    kind = "local"

    def __init__(self, workers: int, threads: int | None = None) -> None:
        if workers < 1:
            raise UserError(f"--workers {workers}: expected at least 1")
        self.workers = workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.threads = threads or max(1, cores // workers)
        self.waiting: list[TrialLaunch] = []
        self.running: dict[str, tuple[TrialLaunch, subprocess.Popen]] = {}
        self.states: dict[str, TrialState] = {}
        self.stopping = False

    def submit(self, trials: Sequence[TrialLaunch]) -> None:
        self.waiting.extend(trials)
        for trial in trials:
            self.states[trial.name] = TrialState("queued")
        self._fill()

    def _fill(self) -> None:
        while self.waiting and len(self.running) < self.workers and not self.stopping:
            trial = self.waiting.pop(0)
            process = start_trial(trial, self.threads, new_session=True)
            if process is None:
                self.states[trial.name] = TrialState("finished")
                continue
            self.running[trial.name] = (trial, process)
            self.states[trial.name] = TrialState("running", job_id=str(process.pid))

    def poll(self) -> dict[str, TrialState]:
        """Reap finished trials, start waiting ones; the state of every submitted trial."""
        for name, (trial, process) in list(self.running.items()):
            code = process.poll()
            if code is not None:
                del self.running[name]
                stopped_early = self.stopping and not (trial.run_dir / "run.json").is_file()
                # A trial stopped before it made its run folder has simply not started.
                state = TrialState("pending") if stopped_early else ended_state(trial, code)
                state.job_id = str(process.pid)
                self.states[name] = state
        self._fill()
        return dict(self.states)

    def active(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and not self.stopping)

    def interrupt(self) -> None:
        """Ctrl-C: start nothing more; ask every running trial to checkpoint and stop."""
        self.stopping = True
        for trial in self.waiting:
            self.states[trial.name] = TrialState("pending")
        self.waiting.clear()
        for _, process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)


class SlurmTrial:
    """The callable a SLURM array task runs (pickled by submitit): one trial, resumable.

    ``checkpoint`` is submitit's preemption/time-limit hook: it passes SIGUSR1 to the
    trainer, waits for it to checkpoint and exit, and returns a fresh copy of itself for
    the requeued task, which then resumes from that checkpoint.
    """

    def __init__(self, trial: TrialLaunch, threads: int) -> None:
        self.trial = trial
        self.threads = threads
        self.process: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"trial": self.trial, "threads": self.threads, "process": None}

    def __call__(self) -> dict[str, Any]:
        self.process = start_trial(self.trial, self.threads, new_session=False, ignore_usr2=True)
        if self.process is None:
            return {"trial": self.trial.name, "status": "finished"}
        state = ended_state(self.trial, wait_for_exit(self.process))
        if state.state != "finished":
            raise RuntimeError(f"trial {self.trial.name}: {state.error or state.state}")
        return {"trial": self.trial.name, "status": "finished"}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        # One checkpoint per task: a repeated warning signal must not re-enter this.
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)
            wait_for_exit(self.process, CHECKPOINT_GRACE_S)
        return submitit.helpers.DelayedSubmission(SlurmTrial(self.trial, self.threads))


@dataclass(frozen=True)
class SlurmSettings:
    """sbatch resources of every array task (the sweep file's ``slurm:`` section)."""

    partition: str | None = None
    time_min: int = 60
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float | None = None
    array_parallelism: int = 16
    signal_delay_s: int = 90
    sbatch: tuple[tuple[str, str], ...] = ()
    setup: tuple[str, ...] = ()


def squeue_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's state of every queued or running (array) task among ``job_ids``'s jobs."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids if job_id})
    if not arrays:
        return {}
    result = subprocess.run(
        ["squeue", "--noheader", "--array", "--format=%i %T", "--jobs", ",".join(arrays)],
        capture_output=True,
        text=True,
        check=False,
    )
    # squeue fails for ids it no longer knows; those jobs have simply ended.
    states = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


class SlurmExecutor:
    """Submits trials as one SLURM job array (submitit), at most ``array_parallelism`` at once.

    submitit's files (sbatch scripts, pickles, worker logs) go to ``<sweep dir>/slurm/``;
    each trial's own output goes to its log beside its run directory. ``poll`` reads the
    queue with squeue; a trial whose task has left the queue is judged by its run.json.
    """

    kind = "slurm"

    def __init__(self, sweep_dir: Path, name: str, settings: SlurmSettings) -> None:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise UserError("--executor slurm: no SLURM on this machine (sbatch/srun not found)")
        self.sweep_dir = sweep_dir
        self.name = name
        self.settings = settings
        self.trials: dict[str, TrialLaunch] = {}
        self.jobs: dict[str, str] = {}
        self.states: dict[str, TrialState] = {}

    def _executor(self) -> Any:
        import submitit

        settings = self.settings
        executor = submitit.SlurmExecutor(folder=self.sweep_dir / "slurm" / "%j")
        parameters: dict[str, Any] = {
            "job_name": self.name,
            "time": settings.time_min,
            "cpus_per_task": settings.cpus_per_task,
            "array_parallelism": settings.array_parallelism,
            "signal_delay_s": settings.signal_delay_s,
            "stderr_to_stdout": True,
            "additional_parameters": dict(settings.sbatch),
            "setup": list(settings.setup),
        }
        if settings.partition:
            parameters["partition"] = settings.partition
        if settings.gpus_per_node:
            parameters["gpus_per_node"] = settings.gpus_per_node
        if settings.mem_gb:
            parameters["mem"] = f"{int(settings.mem_gb * 1024)}MB"
        executor.update_parameters(**parameters)
        return executor

    def attach(self, trial: TrialLaunch, job_id: str) -> None:
        """Watch a trial already queued or running under ``job_id`` (a re-run sweep)."""
        self.trials[trial.name] = trial
        self.jobs[trial.name] = job_id
        self.states[trial.name] = TrialState("queued", job_id=job_id)

    def submit(self, trials: Sequence[TrialLaunch]) -> None:
        if not trials:
            return
        executor = self._executor()
        threads = self.settings.cpus_per_task
        try:
            jobs = executor.submit_array([SlurmTrial(trial, threads) for trial in trials])
        except Exception as exc:  # submitit raises bare exceptions for sbatch failures
            message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            raise UserError(f"--executor slurm: sbatch failed: {message}") from None
        for trial, job in zip(trials, jobs, strict=True):
            self.attach(trial, str(job.job_id))

    def poll(self) -> dict[str, TrialState]:
        live = squeue_states(list(self.jobs.values()))
        for name, job_id in self.jobs.items():
            state = self.states[name]
            if state.state not in ("queued", "running"):
                continue
            if job_id in live:
                kind = "running" if live[job_id] in ("RUNNING", "COMPLETING") else "queued"
                self.states[name] = TrialState(kind, job_id=job_id)
            else:
                ended = ended_state(self.trials[name], None)
                ended.job_id = job_id
                self.states[name] = ended
        return dict(self.states)

    def active(self) -> bool:
        return any(state.state in ("queued", "running") for state in self.states.values())

    def interrupt(self) -> None:
        """Ctrl-C detaches: the jobs stay on the cluster; ``memctl sweep status`` follows them."""
