"""Recipe schema, YAML loading, dotted ``--set`` overrides, errors that name the field.

A recipe is validated in two phases: the ``model`` and ``task`` sections by the schema
their ``type`` names in the registries, then everything else by ``Recipe``. Any problem
becomes one ``UserError`` line: ``<file>: <dotted.field>: <what was expected>``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
)

import memctl.models
import memctl.tasks  # noqa: F401  (registers the tasks)
from memctl.errors import UserError
from memctl.models.base import ModelConfig
from memctl.registry import MODELS, TASKS, Registry
from memctl.tasks.base import TaskConfig

# Run and trial names become directory names: no separators, no leading dot.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._=+,-]{0,127}$"


# The devices a run can ask for; ``auto`` is CUDA when present, else the CPU.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerSection(Section):
    name: Literal["adam", "rmsprop", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="rmsprop and sgd")
    alpha: float = Field(0.99, gt=0, lt=1, description="rmsprop smoothing constant")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class ClipSection(Section):
    value: float | None = Field(None, gt=0, description="element-wise gradient clip")
    norm: float | None = Field(None, gt=0, description="global gradient-norm clip")


class LrDecaySection(Section):
    metric: str | None = Field(
        None, description="metrics.csv column watched; null: the learning rate stays fixed"
    )
    threshold: float = 0.5
    mode: Literal["below", "above"] = "below"
    window: int = Field(4, ge=1, description="logged rows averaged")
    factor: float = Field(0.5, gt=0, lt=1, description="lr multiplier each time it passes")
    min_lr: float = Field(1e-5, gt=0)
    after_curriculum: bool = Field(
        False, description="watch only rows logged at the curriculum's last level"
    )


class TrainSection(Section):
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(32, gt=0)
    optimizer: OptimizerSection = OptimizerSection()
    clip: ClipSection = ClipSection()
    lr_decay: LrDecaySection = LrDecaySection()
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate at the end only")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(3, ge=1)
    on_nan: Literal["skip", "rollback", "stop"] = "rollback"
    max_nan_in_a_row: int = Field(3, ge=1)
    compile: bool = Field(
        False,
        description="torch.compile the model's per-time-step cell (models with compile_step)",
    )
    tbptt: int | None = Field(
        None,
        gt=0,
        description="truncated backpropagation through time: the batch runs in chunks of "
        "this many time steps, each starting from the previous one's state (detached), with "
        "one backward per chunk and one optimizer step per batch; null: the whole sequence. "
        "For tasks scored along the sequence, not only at its end",
    )
    burn_in: int = Field(
        0,
        ge=0,
        description="at most this many unscored batches before each training batch, their "
        "number drawn uniformly from 0 to it each step, run without gradient and drawn like "
        "the batch, which starts from the state they leave (memory and controller): training "
        "sees the memory as longer sequences leave it",
    )


class CurriculumSection(Section):
    type: Literal["fixed", "step", "adaptive"] = "fixed"
    start: int | None = Field(None, ge=1, description="default: the task's minimum")
    increment: int = Field(1, ge=1)
    every: int = Field(1000, ge=1, description="step: steps between increments")
    max: int | None = Field(None, ge=1, description="default: the task's own parameter")
    metric: str = Field("bit_errors", description="adaptive: metrics.csv column watched")
    threshold: float = 0.1
    mode: Literal["below", "above"] = Field("below", description="adaptive: pass direction")
    window: int = Field(10, ge=1, description="adaptive: logged rows averaged")
    mix: Literal["uniform", "level", "batch"] = Field(
        "uniform",
        description="uniform: each sequence's level from the task minimum up to the level; "
        "level: all at the level; batch: one level per batch, drawn like uniform",
    )


class EvalSection(Section):
    lengths: list[int] = Field(default_factory=list, description="extra levels to evaluate")
    batches: int = Field(10, ge=1)
    batch_size: int | None = Field(None, ge=1, description="default: train.batch_size")
    seed: int = 12345


class LogSection(Section):
    tensorboard: bool = Field(
        False,
        description="also write metrics.csv's and eval.csv's rows as TensorBoard scalars",
    )
    mlflow: bool = Field(
        False,
        description="also log the recipe, metrics.csv's and eval.csv's rows and the final "
        "checkpoint to MLflow (MLFLOW_TRACKING_URI, default ./mlruns)",
    )


class ReferenceAt(Section):
    level: int = Field(
        ge=1, description="the eval.csv level it holds at (sequence length, n, items, ...)"
    )


class ReferenceSection(Section):
    source: str = Field(min_length=1, description="the paper, table or figure it comes from")
    metric: str = Field(description="an eval.csv column of the task, e.g. bit_errors")
    value: float = Field(description="the figure to reach")
    at: ReferenceAt
    lower_is_better: bool | None = Field(
        None,
        description="true: met below value; false: met at value or above "
        "(default: the metric's own direction)",
    )
    note: str | None = None

    def condition(self) -> str:
        """``bit_errors < 1 at level 50``."""
        sign = "<" if self.lower_is_better else ">="
        return f"{self.metric} {sign} {self.value:g} at level {self.at.level}"

    def met_by(self, value: float) -> bool:
        """Whether ``value`` meets the reference (never a NaN)."""
        return value < self.value if self.lower_is_better else value >= self.value


class Recipe(Section):
    name: str = Field(pattern=NAME_PATTERN)
    seed: int = 0
    device: str = Field(
        "auto", pattern=DEVICE_PATTERN, description="auto (CUDA when present), cpu, cuda, cuda:N"
    )
    model: SerializeAsAny[ModelConfig]
    task: SerializeAsAny[TaskConfig]
    curriculum: CurriculumSection = CurriculumSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    log: LogSection = LogSection()
    reference: list[ReferenceSection] = Field(
        default_factory=list,
        description="the paper's or seed's figures this recipe should reach: a list of "
        "entries (or one mapping), each checked by memctl eval and memctl report",
    )

    @field_validator("reference", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    def resolved(self) -> dict[str, Any]:
        """Every setting, defaults included, as plain data."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A hash of what trains: the references, targets rather than settings, stay out."""
        data = self.resolved()
        data.pop("reference")
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) schema that ``loc`` points into."""
    for part in loc:
        if isinstance(part, int):  # an entry of a list of sections
            continue
        field = schema.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        schema = annotation
    return list(schema.model_fields)


def _format_error(schema: type[BaseModel], error: dict, prefix: str) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in (*([prefix] if prefix else []), *loc)) or "(top level)"
    if error["type"] == "extra_forbidden":
        known = _fields_at(schema, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{path}: unknown key{suggestion} (known: {', '.join(known)})"
    message = error["msg"]
    if error["type"] != "missing" and not isinstance(error.get("input", {}), dict):
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"


def _validate(schema: type[BaseModel], data: Any, prefix: str, source: str) -> Any:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        # A misspelt key also leaves its field missing: name the misspelling, it is the fix.
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise UserError(f"{source}: {_format_error(schema, errors[0], prefix)}") from None


def _section_config(registry: Registry, data: Any, source: str) -> BaseModel:
    kind = registry.kind
    if not isinstance(data, dict):
        raise UserError(f"{source}: {kind}: expected a mapping with a 'type' key")
    if "type" not in data:
        raise UserError(f"{source}: {kind}.type: missing (known: {', '.join(registry.names())})")
    try:
        entry = registry.get(data["type"])
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    return _validate(entry.config, data, kind, source)


def validate_recipe(data: Any, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of recipe sections at the top level")
    for section in ("model", "task"):
        if section not in data:
            raise UserError(f"{source}: {section}: missing section")
    rest = {k: v for k, v in data.items() if k not in ("model", "task")}
    rest["model"] = _section_config(MODELS, data["model"], source)
    rest["task"] = _section_config(TASKS, data["task"], source)
    recipe = _validate(Recipe, rest, "", source)
    _check_references(recipe, source)
    return recipe


def _check_references(recipe: Recipe, source: str) -> None:
    """Each reference's metric must be an eval.csv column of the task, and its direction
    the metric's: fill in ``lower_is_better`` where the recipe leaves it out."""
    task = TASKS.get(recipe.task.type).cls.for_config(recipe.task)
    columns = ["loss", *task.metric_names]
    for index, reference in enumerate(recipe.reference):
        where = f"{source}: reference.{index}"
        if reference.metric not in columns:
            hint = difflib.get_close_matches(reference.metric, columns, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise UserError(
                f"{where}.metric: {reference.metric!r} is not an eval.csv column of task "
                f"{recipe.task.type!r}{suggestion} (columns: {', '.join(columns)})"
            )
        lower = not task.metric_higher_is_better(reference.metric)
        if reference.lower_is_better is None:
            reference.lower_is_better = lower
        elif reference.lower_is_better != lower:
            direction = "lower" if lower else "higher"
            raise UserError(
                f"{where}.lower_is_better: {str(reference.lower_is_better).lower()}, but a "
                f"{direction} {reference.metric} is better on task {recipe.task.type!r}"
            )


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely; any problem is one UserError naming the file (and line)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: {where}YAML syntax error: {problem}") from None
    if data is None:
        raise UserError(f"{path}: empty file")
    return data


def dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path, sections and leaves alike."""
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{dotted}.")
    return keys


def key_suggestion(data: dict[str, Any], path: list[str], depth: int) -> str:
    """``"; did you mean X?"`` (or nothing) for a dotted key whose part ``path[depth]`` is
    missing from ``data``: a sibling spelled alike, else the recipe key nearest to the
    whole path, so that ``train.lr`` finds ``train.optimizer.lr`` in another section. A
    key ending in the same name as the path is preferred to one merely spelled alike."""
    node: Any = data
    for part in path[:depth]:
        node = node[part]
    known = list(node) if isinstance(node, dict) else []
    hint = difflib.get_close_matches(path[depth], known, n=1)
    if not hint:
        wanted = ".".join(path)
        everywhere = dotted_keys(data)
        same_leaf = [key for key in everywhere if key.rsplit(".", 1)[-1] == path[-1]]
        hint = difflib.get_close_matches(wanted, same_leaf, n=1, cutoff=0) if same_leaf else []
        hint = hint or difflib.get_close_matches(wanted, everywhere, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.optimizer.lr=1e-3`` -> (["train", "optimizer", "lr"], 0.001); the value is
    read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not re.fullmatch(r"[A-Za-z0-9_.]+", key.strip()):
        raise UserError(
            f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.optimizer.lr=1e-3"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Set dotted keys in a resolved recipe; every key must already exist there."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(path[: depth + 1])
                suggestion = key_suggestion(data, path, depth)
                raise UserError(f"--set {where}: no such key in {source}{suggestion}")
            if depth == len(path) - 1:
                node[part] = value
            else:
                node = node[part]
    return data


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    """Read, validate, apply ``--set`` overrides, validate again."""
    source = str(path)
    recipe = validate_recipe(read_yaml(path), source)
    if overrides:
        recipe = validate_recipe(
            apply_overrides(recipe.resolved(), overrides, source), f"{source} with --set"
        )
    return recipe
