"""Figures in the format their file name asks for, and curves that show every logged row."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from memctl import viz
from tests.conftest import TINY, cli, snapshot, write_recipe
from tests.test_bad_input import assert_one_line_error
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
