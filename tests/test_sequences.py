"""The sequences task: the user's .npz/.pt files, checked at load, memory-mapped, sampled
from the run's generator (exact resume), with curricula over each sequence's level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memctl.errors import UserError
from memctl.recipe import validate_recipe
from memctl.registry import TASKS
from memctl.sweep import primary_metric
from memctl.tasks.sequences import SequencesConfig, load_sequences
from memctl.trainer import Trainer
from memctl.viz import Series, metric_label
from tests.conftest import cli, import_file, run_page_commands, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error
from tests.test_reliability import assert_split_run_matches_straight
from tests.test_task_metrics import check_metrics_described

ROOT = Path(__file__).resolve().parent.parent


def _example_module():
    return import_file(ROOT / "examples/make_sequences.py", "make_sequences")


EXAMPLE = _example_module()


def delayed_copy(count: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    return EXAMPLE.delayed_copy(count, 2, 8, seed)


def task_of(train: Path, **settings):
    config = SequencesConfig(train=str(train), **settings)
    return TASKS.get("sequences").cls(config)


def recipe_data(train: Path, **task) -> dict:
    return {
        "name": "seq",
        "seed": 5,
        "device": "cpu",
        "model": {"type": "lstm", "hidden": 8},
        "task": {"type": "sequences", "train": str(train), **task},
        "curriculum": {"type": "step", "start": 4, "increment": 2, "every": 15},
        "train": {"steps": 40, "batch_size": 6, "log_every": 5, "eval_every": 20},
        "eval": {"batches": 2},
    }


def test_npz_and_pt_give_the_same_batches(tmp_path: Path):
    arrays = delayed_copy()
    np.savez(tmp_path / "d.npz", **arrays)
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path / "d.pt")
    batches = [
        task_of(tmp_path / name).sample(
            5, torch.Generator().manual_seed(1), max_level=8, min_level=2
        )
        for name in ("d.npz", "d.pt")
    ]
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a, b)
    inputs, targets, mask = batches[0]
    assert inputs.dtype == targets.dtype == mask.dtype == torch.float32
    assert inputs.shape[1:] == (5, EXAMPLE.WIDTH)


def test_ragged_batches_are_as_long_as_their_longest_and_mask_the_padding(tmp_path: Path):
    arrays = delayed_copy()
    np.savez(tmp_path / "d.npz", **arrays)
    task = task_of(tmp_path / "d.npz")
    generator = torch.Generator().manual_seed(0)
    rows = task.train.rows(2, 8, 6, torch.Generator().manual_seed(0))
    inputs, _, mask = task.sample(6, generator, max_level=8, min_level=2)
    lengths = arrays["lengths"][rows]
    assert inputs.shape[0] == lengths.max()
    for column, length in enumerate(lengths):
        assert torch.equal(
            inputs[:, column], torch.from_numpy(arrays["inputs"][rows[column]])[: lengths.max()]
        )
        # Scored: from the delay up to the sequence's end, and nothing past it.
        wanted = (np.arange(lengths.max()) >= EXAMPLE.DELAY) & (np.arange(lengths.max()) < length)
        assert mask[:, column].tolist() == wanted.astype(np.float32).tolist()


def test_default_mask_and_level_without_lengths(tmp_path: Path):
    arrays = delayed_copy()
    np.savez(tmp_path / "d.npz", inputs=arrays["inputs"], targets=arrays["targets"])
    task = task_of(tmp_path / "d.npz")
    assert task.min_level == task.level == 8
    inputs, _, mask = task.sample(3, torch.Generator().manual_seed(0), max_level=8, min_level=8)
    assert inputs.shape[0] == 8 and bool((mask == 1).all())


def test_a_batch_at_level_l_has_only_sequences_of_levels_up_to_l(tmp_path: Path):
    count = 200
    rng = np.random.default_rng(0)
    levels = rng.integers(1, 10, count)
    # Each sequence's input carries its level, so a batch shows which levels it drew.
    inputs = np.repeat(levels[:, None, None], 3, axis=1).astype(np.float32)
    np.savez(tmp_path / "d.npz", inputs=inputs, targets=np.zeros((count, 3, 1)), level=levels)
    task = task_of(tmp_path / "d.npz")
    assert (task.min_level, task.level) == (1, 9)
    generator = torch.Generator().manual_seed(0)
    for low, high in ((1, 1), (1, 4), (3, 5), (9, 9)):
        drawn = task.sample(64, generator, max_level=high, min_level=low).inputs[0, :, 0]
        assert low <= drawn.min() and drawn.max() <= high
        assert len(set(drawn.tolist())) == high - low + 1  # and every level in the range
    with pytest.raises(UserError, match=r"d.npz: level: no sequence .* \[10, 12\]"):
        task.sample(4, generator, max_level=12, min_level=10)


def test_uncompressed_npz_is_memory_mapped(tmp_path: Path):
    arrays = delayed_copy()
    np.savez(tmp_path / "d.npz", **arrays)
    data = load_sequences(str(tmp_path / "d.npz"), "bce")
    for name in ("inputs", "targets", "mask"):
        mapped = getattr(data, name)
        assert isinstance(mapped, np.memmap), name
        assert np.array_equal(mapped, arrays[name])
    # A Fortran-ordered array is mapped too.
    fortran = np.asfortranarray(arrays["inputs"])
    np.savez(tmp_path / "f.npz", inputs=fortran, targets=arrays["targets"])
    mapped = load_sequences(str(tmp_path / "f.npz"), "bce").inputs
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, arrays["inputs"])


def test_pt_is_opened_with_mmap(tmp_path: Path, monkeypatch):
    arrays = delayed_copy()
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path / "d.pt")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_sequences(str(tmp_path / "d.pt"), "bce")
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_compressed_npz_is_read_into_memory_or_refused_when_too_big(
    tmp_path: Path, runs_dir: Path, monkeypatch
):
    arrays = delayed_copy()
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    data = load_sequences(str(tmp_path / "c.npz"), "bce")
    assert not isinstance(data.inputs, np.memmap)
    assert np.array_equal(data.inputs, arrays["inputs"])

    import memctl.preflight

    np.savez_compressed(tmp_path / "huge.npz", **arrays)
    monkeypatch.setattr(memctl.preflight, "available", lambda device: (1000, "available CPU RAM"))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_data(tmp_path / "huge.npz"))
    before = snapshot(runs_dir)
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "huge.npz: inputs: compressed", "np.savez")
    assert snapshot(runs_dir) == before


def _changed(**changes):
    arrays = delayed_copy(16)
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value(arrays) if callable(value) else value
    return arrays


def _nan(arrays):
    inputs = arrays["inputs"].copy()
    inputs[3, 1, 2] = np.nan
    return inputs


def _inf(arrays):
    mask = arrays["mask"].copy()
    mask[5, 0] = np.inf
    return mask


BAD_FILES = [
    ("missing", _changed(targets=None), ["targets: missing array"]),
    ("rank", _changed(inputs=lambda a: a["inputs"][:, :, 0]), ["inputs: expected 3 dimensions"]),
    ("count", _changed(mask=lambda a: a["mask"][:10]), ["mask: 10 sequences, but inputs has 16"]),
    ("steps", _changed(targets=lambda a: a["targets"][:, :5]), ["targets: 5 steps"]),
    ("nan", _changed(inputs=_nan), ["inputs: has NaN or infinite"]),
    ("inf", _changed(mask=_inf), ["mask: has NaN or infinite"]),
    ("pickled", _changed(level=np.array([object()] * 16)), ["level: an object (pickled) array"]),
    ("text", _changed(level=np.array(["a"] * 16)), ["level: dtype <U1 is not numeric"]),
    ("empty", _changed(inputs=np.zeros((16, 8, 0))), ["inputs: empty"]),
    ("unknown", _changed(lenghts=np.ones(16, int)), ["lenghts: unknown array"]),
    ("float_level", _changed(level=np.ones(16)), ["level: dtype float64; expected integers"]),
    ("lengths", _changed(lengths=np.full(16, 9)), ["lengths: each must be in [1, 8]"]),
    ("not_bits", _changed(targets=lambda a: a["targets"] + 0.5), ["targets: bce needs values"]),
]


@pytest.mark.parametrize(
    "arrays,needles", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_is_one_line_and_touches_nothing(
    tmp_path: Path, runs_dir: Path, arrays: dict, needles: list[str]
):
    np.savez(tmp_path / "bad.npz", **arrays)
    recipe = write_recipe(tmp_path / "r.yaml", recipe_data(tmp_path / "bad.npz"))
    before = snapshot(runs_dir)
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, "bad.npz: ", *needles)
    assert snapshot(runs_dir) == before


BAD_SETUPS = [
    ("no_file", lambda d: {"train": str(d / "nowhere.npz")}, ["nowhere.npz: no such file"]),
    ("suffix", lambda d: {"train": str(d / "r.yaml")}, ["r.yaml: expected an .npz or .pt"]),
    ("no_level", lambda d: {"min_level": 20}, ["good.npz: level: no sequence", "[20, 8]"]),
    ("eval_width", lambda d: {"eval": str(d / "wide.npz")}, ["wide.npz: inputs: 5 features"]),
    ("not_pt", lambda d: {"train": str(d / "junk.pt")}, ["junk.pt: cannot load"]),
    ("loss", lambda d: {"loss": "hinge"}, ["task.loss"]),
]


@pytest.mark.parametrize(
    "task,needles", [c[1:] for c in BAD_SETUPS], ids=[c[0] for c in BAD_SETUPS]
)
def test_bad_task_setup_is_one_line_and_touches_nothing(
    tmp_path: Path, runs_dir: Path, task, needles: list[str]
):
    arrays = delayed_copy(16)
    np.savez(tmp_path / "good.npz", **arrays)
    np.savez(tmp_path / "wide.npz", **{**arrays, "inputs": np.zeros((16, 8, 5))})
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    data = recipe_data(tmp_path / "good.npz")
    data["task"].update(task(tmp_path))
    recipe = write_recipe(tmp_path / "r.yaml", data)
    before = snapshot(runs_dir)
    result = cli("train", recipe, "--runs-dir", runs_dir)
    assert_one_line_error(result, *needles)
    assert snapshot(runs_dir) == before


def test_relative_paths_resolve_against_the_current_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = SequencesConfig(train="data/train.npz")
    assert config.train == str(tmp_path / "data/train.npz") and config.eval is None


def test_exact_resume_in_a_new_process(tmp_path: Path, runs_dir: Path):
    np.savez(tmp_path / "train.npz", **delayed_copy(64, 0))
    np.savez(tmp_path / "eval.npz", **delayed_copy(32, 1))
    data = recipe_data(tmp_path / "train.npz", eval=str(tmp_path / "eval.npz"))
    recipe = write_recipe(tmp_path / "r.yaml", data)
    assert_split_run_matches_straight(recipe, runs_dir)
    # The step curriculum over the files' level crossed the resume point.
    assert (
        pd.read_csv(runs_dir / "split" / "metrics.csv")["level"].tolist()
        == [4] * 3 + [6] * 3 + [8] * 2
    )
    evals = {
        name: pd.read_csv(runs_dir / name / "eval.csv")
        .query("checkpoint == 'train'")
        .drop(columns="time")
        for name in ("straight", "split")
    }
    assert evals["split"].to_csv(index=False) == evals["straight"].to_csv(index=False)


def test_evaluation_reads_the_eval_file(tmp_path: Path):
    train, held_out = delayed_copy(64, 0), delayed_copy(32, 1)
    held_out["inputs"] = held_out["inputs"] + 100  # told apart from train by its values
    np.savez(tmp_path / "train.npz", **train)
    np.savez(tmp_path / "eval.npz", **held_out)
    task = task_of(tmp_path / "train.npz", eval=str(tmp_path / "eval.npz"))
    assert (
        task.sample(8, torch.Generator().manual_seed(0), max_level=8, min_level=2).inputs.max() < 50
    )
    batch = task.sample_eval(8, 5, torch.Generator().manual_seed(0))
    assert batch.inputs.max() > 50
    # Levels from the task's minimum up to the evaluated level: lengths 2..5 here.
    assert batch.inputs.shape[0] <= 5


def _train_rows(tmp_path: Path, arrays: dict, **task) -> tuple[Trainer, list[dict]]:
    np.savez(tmp_path / "d.npz", **arrays)
    data = recipe_data(tmp_path / "d.npz", **task)
    data["curriculum"] = {"type": "fixed"}
    torch.manual_seed(0)  # the model's initial weights
    trainer = Trainer(validate_recipe(data, "test"))
    for _ in range(3):
        trainer.train_step()
    return trainer, trainer.evaluate([trainer.curriculum.level], "test")


def test_mse_loss_and_its_metrics(tmp_path: Path):
    arrays = delayed_copy()
    arrays["targets"] = arrays["targets"] * 3.5 - 1
    trainer, rows = _train_rows(tmp_path, arrays, loss="mse")
    assert trainer.task.primary_metric == "squared_error"
    assert {"squared_error", "abs_error"} <= set(rows[0]) and "bit_errors" not in rows[0]
    assert trainer.columns[5:7] == ["squared_error", "abs_error"]


def test_cross_entropy_with_class_indices_or_one_hot(tmp_path: Path):
    arrays = delayed_copy()
    classes = arrays["targets"][..., 0].astype(np.int64) + 2 * arrays["targets"][..., 1].astype(
        np.int64
    )
    index_trainer, index_rows = _train_rows(
        tmp_path, {**arrays, "targets": classes}, loss="cross_entropy"
    )
    assert index_trainer.task.output_size == 4
    one_hot = np.eye(4, dtype=np.float32)[classes]
    _, hot_rows = _train_rows(tmp_path, {**arrays, "targets": one_hot}, loss="cross_entropy")
    assert index_trainer.task.primary_metric == "error"
    assert index_rows[0]["loss"] == hot_rows[0]["loss"]
    assert {"error", "accuracy", "cost_bits"} <= set(index_rows[0])
    broken = one_hot.copy()
    broken[0, 4] = 0  # a scored step of no class
    np.savez(tmp_path / "broken.npz", **{**arrays, "targets": broken})
    with pytest.raises(UserError, match=r"broken\.npz: targets: a scored step is not one-hot"):
        task_of(tmp_path / "broken.npz", loss="cross_entropy")


def test_the_loss_picks_the_primary_metric_where_only_the_recipe_is_known(tmp_path: Path):
    np.savez(tmp_path / "d.npz", **delayed_copy())
    for loss, metric in (
        ("bce", "bit_errors"),
        ("mse", "squared_error"),
        ("cross_entropy", "error"),
    ):
        path = write_recipe(tmp_path / f"{loss}.yaml", recipe_data(tmp_path / "d.npz", loss=loss))
        assert primary_metric(path) == metric
        config = SequencesConfig(train=str(tmp_path / "d.npz"), loss=loss)
        assert TASKS.get("sequences").cls.for_config(config).primary_metric == metric


@pytest.mark.parametrize("loss", ["bce", "mse", "cross_entropy"])
def test_each_loss_describes_every_metric_it_logs(tmp_path: Path, loss: str):
    arrays = delayed_copy()
    if loss == "cross_entropy":  # a class per step: the first bit
        arrays["targets"] = arrays["targets"][..., 0].astype(np.int64)
    np.savez(tmp_path / "d.npz", **arrays)
    task = task_of(tmp_path / "d.npz", loss=loss)
    assert type(task) is TASKS.get("sequences").cls.for_config(task.config)
    check_metrics_described(task)


def test_plots_label_the_metric_of_the_runs_loss(tmp_path: Path, runs_dir: Path):
    np.savez(tmp_path / "d.npz", **delayed_copy())
    data = recipe_data(tmp_path / "d.npz", loss="mse")
    data["train"]["steps"] = 5
    assert (
        cli("train", write_recipe(tmp_path / "r.yaml", data), "--runs-dir", runs_dir).exit_code == 0
    )
    series = [Series("seq", [runs_dir / "seq"], from_sweep=False)]
    assert (
        metric_label(series, "squared_error") == "squared_error (squared error summed per sequence)"
    )


@pytest.mark.slow
def test_the_docs_example_learns(tmp_path: Path):
    """The page's commands, as a user runs them from a checkout: the loss falls by far."""
    commands = run_page_commands("your-data.md", tmp_path)
    assert [c.split()[:2] for c in commands] == [
        ["python", "examples/make_sequences.py"],
        ["memctl", "train"],
        ["memctl", "eval"],
    ]
    metrics = pd.read_csv(tmp_path / "runs/sequences_lstm/metrics.csv")
    assert metrics["loss"].iloc[-1] < metrics["loss"].iloc[0] / 10
    assert metrics["level"].iloc[0] == 6 and metrics["level"].iloc[-1] == 12
    evals = pd.read_csv(tmp_path / "runs/sequences_lstm/eval.csv")
    assert evals["bit_errors"].iloc[-1] < 1
