"""Sequences from the user's own files: ``task.type: sequences``.

A file (``.npz`` or ``.pt``) holds arrays, sequence first:

    inputs   ``[N, T, I]``  required
    targets  ``[N, T, O]``  required (``[N, T]`` class indices for ``loss: cross_entropy``)
    mask     ``[N, T]``     optional, 1 where an output is scored (default: all)
    lengths  ``[N]``        optional, ragged data: steps at or past a length are padding
    level    ``[N]``        optional, each sequence's curriculum level (default: its length,
                            else the common length ``T``)

A batch at curriculum level L draws only sequences whose level lies between the batch's
minimum and L, so ``curriculum.type: step`` or ``adaptive`` grows the data it sees.

The loss picks the metrics, one subclass per loss behind the one ``type`` (``for_config``):

    bce            targets in {0, 1}, sigmoid cross-entropy as in the NTM tasks;
                   cost_bits, bit_errors (primary), accuracy
    mse            real targets, squared error; squared_error (primary), abs_error
    cross_entropy  one-hot or class-index targets, softmax cross-entropy;
                   cost_bits, error (primary), accuracy

Files are memory-mapped (an uncompressed ``.npz`` member by member, a ``.pt`` through
``torch.load(mmap=True)``) and a batch reads only its rows, so a file larger than RAM
trains; a compressed ``.npz`` cannot be mapped and is read into memory, when it fits.
Everything wrong with a file is found when the task is built, before a run is created.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from memctl.errors import UserError
from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig

RANKS = {"inputs": 3, "targets": 3, "mask": 2, "lengths": 1, "level": 1}
# Values scanned at a time when a file is checked, so that checking a mapped file larger
# than RAM reads it once without holding it.
CHECK_CHUNK_VALUES = 1 << 24
# A zip member's local header: signature, then fixed fields up to the two lengths at 26.
LOCAL_HEADER = struct.Struct("<4s22xHH")


class SequencesConfig(TaskConfig):
    type: str = "sequences"
    train: str = Field(
        description="training data, .npz or .pt (relative: to the current directory)"
    )
    eval: str | None = Field(None, description="evaluation data; default: the train file")
    loss: Literal["bce", "mse", "cross_entropy"] = Field(
        "bce", description="bce: targets in {0, 1}; mse: real targets; cross_entropy: classes"
    )
    min_level: int | None = Field(None, ge=0, description="default: the smallest level in train")
    max_level: int | None = Field(
        None, ge=0, description="curriculum parameter; default: the largest level in train"
    )

    @field_validator("train", "eval")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        """Resolved once, at load, so that a resumed run finds its data from any folder."""
        return None if path is None else os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True)
class Sequences:
    """One file's checked arrays (memory-mapped where the file allows).

    ``order`` sorts the sequences by level and ``sorted_levels`` are their levels in that
    order, so the sequences of a level range are one slice of ``order``.
    """

    path: str
    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray | None
    lengths: np.ndarray | None
    order: np.ndarray
    sorted_levels: np.ndarray
    classes: int

    @property
    def input_size(self) -> int:
        return int(self.inputs.shape[2])

    def rows(self, low: int, high: int, count: int, generator: torch.Generator) -> np.ndarray:
        """``count`` sequence indices drawn uniformly from those with a level in [low, high]."""
        start, stop = np.searchsorted(self.sorted_levels, [low, high + 1])
        if stop <= start:
            raise UserError(f"{self.path}: level: no sequence has a level in [{low}, {high}]")
        drawn = torch.randint(int(start), int(stop), (count,), generator=generator)
        return self.order[drawn.numpy()]


def _too_big(path: Path, name: str, size: int) -> None:
    """Refuse a compressed member that cannot fit in the memory it must be read into."""
    from memctl.preflight import available

    free, kind = available(torch.device("cpu"))
    if size > free:
        raise UserError(
            f"{path}: {name}: compressed (np.savez_compressed), so it is read into memory, and "
            f"its {size:,} bytes exceed the {free:,} of {kind}; save it with np.savez to map it"
        )


def _mapped_member(path: Path, handle, info: zipfile.ZipInfo, name: str) -> np.ndarray:
    """A stored (uncompressed) ``.npy`` member mapped in place: the member's data begins
    after its local header, and the array's after the ``.npy`` header."""
    handle.seek(info.header_offset)
    signature, name_length, extra_length = LOCAL_HEADER.unpack(handle.read(LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise UserError(f"{path}: {name}: not a readable .npz member")
    handle.seek(info.header_offset + LOCAL_HEADER.size + name_length + extra_length)
    try:
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(handle)
    except ValueError as exc:
        raise UserError(f"{path}: {name}: not a .npy array ({exc})") from None
    if dtype.hasobject:
        raise UserError(f"{path}: {name}: an object (pickled) array; expected numbers")
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype, mode="r", offset=handle.tell(), shape=shape, order=order)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if info.compress_type == zipfile.ZIP_STORED:
                    arrays[name] = _mapped_member(path, handle, info, name)
                    continue
                _too_big(path, name, info.file_size)
                with np.load(path, allow_pickle=False) as members:
                    arrays[name] = members[name]
    except zipfile.BadZipFile as exc:
        raise UserError(f"{path}: not an .npz archive ({exc})") from None
    except ValueError as exc:  # np.load's refusal of a pickled member
        raise UserError(f"{path}: {name}: {exc}") from None
    return arrays


def _read_pt(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # an unpickler refusal, a truncated or foreign file
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(f"{path}: cannot load as a tensor file ({first})") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise UserError(f"{path}: expected a dict of named tensors (torch.save({{'inputs': ...}}))")
    arrays = {}
    for name, tensor in loaded.items():
        try:
            arrays[name] = tensor.detach().numpy()
        except TypeError:
            raise UserError(f"{path}: {name}: dtype {tensor.dtype} is not numeric") from None
    return arrays


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz`` or ``.pt`` file, memory-mapped where possible."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".npz":
        return _read_npz(path)
    if path.suffix == ".pt":
        return _read_pt(path)
    raise UserError(f"{path}: expected an .npz or .pt file")


def _chunks(array: np.ndarray):
    """Consecutive row blocks of ``array``, each about ``CHECK_CHUNK_VALUES`` values."""
    per_row = max(math.prod(array.shape[1:]), 1)
    step = max(CHECK_CHUNK_VALUES // per_row, 1)
    for start in range(0, array.shape[0], step):
        yield start, np.asarray(array[start : start + step])


def _scored(mask: np.ndarray | None, lengths: np.ndarray | None, start: int, rows: int, steps: int):
    """Which steps of rows [start, start + rows) are scored, ``[rows, T]``."""
    scored = np.ones((rows, steps), bool)
    if mask is not None:
        scored &= np.asarray(mask[start : start + rows]) != 0
    if lengths is not None:
        scored &= np.arange(steps) < lengths[start : start + rows, None]
    return scored


def check_arrays(path: Path, arrays: dict[str, np.ndarray], loss: str) -> Sequences:
    """Refuse (a UserError naming the file and the array) anything the task cannot train
    on; return the arrays with the sequences ordered by level."""
    unknown = sorted(set(arrays) - set(RANKS))
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown array (known: {', '.join(RANKS)})")
    for name in ("inputs", "targets"):
        if name not in arrays:
            raise UserError(f"{path}: {name}: missing array")
    class_indices = loss == "cross_entropy" and arrays["targets"].ndim == 2
    for name, array in arrays.items():
        if array.dtype.hasobject:
            raise UserError(f"{path}: {name}: an object (pickled) array; expected numbers")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise UserError(f"{path}: {name}: dtype {array.dtype} is not numeric")
        rank = 2 if name == "targets" and class_indices else RANKS[name]
        if array.ndim != rank:
            raise UserError(
                f"{path}: {name}: expected {rank} dimensions, got shape {tuple(array.shape)}"
            )
        if array.size == 0:
            raise UserError(f"{path}: {name}: empty (shape {tuple(array.shape)})")
    count, steps = arrays["inputs"].shape[:2]
    for name, array in arrays.items():
        if array.shape[0] != count:
            raise UserError(f"{path}: {name}: {array.shape[0]} sequences, but inputs has {count}")
        if array.ndim >= 2 and array.shape[1] != steps:
            raise UserError(f"{path}: {name}: {array.shape[1]} steps, but inputs has {steps}")
    for name in ("lengths", "level"):
        if name in arrays and not np.issubdtype(arrays[name].dtype, np.integer):
            raise UserError(f"{path}: {name}: dtype {arrays[name].dtype}; expected integers")
    if class_indices and not np.issubdtype(arrays["targets"].dtype, np.integer):
        raise UserError(f"{path}: targets: class indices must be integers")
    lengths = np.asarray(arrays["lengths"], np.int64) if "lengths" in arrays else None
    if lengths is not None and (lengths.min() < 1 or lengths.max() > steps):
        raise UserError(f"{path}: lengths: each must be in [1, {steps}]")
    mask = arrays.get("mask")
    classes = 0
    for name in ("inputs", "targets", "mask"):
        if name not in arrays:
            continue
        for start, chunk in _chunks(arrays[name]):
            if not np.isfinite(chunk).all():
                raise UserError(f"{path}: {name}: has NaN or infinite values")
            if name != "targets":
                continue
            if class_indices:
                if chunk.min() < 0:
                    raise UserError(f"{path}: targets: class indices must not be negative")
                classes = max(classes, int(chunk.max()) + 1)
            elif loss in ("bce", "cross_entropy") and not np.isin(chunk, (0, 1)).all():
                raise UserError(f"{path}: targets: {loss} needs values in {{0, 1}}")
            elif loss == "cross_entropy":
                scored = _scored(mask, lengths, start, len(chunk), steps)
                if (chunk.sum(-1)[scored] != 1).any():
                    raise UserError(f"{path}: targets: a scored step is not one-hot")
    if "level" in arrays:
        levels = np.asarray(arrays["level"], np.int64)
        if levels.min() < 0:
            raise UserError(f"{path}: level: levels must not be negative")
    else:
        levels = lengths if lengths is not None else np.full(count, steps, np.int64)
    order = np.argsort(levels, kind="stable")
    return Sequences(
        path=str(path),
        inputs=arrays["inputs"],
        targets=arrays["targets"],
        mask=mask,
        lengths=lengths,
        order=order,
        sorted_levels=levels[order],
        classes=classes or (0 if class_indices else int(arrays["targets"].shape[2])),
    )


@functools.lru_cache(maxsize=8)
def _load(path: str, loss: str, size: int, mtime_ns: int) -> Sequences:
    # A run builds its task several times (pre-flight estimate, trainer): each file
    # version is read and checked once.
    return check_arrays(Path(path), read_arrays(Path(path)), loss)


def load_sequences(path: str, loss: str) -> Sequences:
    """The checked sequences of one file, for one loss."""
    try:
        stat = os.stat(path)
    except OSError:
        raise UserError(f"{path}: no such file") from None
    return _load(path, loss, stat.st_size, stat.st_mtime_ns)


@TASKS.register("sequences", SequencesConfig)
class SequencesTask(Task):
    """Sequences from the user's files. The metrics named here are those of ``loss: bce``;
    ``mse`` and ``cross_entropy`` have their own, each loss being a subclass that
    ``for_config`` selects."""

    level_field = "max_level"

    def __new__(cls, config: SequencesConfig) -> SequencesTask:
        return super().__new__(cls.for_config(config))

    @classmethod
    def for_config(cls, config: TaskConfig) -> type[Task]:
        """The subclass of ``config.loss``, whose loss and metrics the task has."""
        return LOSSES[config.loss]

    def __init__(self, config: SequencesConfig) -> None:
        super().__init__(config)
        self.train = load_sequences(config.train, config.loss)
        self.held_out = (
            self.train if config.eval is None else load_sequences(config.eval, config.loss)
        )
        self.input_size = self.train.input_size
        self.output_size = self.train.classes
        if config.loss == "cross_entropy":
            self.output_size = max(self.train.classes, self.held_out.classes)
        if self.held_out.input_size != self.input_size:
            raise UserError(
                f"{self.held_out.path}: inputs: {self.held_out.input_size} features per step, "
                f"but {self.train.path} has {self.input_size}"
            )
        if config.loss != "cross_entropy" and self.held_out.classes != self.output_size:
            raise UserError(
                f"{self.held_out.path}: targets: {self.held_out.classes} values per step, "
                f"but {self.train.path} has {self.output_size}"
            )
        levels = self.train.sorted_levels
        self._min = int(levels[0]) if config.min_level is None else config.min_level
        self._max = int(levels[-1]) if config.max_level is None else config.max_level
        for data in (self.train, self.held_out):
            start, stop = np.searchsorted(data.sorted_levels, [self._min, self._max + 1])
            if stop <= start:
                raise UserError(
                    f"{data.path}: level: no sequence has a level in "
                    f"[{self._min}, {self._max}] (task.min_level, task.max_level)"
                )

    @property
    def level(self) -> int:
        return self._max

    @property
    def min_level(self) -> int:
        return self._min

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        """Training sequences with levels in [min_level, max_level], uniform over them."""
        return self._batch(self.train, min_level, max_level, batch_size, generator)

    def sample_eval(self, batch_size: int, level: int, generator: torch.Generator) -> Batch:
        """Sequences of the eval file with levels from the task's minimum up to ``level``:
        what a model at that curriculum level was trained on."""
        return self._batch(self.held_out, self.min_level, level, batch_size, generator)

    def _batch(
        self, data: Sequences, low: int, high: int, batch_size: int, generator: torch.Generator
    ) -> Batch:
        rows = data.rows(low, high, batch_size, generator)
        steps = data.inputs.shape[1]
        if data.lengths is not None:
            steps = int(data.lengths[rows].max())
        inputs = torch.from_numpy(np.asarray(data.inputs[rows, :steps], np.float32))
        targets = torch.from_numpy(np.asarray(data.targets[rows, :steps]))
        if targets.ndim == 2:
            targets = F.one_hot(targets.long(), self.output_size)
        mask = torch.ones(batch_size, steps)
        if data.mask is not None:
            mask = torch.from_numpy(np.asarray(data.mask[rows, :steps], np.float32))
        if data.lengths is not None:
            lengths = torch.from_numpy(data.lengths[rows])
            mask = mask * (torch.arange(steps) < lengths.unsqueeze(1))
        return Batch(
            inputs.transpose(0, 1).contiguous(),
            targets.float().transpose(0, 1).contiguous(),
            mask.transpose(0, 1).contiguous(),
        )


class RealSequencesTask(SequencesTask):
    """``loss: mse``: real-valued targets, squared error."""

    primary_metric = "squared_error"
    metric_names = ("squared_error", "abs_error")
    higher_is_better_metrics: ClassVar[frozenset[str]] = frozenset()
    metric_descriptions: ClassVar[dict[str, str]] = {
        "squared_error": "squared error summed per sequence",
        "abs_error": "mean absolute error per scored value",
    }

    def _squared(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Squared error of every scored value, ``[T, B, O]``."""
        return (outputs - batch.targets).square() * batch.mask.unsqueeze(-1)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean squared error per scored value."""
        scored = batch.mask.sum() * outputs.shape[-1]
        return self._squared(outputs, batch).sum() / scored.clamp_min(1)

    def sequence_losses(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed squared error of each sequence, ``[B]``."""
        return self._squared(outputs, batch).sum(dim=(0, 2))

    def output_view(self, logits: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The outputs themselves: they are the predicted values."""
        return logits, r"output $y_t$"

    @torch.no_grad()
    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """squared_error: summed per sequence, mean over the batch;
        abs_error: mean absolute error per scored value."""
        mask = batch.mask.unsqueeze(-1)
        scored = (batch.mask.sum() * outputs.shape[-1]).clamp_min(1)
        absolute = ((outputs - batch.targets).abs() * mask).sum() / scored
        return {
            "squared_error": self.sequence_losses(outputs, batch).mean(),
            "abs_error": absolute,
        }


class ClassSequencesTask(SequencesTask):
    """``loss: cross_entropy``: one class per scored step, softmax cross-entropy."""

    primary_metric = "error"
    metric_names = ("cost_bits", "error", "accuracy")
    metric_descriptions: ClassVar[dict[str, str]] = {
        "cost_bits": "cross-entropy, bits per sequence",
        "error": "fraction of scored steps wrong",
        "accuracy": "fraction of sequences all right",
    }

    def _cross_entropy(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy in nats at every step, masked, ``[T, B]``."""
        return -(F.log_softmax(outputs, dim=-1) * batch.targets).sum(-1) * batch.mask

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean softmax cross-entropy per scored step."""
        return self._cross_entropy(outputs, batch).sum() / batch.mask.sum().clamp_min(1)

    def sequence_losses(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed cross-entropy of each sequence, ``[B]``."""
        return self._cross_entropy(outputs, batch).sum(0)

    def output_view(self, logits: torch.Tensor) -> tuple[torch.Tensor, str]:
        """A softmax over the classes."""
        return torch.softmax(logits, dim=-1), r"output softmax$(y_t)$"

    @torch.no_grad()
    def metrics(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """cost_bits: cross-entropy in bits per sequence; error: fraction of scored steps
        whose most likely class is wrong; accuracy: fraction of sequences all right."""
        batch_size = outputs.shape[1]
        cost_bits = self._cross_entropy(outputs, batch).sum() / batch_size / math.log(2)
        wrong = (outputs.argmax(-1) != batch.targets.argmax(-1)).float() * batch.mask
        return {
            "cost_bits": cost_bits,
            "error": wrong.sum() / batch.mask.sum().clamp_min(1),
            "accuracy": (wrong.sum(0) == 0).float().mean(),
        }


LOSSES: dict[str, type[SequencesTask]] = {
    "bce": SequencesTask,
    "mse": RealSequencesTask,
    "cross_entropy": ClassSequencesTask,
}
