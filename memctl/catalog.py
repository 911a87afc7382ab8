"""What a recipe can say, read from the schemas themselves: every recipe section of
``memctl.recipe`` and every registered model's and task's config, field by field (type,
default, bounds, description), and the recipe files of a folder with their first comment
line.

One walker serves ``memctl models``, ``memctl tasks``, ``memctl recipes`` and the
generated recipe reference of the docs site, so none of them can drift from the code.
Plain data only: no printing, no files written.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from memctl.errors import UserError
from memctl.recipe import Recipe
from memctl.registry import Registry

# Recipe fields whose schema depends on the type they name: documented per entry instead.
TYPED_SECTIONS = ("model", "task")

BOUND_SYMBOLS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


@dataclass(frozen=True)
class Setting:
    """One field of a schema, rendered for people: ``key`` is its dotted recipe key
    (``train.optimizer.lr``), ``default`` is ``"required"`` where there is none."""

    key: str
    type: str
    default: str
    bounds: str
    description: str


@dataclass(frozen=True)
class SectionDoc:
    """The fields of one recipe section (``train``, ``train.optimizer``, ...)."""

    key: str
    settings: list[Setting]


@dataclass(frozen=True)
class EntryDoc:
    """One registered model or task: its ``type`` name, class, summary and settings
    (keys relative to its section: ``hidden``, not ``model.hidden``). A task also names
    its curriculum parameter and its metrics, the main one first; a model has neither."""

    name: str
    class_path: str
    summary: str
    settings: list[Setting]
    level_field: str | None = None
    metrics: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecipeFile:
    """A recipe or sweep file and the first line of its leading comment."""

    path: Path
    summary: str


def type_name(annotation: Any) -> str:
    """``Literal["a", "b"]`` -> ``a | b``, ``int | None`` -> ``int | null``: the values a
    YAML recipe may write."""
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        inner = ", ".join(type_name(a) for a in args)
        return f"list[{inner}]" if origin is list else f"[{inner}]"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return annotation.__name__
    return str(annotation)


def yaml_value(value: Any) -> str:
    """A default as a recipe would write it: ``null``, ``true``, ``[0.9, 0.999]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return str(value)


def default_of(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return yaml_value(field.default_factory())  # type: ignore[call-arg]
    if field.default is PydanticUndefined:
        return "required"
    return yaml_value(field.default)


def bounds_of(field: FieldInfo) -> str:
    """``> 0``, ``>= 0, < 1``, or the pattern a string must match; empty when unbounded."""
    parts = []
    for meta in field.metadata:
        for kind, attribute, symbol in BOUND_SYMBOLS:
            if isinstance(meta, kind):
                parts.append(f"{symbol} {getattr(meta, attribute)}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            parts.append(f"matches {pattern}")
    return ", ".join(parts)


def _nested_schema(field: FieldInfo) -> type[BaseModel] | None:
    """The section a field holds: its own schema, or its entries' for a list of sections
    (``reference``)."""
    annotation = field.annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def settings_of(schema: type[BaseModel], prefix: str = "") -> list[Setting]:
    """Every scalar field of ``schema`` (nested sections are walked by ``recipe_sections``),
    ``type`` first: it picks the schema of a model or task section."""
    names = sorted(schema.model_fields, key=lambda name: name != "type")
    settings = []
    for name in names:
        field = schema.model_fields[name]
        if _nested_schema(field) is not None:
            continue
        settings.append(
            Setting(
                key=f"{prefix}{name}",
                type=type_name(field.annotation),
                default=default_of(field),
                bounds=bounds_of(field),
                description=field.description or "",
            )
        )
    return settings


def _summary(obj: Any) -> str:
    """The first paragraph of ``obj``'s own docstring (not an inherited one), on one line."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split())


def recipe_sections() -> list[SectionDoc]:
    """The recipe's top-level fields (key ``""``), then every section and subsection in
    schema order: ``curriculum``, ``train``, ``train.optimizer``, ..., ``log``."""
    top = [s for s in settings_of(Recipe) if s.key not in TYPED_SECTIONS]
    sections = [SectionDoc("", top)]

    def walk(schema: type[BaseModel], key: str) -> None:
        sections.append(SectionDoc(key, settings_of(schema, f"{key}.")))
        for name, field in schema.model_fields.items():
            nested = _nested_schema(field)
            if nested is not None:
                walk(nested, f"{key}.{name}")

    for name, field in Recipe.model_fields.items():
        nested = _nested_schema(field)
        if name not in TYPED_SECTIONS and nested is not None:
            walk(nested, name)
    return sections


def registry_entries(registry: Registry, name: str | None = None) -> list[EntryDoc]:
    """Every entry of ``registry`` (``MODELS`` or ``TASKS``), or the one called ``name``
    (a UserError with a "did you mean" hint when there is none)."""
    names = registry.names() if name is None else [registry.get(name).name]
    entries = []
    for entry_name in names:
        entry = registry.get(entry_name)
        module = inspect.getmodule(entry.cls)
        summary = _summary(entry.cls) or _summary(module)
        primary = getattr(entry.cls, "primary_metric", None)
        metrics = getattr(entry.cls, "metric_names", ())
        entries.append(
            EntryDoc(
                name=entry_name,
                class_path=f"{entry.cls.__module__}.{entry.cls.__name__}",
                summary=summary,
                settings=settings_of(entry.config),
                level_field=getattr(entry.cls, "level_field", None),
                metrics=tuple(sorted(metrics, key=lambda m: m != primary)),
            )
        )
    return entries


def first_comment_line(path: Path) -> str:
    """The text of the file's first ``#`` line before any YAML, or ``""``."""
    for line in path.read_text(errors="replace").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip()
        if stripped:
            return ""
    return ""


def recipe_files(directory: Path) -> list[RecipeFile]:
    """The ``*.yaml`` files of ``directory``, sorted by name, with their first comment."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    return [RecipeFile(path, first_comment_line(path)) for path in sorted(directory.glob("*.yaml"))]
