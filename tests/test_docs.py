"""The docs site builds with ``mkdocs build --strict`` (a broken link, anchor or API reference
fails the suite), and its recipe reference is generated from the schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memctl import catalog
from memctl.errors import UserError
from memctl.registry import MODELS, TASKS
from tests.conftest import import_file

ROOT = Path(__file__).resolve().parent.parent

for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
    pytest.importorskip(module, reason="the docs extra: pip install -e '.[docs]'")


def _hook():
    return import_file(ROOT / "docs/hooks/catalog_tables.py", "catalog_tables")


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_docs_build_strict(tmp_path: Path):
    result = _build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    reference = (tmp_path / "site/recipes/index.html").read_text()
    assert "train.lr_decay.after_curriculum" in reference
    assert (
        "memctl.models.addressing.content_weights"
        in (tmp_path / "site/api/models/index.html").read_text()
    )


def test_a_broken_link_fails_the_build(tmp_path: Path):
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "recipes", copy / "recipes")
    with (copy / "docs/index.md").open("a") as page:
        page.write("\nSee [the missing page](no-such-page.md).\n")
    result = _build(copy, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


def test_recipe_reference_has_every_setting():
    text = _hook().render("recipe-sections", [], "recipes.md")
    for section in catalog.recipe_sections():
        for setting in section.settings:
            assert f"| `{setting.key}` |" in text


def test_model_and_task_tables_have_every_field():
    hook = _hook()
    models = hook.render("models", [], "models.md")
    tasks = hook.render("tasks", ["copy"], "tasks.md")
    for name in MODELS.names():
        assert f"`model.type: {name}`" in models
    for field in MODELS.get("ntm").config.model_fields:
        assert f"| `{field}` |" in models
    assert "`task.type: copy`" in tasks and "`task.type: ngrams`" not in tasks
    assert "Curriculum parameter `max_length`" in tasks
    assert TASKS.get("copy").config.model_fields.keys() <= {
        line.split("`")[1] for line in tasks.splitlines() if line.startswith("| `")
    }


def test_unknown_marker_or_name_stops_the_build():
    hook = _hook()
    with pytest.raises(ValueError, match=r"page\.md: unknown marker memctl:recipe-section"):
        hook.render("recipe-section", [], "page.md")
    with pytest.raises(UserError, match=r"model\.type: 'ntn' is not registered"):
        hook.render("models", ["ntn"], "page.md")
