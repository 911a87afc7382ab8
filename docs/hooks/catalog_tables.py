"""mkdocs hook: replaces ``<!-- memctl:KIND [NAME ...] -->`` markers in the docs pages with
tables generated from the schemas at build time (``memctl.catalog``), so the reference
cannot drift from the code.

    <!-- memctl:recipe-sections -->     every recipe section and its fields
    <!-- memctl:models [TYPE ...] -->   registered models (all, or the ones named)
    <!-- memctl:tasks [TYPE ...] -->    registered tasks (all, or the ones named)
    <!-- memctl:recipe-files -->        recipes/*.yaml with their first comment line

An unknown marker or name stops the build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from memctl import catalog
from memctl.registry import MODELS, TASKS

MARKER = re.compile(r"<!-- memctl:([a-z-]+)((?: [A-Za-z0-9_]+)*) -->")
REPOSITORY = Path(__file__).resolve().parents[2]


def _cell(text: str, code: bool = False) -> str:
    """A table cell: a pipe splits cells except inside a code span, so prose escapes it."""
    if not text:
        return ""
    return f"`{text}`" if code else text.replace("|", "\\|")


def _settings_table(settings: list[catalog.Setting]) -> str:
    rows = ["| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    for s in settings:
        cells = [
            _cell(s.key, code=True),
            _cell(s.type, code=True),
            _cell(s.default, code=True),
            _cell(s.bounds, code=True),
            _cell(s.description),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _recipe_sections() -> str:
    blocks = []
    for section in catalog.recipe_sections():
        title = f"`{section.key}`" if section.key else "Top level"
        blocks.append(f"### {title}\n\n{_settings_table(section.settings)}")
    return "\n\n".join(blocks)


def _entries(kind: str, names: list[str]) -> str:
    registry = MODELS if kind == "models" else TASKS
    section = "model" if kind == "models" else "task"
    entries = [e for name in names for e in catalog.registry_entries(registry, name)]
    if not names:
        entries = catalog.registry_entries(registry)
    blocks = []
    for entry in entries:
        lines = [
            f"#### `{section}.type: {entry.name}`",
            "",
            f"`{entry.class_path}`. {entry.summary}",
        ]
        if entry.level_field:
            metrics = ", ".join(f"`{m}`" for m in entry.metrics)
            lines.append(
                f"Curriculum parameter `{entry.level_field}`; metrics {metrics} (the first is "
                "the main one: it picks `best.pt`)."
            )
        lines += ["", _settings_table(entry.settings)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _recipe_files() -> str:
    rows = ["| recipe | first comment line |", "|---|---|"]
    for item in catalog.recipe_files(REPOSITORY / "recipes"):
        rows.append(f"| `recipes/{item.path.name}` | {_cell(item.summary)} |")
    return "\n".join(rows)


def render(kind: str, names: list[str], where: str) -> str:
    """The generated Markdown for one marker."""
    if kind == "recipe-sections" and not names:
        return _recipe_sections()
    if kind in ("models", "tasks"):
        return _entries(kind, names)
    if kind == "recipe-files" and not names:
        return _recipe_files()
    raise ValueError(f"{where}: unknown marker memctl:{kind} {' '.join(names)}".rstrip())


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    where = page.file.src_path
    return MARKER.sub(lambda m: render(m.group(1), m.group(2).split(), where), markdown)
