"""The schema walker (memctl.catalog) and the commands built on it: models, tasks, recipes."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

import memctl.cli
from memctl import catalog
from memctl.recipe import Recipe
from memctl.registry import MODELS, TASKS
from tests.conftest import cli, snapshot

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps tables to 80 columns off a terminal; the assertions read whole lines."""
    monkeypatch.setattr(memctl.cli.console, "_width", 250)


def _by_key(settings: list[catalog.Setting]) -> dict[str, catalog.Setting]:
    return {s.key: s for s in settings}


def test_every_field_of_every_registered_config_appears():
    for registry in (MODELS, TASKS):
        entries = {e.name: e for e in catalog.registry_entries(registry)}
        assert sorted(entries) == registry.names()
        for name, entry in entries.items():
            fields = set(registry.get(name).config.model_fields)
            assert {s.key for s in entry.settings} == fields, name
            assert entry.settings[0].key == "type"


def test_every_recipe_section_and_field_appears():
    sections = {s.key: s for s in catalog.recipe_sections()}
    assert list(sections) == [
        "",
        "curriculum",
        "train",
        "train.optimizer",
        "train.clip",
        "train.lr_decay",
        "eval",
        "log",
        "reference",
        "reference.at",
    ]
    assert {s.key for s in sections[""].settings} == {"name", "seed", "device"}
    reference = {s.key for s in sections["reference"].settings}
    assert reference == {"reference.source", "reference.metric", "reference.value",
                         "reference.lower_is_better", "reference.note"}  # fmt: skip
    for key in ("curriculum", "eval", "log", "train.optimizer", "train.clip", "train.lr_decay",
                "reference.at"):  # fmt: skip
        schema = Recipe.model_fields[key.split(".")[0]].annotation
        if key == "reference.at":  # in a list of sections: its entries' schema
            schema = typing.get_args(schema)[0]
        for part in key.split(".")[1:]:
            schema = schema.model_fields[part].annotation
        expected = {f"{key}.{name}" for name in schema.model_fields}
        assert {s.key for s in sections[key].settings} == expected


def test_a_known_field_has_its_type_default_bounds_and_description():
    dnc = catalog.registry_entries(MODELS, "dnc")[0]
    memory = _by_key(dnc.settings)["memory_size"]
    assert (memory.type, memory.default, memory.bounds) == ("int", "32", ">= 1")
    assert memory.description == "N, memory slots"
    clip = _by_key(dnc.settings)["controller_clip"]
    assert (clip.type, clip.default, clip.bounds) == ("float | null", "20.0", "> 0")

    train = {s.key: s for s in catalog.recipe_sections()}["train.optimizer"]
    momentum = _by_key(train.settings)["train.optimizer.momentum"]
    assert (momentum.default, momentum.bounds) == ("0.0", ">= 0, < 1")
    assert _by_key(train.settings)["train.optimizer.name"].type == "adam | rmsprop | sgd"
    assert _by_key(train.settings)["train.optimizer.betas"].default == "[0.9, 0.999]"
    top = _by_key(catalog.recipe_sections()[0].settings)
    assert top["name"].default == "required"
    assert top["name"].bounds.startswith("matches ^[A-Za-z0-9]")
    lengths = _by_key({s.key: s for s in catalog.recipe_sections()}["eval"].settings)
    assert lengths["eval.lengths"].default == "[]"


def test_a_task_names_its_curriculum_parameter_and_main_metric_first():
    retrieval = catalog.registry_entries(TASKS, "associative_retrieval")[0]
    assert retrieval.level_field == "pairs"
    assert retrieval.metrics == ("error", "cost_bits", "accuracy")
    assert catalog.registry_entries(MODELS, "lstm")[0].level_field is None


def test_summaries_are_the_entry_own_docstrings_not_inherited_ones():
    lstm = catalog.registry_entries(MODELS, "lstm")[0]
    assert lstm.summary.startswith("LSTM baseline (Hochreiter & Schmidhuber 1997)")
    assert "Base class for all neural network modules" not in lstm.summary


def test_first_comment_line(tmp_path: Path):
    (tmp_path / "b.yaml").write_text("\n#   Second recipe.\n# more\nname: b\n")
    (tmp_path / "a.yaml").write_text("name: a  # not a leading comment\n")
    (tmp_path / "notes.txt").write_text("# not a recipe\n")
    files = catalog.recipe_files(tmp_path)
    assert [(f.path.name, f.summary) for f in files] == [
        ("a.yaml", ""),
        ("b.yaml", "Second recipe."),
    ]


def test_models_command_lists_every_model_with_its_fields(wide_console: None):
    result = cli("models")
    assert result.exit_code == 0, result.output
    for name in MODELS.names():
        assert f"{name}  (memctl.models." in result.output
    assert "attend_current" in result.output and "memory_init_value" in result.output


def test_models_command_one_entry(wide_console: None):
    result = cli("models", "dnc")
    assert result.exit_code == 0, result.output
    assert "memctl.models.dnc.model.DNCModel" in result.output
    assert "N, memory slots" in result.output
    assert "memctl.models.ntm" not in result.output


def test_tasks_command_shows_curriculum_parameter_and_metrics(wide_console: None):
    result = cli("tasks", "copy")
    assert result.exit_code == 0, result.output
    assert "curriculum parameter: max_length" in result.output
    assert "metrics: bit_errors (main), cost_bits, accuracy" in result.output
    assert "associative_retrieval" not in result.output
    everything = cli("tasks")
    assert all(f"{name}  (memctl.tasks." in everything.output for name in TASKS.names())


def test_unknown_model_or_task_is_one_error_line(tmp_path: Path):
    before = snapshot(tmp_path)
    for command, wrong in (("models", "dn"), ("tasks", "cpy")):
        result = cli(command, wrong)
        assert result.exit_code == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert "did you mean" in lines[0]
    assert snapshot(tmp_path) == before


def test_recipes_command_lists_the_repository_recipes(wide_console: None):
    result = cli("recipes", RECIPES)
    assert result.exit_code == 0, result.output
    for path in RECIPES.glob("*.yaml"):
        assert path.name in result.output
    assert "LSTM baseline on the NTM copy task" in result.output


def test_recipes_command_on_a_missing_or_empty_folder(tmp_path: Path):
    missing = cli("recipes", tmp_path / "nowhere")
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such directory"
    empty = cli("recipes", tmp_path)
    assert empty.exit_code == 0
    assert "no recipes in" in empty.output


def test_recipes_command_defaults_to_the_recipes_folder(
    monkeypatch: pytest.MonkeyPatch, wide_console: None
):
    monkeypatch.chdir(RECIPES.parent)
    result = cli("recipes")
    assert result.exit_code == 0, result.output
    assert "recipes/ntm_copy.yaml" in result.output
    assert "recipes/sweep_fw.yaml" in result.output
