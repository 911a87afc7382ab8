"""Figures in the format their file name asks for, and curves that show every logged row."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from memctl import viz
from tests.conftest import TINY, cli, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error
from tests.test_cli_conveniences import help_text
from tests.test_viz import PNG_MAGIC, curve, fake_run

MAGIC = {"png": PNG_MAGIC, "pdf": b"%PDF-", "svg": b"<?xml"}


def assert_format(path: Path, fmt: str) -> None:
    data = path.read_bytes()
    assert data.startswith(MAGIC[fmt]), (path, data[:16])
    if fmt == "svg":
        assert b"<svg" in data[:2000]


@pytest.fixture(scope="module")
def trained_lstm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    data = copy.deepcopy(TINY)
    data["train"] = {"steps": 6, "batch_size": 4, "log_every": 2, "checkpoint_every": 6}
    data["eval"] = {"lengths": [], "batches": 1}
    result = cli("train", write_recipe(root / "tiny.yaml", data), "--runs-dir", root / "runs")
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny"


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_plot_out_extension_sets_the_format(tmp_path: Path, fmt: str):
    run = fake_run(tmp_path / "r", curve(1.0))
    out = tmp_path / f"curves.{fmt.upper() if fmt == 'pdf' else fmt}"
    result = cli("plot", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert_format(out, fmt)


@pytest.mark.parametrize("name", ["c.gif", "c", "c.png.bak"])
def test_plot_out_with_another_extension_is_one_line(tmp_path: Path, name: str):
    run = fake_run(tmp_path / "r", curve(1.0))
    before = snapshot(tmp_path)
    assert_one_line_error(cli("plot", run, "--out", tmp_path / name), "--out", ".png, .pdf or .svg")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_inspect_format_option(trained_lstm: Path, tmp_path: Path, fmt: str):
    result = cli("inspect", trained_lstm, "--format", fmt, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    printed = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in printed] == [f"io.{fmt}"]
    assert_format(printed[0], fmt)


def test_inspect_unknown_format_is_one_line(trained_lstm: Path, tmp_path: Path):
    before = snapshot(trained_lstm)
    result = cli("inspect", trained_lstm, "--format", "gif", "--out", tmp_path / "out")
    assert_one_line_error(result, "--format 'gif'", "png, pdf, svg")
    assert not (tmp_path / "out").exists()
    assert snapshot(trained_lstm) == before


def drawn_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures viz saves from now on, to look at what was drawn."""
    figures = []
    save = viz._save

    def keep(figure, path):
        figures.append(figure)
        return save(figure, path)

    monkeypatch.setattr(viz, "_save", keep)
    return figures


def test_a_run_with_one_row_is_plotted_as_a_point(tmp_path: Path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    one, many = fake_run(tmp_path / "one", curve(1.0, 1)), fake_run(tmp_path / "many", curve(2.0))
    result = cli("plot", one, many, "--out", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    single, line = figures[0].axes[0].get_lines()[:2]
    assert len(single.get_xdata()) == 1
    assert single.get_marker() not in ("None", "", " ", None) and single.get_markersize() > 0
    assert len(line.get_xdata()) == 8 and line.get_marker() == "None"


def copy_run(path: Path, rows: list[dict], evals: list[dict] | None = None) -> Path:
    """A fake copy-task run: run.json names its task, as the trainer's does."""
    run = fake_run(path, rows)
    (run / "run.json").write_text(json.dumps({"status": "finished", "metric": "bit_errors",
                                              "task": "copy"}))  # fmt: skip
    if evals is not None:
        pd.DataFrame(evals).to_csv(run / "eval.csv", index=False)
    return run


def eval_row(step: int, level: int, bit_errors: float) -> dict:
    return {"step": step, "checkpoint": "final" if step == 30 else "", "level": level,
            "loss": 0.1, "cost_bits": 1.0, "bit_errors": bit_errors, "accuracy": 0.0,
            "sequences": 8}  # fmt: skip


def test_plot_eval_draws_one_line_per_level_against_step(tmp_path: Path, monkeypatch):
    evals = [eval_row(step, level, step * level / 10) for step in (10, 20, 30) for level in (4, 8)]
    evals.append(eval_row(30, 4, 0.5))  # memctl eval later, same checkpoint: the latest counts
    run = copy_run(tmp_path / "r", curve(1.0), evals)
    figures = drawn_figures(monkeypatch)
    result = cli("plot", run, "--eval")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run / "plots" / "eval_bit_errors.png")
    assert_format(run / "plots" / "eval_bit_errors.png", "png")
    axes = figures[0].axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert list(lines) == ["r, level 4", "r, level 8"]
    assert list(lines["r, level 4"].get_xdata()) == [10, 20, 30]
    assert list(lines["r, level 4"].get_ydata()) == [4.0, 8.0, 0.5]
    assert list(lines["r, level 8"].get_ydata()) == [8.0, 16.0, 24.0]
    assert axes.get_xlabel() == "training step"
    assert axes.get_ylabel() == "bit_errors (wrong bits per sequence)"
    assert axes.get_title() == "evaluation bit_errors against training step"


def test_plot_y_axis_names_the_metrics_unit(tmp_path: Path, monkeypatch):
    run = copy_run(tmp_path / "r", curve(1.0))
    figures = drawn_figures(monkeypatch)
    assert cli("plot", run, "--out", tmp_path / "a.png").exit_code == 0
    assert cli("plot", run, "--metric", "loss", "--out", tmp_path / "b.png").exit_code == 0
    assert figures[0].axes[0].get_ylabel() == "bit_errors (wrong bits per sequence)"
    assert figures[1].axes[0].get_ylabel() == "loss"  # no task metric: no description


def test_plot_smooth_is_a_moving_average_over_logged_rows(tmp_path: Path, monkeypatch):
    run = copy_run(tmp_path / "r", curve(1.0, 6))
    figures = drawn_figures(monkeypatch)
    result = cli("plot", run, "--metric", "loss", "--smooth", 3, "--out", tmp_path / "s.svg")
    assert result.exit_code == 0, result.output
    axes = figures[0].axes[0]
    losses = [1.0 / (i + 1) for i in range(6)]
    expected = [sum(losses[max(0, i - 2) : i + 1]) / len(losses[max(0, i - 2) : i + 1])
                for i in range(6)]  # fmt: skip
    assert list(axes.get_lines()[0].get_ydata()) == pytest.approx(expected)
    assert axes.get_title().endswith("moving average of 3 rows")
    text = " ".join(help_text("plot").replace("│", " ").split())
    assert "--smooth <int> Moving average of each run's metric over this many logged rows" in text
    assert "--eval Plot eval.csv's metric against step instead" in text


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--smooth", "0"], ["--smooth 0", "at least 1"]),
        (["--eval", "--x", "wall_s"], ["--x 'wall_s'", "step only"]),
        (["--eval"], ["eval.csv", "no such file"]),
    ],
    ids=["smooth_zero", "eval_wall_s", "no_eval_csv"],
)
def test_plot_eval_and_smooth_bad_input(tmp_path: Path, args: list[str], needles: list[str]):
    run = copy_run(tmp_path / "r", curve(1.0))
    before = snapshot(tmp_path)
    assert_one_line_error(cli("plot", run, *args), *needles)
    assert snapshot(tmp_path) == before
