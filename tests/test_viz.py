"""memctl plot, memctl inspect, the models' trace contract, and TensorBoard logging."""

from __future__ import annotations

import copy
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from memctl import viz
from memctl.registry import MODELS, TASKS
from memctl.sweep import write_trials_csv
from tests.conftest import TINY, cli, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# model type -> (model section, task section) small enough to train in a second or two
MODEL_CASES = {
    "lstm": ({"type": "lstm", "hidden": 8}, TINY["task"]),
    "ntm": (
        {"type": "ntm", "controller_size": 8, "memory_size": 40, "word_size": 4, "read_heads": 2},
        TINY["task"],
    ),
    "sam": (
        {"type": "sam", "controller_size": 8, "memory_size": 4096, "word_size": 4, "read_heads": 2},
        TINY["task"],
    ),
    "ham": (
        {"type": "ham", "tree_size": 4, "controller_size": 4, "mlp_hidden": 4},
        {"type": "min", "key_bits": 3, "value_bits": 3, "n": 4},
    ),
    "rnn_ln_fw": ({"type": "rnn_ln_fw", "hidden": 8}, {"type": "associative_retrieval"}),
    "dnc": (
        {"type": "dnc", "controller_size": 8, "memory_size": 8, "word_size": 4, "read_heads": 2},
        TINY["task"],
    ),
}
# Every registered model type that has a case; a model not in this checkout is skipped.
MODEL_TYPES = [
    pytest.param(name, marks=pytest.mark.skipif(name not in MODELS, reason=f"no {name} model"))
    for name in MODEL_CASES
]
# The LSTM has no trace: inspect shows its inputs and outputs only.
TRACED_TYPES = [param for param in MODEL_TYPES if param.values[0] != "lstm"]


def tiny_recipe_for(model_type: str, name: str) -> dict:
    data = copy.deepcopy(TINY)
    data["name"] = name
    data["model"], data["task"] = copy.deepcopy(MODEL_CASES[model_type])
    task = TASKS.get(data["task"]["type"])
    level_field = task.cls.level_field
    level = data["task"].get(level_field, task.config.model_fields[level_field].default)
    data["curriculum"] = {"type": "step", "start": max(level - 1, 1), "every": 3}
    data["train"] = {"steps": 6, "batch_size": 4, "log_every": 2, "checkpoint_every": 6}
    data["eval"] = {"lengths": [], "batches": 1}
    return data


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One tiny trained run per model type present, trained on first use."""
    root = tmp_path_factory.mktemp("viz")
    runs: dict[str, Path] = {}

    def run_for(model_type: str) -> Path:
        if model_type not in runs:
            recipe = write_recipe(
                root / f"{model_type}.yaml", tiny_recipe_for(model_type, model_type)
            )
            result = cli("train", recipe, "--runs-dir", root / "runs")
            assert result.exit_code == 0, result.output
            runs[model_type] = root / "runs" / model_type
        return runs[model_type]

    return run_for


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path: Path) -> None:
    width, height = png_size(path)
    assert 300 <= width <= 2500 and 200 <= height <= 1500, (path, width, height)
    assert 3_000 < path.stat().st_size < 400_000, (path, path.stat().st_size)


# -- the trace contract ------------------------------------------------------------------

CONTRACT_RANKS = {"read_weights": 4, "write_weights": 4, "memory": 4, "usage": 3,
                  "allocation": 4, "link": 4, "precedence": 3, "leaf_attention": 3,
                  "fast_weight_norm": 2, "hidden": 3, "slots": 3}  # fmt: skip


@pytest.mark.parametrize("model_type", TRACED_TYPES)
def test_trace_matches_forward_and_contract(model_type: str):
    model_section, task_section = MODEL_CASES[model_type]
    entry, task_entry = MODELS.get(model_type), TASKS.get(task_section["type"])
    task = task_entry.cls(task_entry.config.model_validate(task_section))
    model = entry.cls(entry.config.model_validate(model_section), task.input_size, task.output_size)
    batch = task.sample(
        3, torch.Generator().manual_seed(0), max_level=task.level, min_level=task.level
    )
    model.eval()
    with torch.no_grad():
        expected, _ = model(batch.inputs)
        logits, quantities = model.trace(batch.inputs)
    assert torch.allclose(logits, expected, atol=1e-6)
    steps = batch.inputs.shape[0]
    assert quantities and set(quantities) <= set(CONTRACT_RANKS)
    for name, value in quantities.items():
        assert value.dim() == CONTRACT_RANKS[name], name
        assert value.shape[0] == steps + (name == "memory") and value.shape[1] == 3, name
    for name in ("read_weights", "write_weights", "leaf_attention"):
        if name in quantities:  # weightings: non-negative, at most 1 in all
            assert quantities[name].min() >= 0 and quantities[name].sum(-1).max() <= 1 + 1e-5


def test_fast_weight_norm_is_the_frobenius_norm_of_the_explicit_matrix():
    from memctl.models.fast_weights import FastWeightsConfig, FastWeightsRNN

    model = FastWeightsRNN(FastWeightsConfig(hidden=6, explicit=True), 5, 3).eval()
    inputs = torch.randn(7, 2, 5)
    with torch.no_grad():
        _, quantities = model.trace(inputs)
        state = model.initial_state(inputs)
        driven = model.input(inputs)
        norms = []
        for step in range(inputs.shape[0]):
            state = model.step(driven[step], state)
            norms.append(torch.linalg.matrix_norm(state.fast_weights))  # A(t) the step used
    assert torch.allclose(quantities["fast_weight_norm"], torch.stack(norms))


# -- inspect -------------------------------------------------------------------------------


def expected_panels(quantities: dict[str, torch.Tensor]) -> dict[str, int]:
    panels = {"io.png": 3}
    for name, value in quantities.items():
        if name == "slots":  # the row labels of the others
            continue
        heads = value.shape[1] if name in ("read_weights", "write_weights", "allocation") else 1
        panels[f"{name}.png"] = 2 if name == "memory" else heads
    if "read_weights" in quantities and "write_weights" in quantities:
        panels["heads.png"] = panels["read_weights.png"] + panels["write_weights.png"]
    return panels


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inspect_figures_for_every_model(
    trained: Callable[[str], Path], model_type: str, tmp_path: Path
):
    run = trained(model_type)
    trace = viz.trace_sample(run, "last", None, seed=0)
    written = viz.plot_trace(trace, tmp_path)
    panels = {w.path.name: w.panels for w in written}
    assert panels == expected_panels(trace.quantities)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(panels)
    for item in written:
        assert_sensible_png(item.path)
    assert trace.inputs.shape[0] == trace.outputs.shape[0] == trace.targets.shape[0]
    if model_type == "ntm":
        assert {"read_weights", "write_weights", "memory"} <= trace.quantities.keys()
        assert trace.quantities["read_weights"].shape[1] == 2  # two read heads: two panels
    if model_type == "lstm":
        assert trace.quantities == {}  # no trace method: inputs, targets and outputs only


def test_inspect_command_writes_into_the_run_and_prints_paths(trained):
    run = trained("ham")
    result = cli("inspect", run, "--checkpoint", "step_6", "--length", "3", "--seed", "5")
    assert result.exit_code == 0, result.output
    printed = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in printed] == ["io.png", "leaf_attention.png"]
    assert all(p.parent == run / "inspect" and p.is_file() for p in printed)
    trace = viz.trace_sample(run, "6", 3, seed=5)
    assert trace.level == 3 and trace.step == 6
    assert trace.inputs.shape[0] == 3 + 1  # min: three items, then one answer step
    assert trace.quantities["leaf_attention"].shape == (4, 4)  # 3 items -> 4 leaves


def test_inspect_sample_is_seeded(trained):
    run = trained("lstm")
    first, again = viz.trace_sample(run, "last", 4, 1), viz.trace_sample(run, "last", 4, 1)
    other = viz.trace_sample(run, "last", 4, 2)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.outputs, again.outputs)
    assert not torch.equal(first.inputs, other.inputs)
    assert float(first.outputs.min()) >= 0 and float(first.outputs.max()) <= 1  # sigmoid


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--checkpoint", "999"], ["step_999.pt", "no such checkpoint"]),
        (["--checkpoint", "soon"], ["--checkpoint 'soon'"]),
        (["--length", "0"], ["--length 0", "minimum 1"]),
    ],
    ids=["no_such_step", "bad_checkpoint", "bad_length"],
)
def test_inspect_bad_input(trained, tmp_path: Path, args: list[str], needles: list[str]):
    run = trained("lstm")
    result = cli("inspect", run, *args, "--out", tmp_path / "out")
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "out").exists()


def test_inspect_missing_run(tmp_path: Path):
    assert_one_line_error(cli("inspect", tmp_path / "nope"), "nope", "no such run directory")


# -- plot ----------------------------------------------------------------------------------


def test_plot_runs_in_one_figure(trained, tmp_path: Path):
    lstm, ntm = trained("lstm"), trained("ntm")
    result = cli("plot", lstm, ntm)
    assert result.exit_code == 0, result.output
    default = lstm / "plots" / "bit_errors.png"
    assert result.stdout.strip() == str(default)
    assert_sensible_png(default)
    written = viz.plot_curves([lstm, ntm], "loss", "samples", tmp_path / "c.png")
    assert written.panels == 1
    assert written.legend == ("lstm", "ntm", "curriculum level change")
    result = cli("plot", lstm, "--x", "wall_s", "--metric", "loss")
    assert result.exit_code == 0, result.output
    assert_sensible_png(lstm / "plots" / "loss_wall_s.png")


def fake_run(path: Path, rows: list[dict], metric: str = "bit_errors") -> Path:
    path.mkdir(parents=True)
    info = {"name": path.name, "status": "finished", "metric": metric}
    (path / "run.json").write_text(json.dumps(info))
    (path / "recipe.yaml").write_text("name: x\n")
    if rows:
        pd.DataFrame(rows).to_csv(path / "metrics.csv", index=False)
    return path


def curve(scale: float, steps: int = 8, level_from: int | None = None) -> list[dict]:
    return [
        {
            "step": 10 * (i + 1),
            "samples": 40 * (i + 1),
            "wall_s": 1.5 * (i + 1),
            "level": 2 if level_from is None or i < level_from else 3,
            "loss": scale / (i + 1),
            "bit_errors": scale * 10.0**-i,
        }
        for i in range(steps)
    ]


def test_plot_sweep_groups_seeds_into_median_and_band(tmp_path: Path):
    sweep = tmp_path / "sweep"
    rows = []
    for lr in ("0.001", "0.003"):
        for seed in ("0", "1", "2"):
            trial = f"sweep-lr={lr}-seed={seed}"
            steps = 8 if seed != "2" else 5  # a seed still running
            fake_run(sweep / trial, curve(1 + int(seed), steps, level_from=4))
            rows.append({"trial": trial, "status": "finished", "lr": lr, "seed": seed})
    rows.append({"trial": "sweep-lr=0.01-seed=0", "status": "pending", "lr": "0.01", "seed": "0"})
    write_trials_csv(sweep, rows)
    written = viz.plot_curves([sweep], None, "step", None)
    assert written.path == sweep / "plots" / "bit_errors.png"
    assert written.legend == ("lr=0.001 (median of 3 seeds)", "lr=0.003 (median of 3 seeds)",
                              "curriculum level change")  # fmt: skip
    assert_sensible_png(written.path)


def test_log_scale_when_the_metric_spans_decades():
    assert viz.wants_log_scale(pd.Series([0.0, 0.01, 5.0]))
    assert not viz.wants_log_scale(pd.Series([0.0, 0.2, 5.0, 19.0]))
    assert not viz.wants_log_scale(pd.Series([0.0, 0.0]))


def test_plot_tolerates_a_run_still_being_written(tmp_path: Path):
    run = fake_run(tmp_path / "live", curve(1.0, 4))
    with (run / "metrics.csv").open("a") as handle:
        handle.write("50,200,7.5,2,0.1")  # torn: the writer is mid-row
    assert len(viz.read_metrics(run / "metrics.csv")) == 4
    result = cli("plot", run)
    assert result.exit_code == 0, result.output
    assert_sensible_png(run / "plots" / "bit_errors.png")


@pytest.mark.parametrize(
    "content,needles",
    [
        (None, ["metrics.csv", "no such file"]),
        ("", ["metrics.csv", "empty file"]),
        ("step,samples,wall_s,level,loss,bit_errors\n", ["metrics.csv", "no logged rows yet"]),
        ("step,samples,wall_s,level,loss,bit_errors\n10,40,1.", ["no logged rows yet"]),
    ],
    ids=["missing", "empty", "header_only", "torn_only_row"],
)
def test_plot_without_rows_is_one_line(tmp_path: Path, content: str | None, needles: list[str]):
    run = fake_run(tmp_path / "new", [])
    if content is not None:
        (run / "metrics.csv").write_text(content)
    assert_one_line_error(cli("plot", run), *needles)
    assert not (run / "plots").exists()


def test_plot_bad_input(tmp_path: Path):
    run = fake_run(tmp_path / "r", curve(1.0))
    assert_one_line_error(cli("plot", run, "--metric", "acc"), "--metric acc", "not a column")
    assert_one_line_error(cli("plot", run, "--x", "time"), "--x 'time'", "step, wall_s, samples")
    assert_one_line_error(cli("plot", tmp_path / "nope"), "nope", "no such run directory")
    assert_one_line_error(cli("plot", tmp_path), str(tmp_path), "not a memctl run or sweep")


def test_without_matplotlib_commands_say_how_to_install(trained, monkeypatch, tmp_path: Path):
    run = fake_run(tmp_path / "r", curve(1.0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert_one_line_error(cli("plot", run), "pip install 'memctl[plot]'")
    lstm = trained("lstm")
    assert_one_line_error(cli("inspect", lstm, "--out", tmp_path / "o"), "memctl[plot]")
    assert not (tmp_path / "o").exists() and not (run / "plots").exists()


# -- TensorBoard ---------------------------------------------------------------------------


def test_tensorboard_scalars_match_the_csv_logs(tiny_recipe: Path, runs_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--tensorboard",
                 "--set", "train.steps=20")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = runs_dir / "tiny"
    assert (
        "log.tensorboard=true"
        in json.loads((run / "run.json").read_text())["lineage"][0]["overrides"]
    )
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    metrics = pd.read_csv(run / "metrics.csv")
    for column in ("loss", "bit_errors", "level", "lr"):
        scalars = events.Scalars(f"train/{column}")
        assert [s.step for s in scalars] == metrics["step"].tolist()
        assert [s.value for s in scalars] == pytest.approx(metrics[column].tolist(), rel=1e-6)
    evals = pd.read_csv(run / "eval.csv")
    at_6 = evals[evals["level"] == 6]
    scalars = events.Scalars("eval/bit_errors/level_6")
    assert [s.step for s in scalars] == at_6["step"].tolist()
    assert [s.value for s in scalars] == pytest.approx(at_6["bit_errors"].tolist(), rel=1e-6)
    files = sorted((run / "tensorboard").iterdir())
    assert cli("eval", run).exit_code == 0  # eval appends to eval.csv, not to TensorBoard
    assert sorted((run / "tensorboard").iterdir()) == files


def test_tensorboard_hides_events_past_a_truncation(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from memctl.trainer import TensorBoardLog

    log = TensorBoardLog(tmp_path / "tb")
    for step in range(1, 6):
        log.add_metrics({"step": step, "loss": float(step)})
    log.truncate_after(3)  # what resume does after a kill at step 5, checkpoint at 3
    for step in (4, 5):
        log.add_metrics({"step": step, "loss": 10.0 * step})
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]


def test_tensorboard_off_by_default_and_missing_package_is_one_line(
    tiny_recipe: Path, runs_dir: Path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--tensorboard")
    assert_one_line_error(
        result, "tiny.yaml", "log.tensorboard", "pip install 'memctl[tensorboard]'"
    )
    assert snapshot(runs_dir) == {} and list(runs_dir.iterdir()) == []
    result = cli("train", tiny_recipe, "--runs-dir", runs_dir, "--set", "train.steps=10")
    assert result.exit_code == 0, result.output
    assert not (runs_dir / "tiny" / "tensorboard").exists()
    result = cli("resume", runs_dir / "tiny", "--steps", "5", "--tensorboard")
    assert_one_line_error(result, "log.tensorboard", "memctl[tensorboard]")


def test_heads_are_cropped_to_the_circular_run_of_used_slots():
    weights = torch.zeros(6, 1, 64)
    weights[:, 0, 0] = 0.9
    weights[0, 0, 63] = 0.05  # a shift wrapping from slot 0
    weights[5, 0, 10] = 1.0
    assert viz.used_slots(weights) == [61, 62, 63, *range(13)]
    assert viz.used_slots(weights[..., :32]) is None  # small memories are shown whole
    weights[3, 0, [25, 40, 50]] = 0.5  # used slots all around: nothing worth cutting
    assert viz.used_slots(weights) is None
