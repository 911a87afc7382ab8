"""Which implementation of the DNC runs: the one place that chooses it.

Four implementations compute the same maths (tested against each other in float64):

- ``reference``: ``addressing.py``'s functions, plain autograd, one time step at a time.
- ``fused``: the same steps with ``fused.py``'s hand-written backwards (content lookups
  and the link step as single autograd nodes, link buffers shared by a sequence).
- ``native``: the C++ kernel (``native.py``), the whole sequence in one call where the
  model is one LSTM stack (``native_sequence_obstacle``), else the memory access of each
  step; CPU, one write head, float32 or float64, link matrices of at most
  ``native.MAX_LINK_ELEMENTS`` numbers.
- compiled: ``torch.compile`` of the step (``DNCCore.compile_step``, what the trainer's
  ``train.compile`` calls) or of the whole loop (``compile_sequence``), tracing the fused
  (or, with ``model.backend: reference``, the reference) maths.

``model.backend`` (``DNCConfig.backend``) asks for one. ``auto`` runs the native sequence
where it serves the model, else a compiled loop where one was compiled, else the step with
the native access where that serves, else fused; ``MEMCTL_NATIVE=0`` in the environment
rules the native kernel out. ``native`` where the kernel cannot serve is a ``UserError``
naming ``model.backend`` and the reason. ``plan`` is the decision; ``DNCCore.run`` follows
it and ``DNCCore.describe_backend`` reports it, so the two cannot disagree.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from memctl.errors import UserError
from memctl.models.dnc import native

if TYPE_CHECKING:
    from memctl.models.dnc.model import DNCCore

Backend = Literal["auto", "reference", "fused", "native"]
Access = Literal["reference", "fused", "native"]
Loop = Literal["native", "compiled_sequence", "compiled_step", "eager"]

_ACCESS_DESCRIPTIONS = {
    "native": "native access (C++ kernel per step)",
    "fused": "fused (PyTorch, hand-written backwards)",
    "reference": "reference (PyTorch autograd)",
}


class Plan(NamedTuple):
    """How a sequence runs: the time loop (the native kernel's whole sequence, a compiled
    loop or step, or eager steps) and each step's memory access."""

    loop: Loop
    access: Access

    def describe(self) -> str:
        """In a few words, for people (``DNCCore.describe_backend``)."""
        if self.loop == "native":
            return "native (C++ kernel, whole sequence)"
        if self.loop == "eager":
            return _ACCESS_DESCRIPTIONS[self.access]
        compiled = "step" if self.loop == "compiled_step" else "whole sequence"
        maths = ", reference maths" if self.access == "reference" else ""
        return f"compiled (torch.compile {compiled}{maths})"


def native_obstacle(
    write_heads: int, device: torch.device, dtype: torch.dtype, link_elements: int | None
) -> str | None:
    """Why the native kernel cannot run a memory, or None where it can: ``link_elements``
    is a link matrix's size (``B W N N``; None: not known yet). Builds the kernel on
    first use (the last check)."""
    if os.environ.get("MEMCTL_NATIVE", "1") == "0":
        return "MEMCTL_NATIVE=0 is set"
    if write_heads != 1:
        return f"the C++ kernel has one write head (write_heads is {write_heads})"
    if device.type != "cpu":
        return f"the C++ kernel runs on the CPU (the model is on {device.type})"
    if dtype not in (torch.float32, torch.float64):
        return f"the C++ kernel runs float32 or float64 (the model is {dtype})"
    if link_elements is not None and link_elements > native.MAX_LINK_ELEMENTS:
        return (
            f"a link matrix of {link_elements} numbers (batch x N x N) is more than the "
            f"C++ kernel keeps per step ({native.MAX_LINK_ELEMENTS})"
        )
    if torch.compiler.is_compiling():
        return "torch.compile cannot trace the C++ kernel"
    if not native.library():
        return "the C++ kernel could not be built on this machine (see the line above)"
    return None


def native_sequence_obstacle(core: DNCCore) -> str | None:
    """Why the native whole-sequence kernel does not fit the model's layers, or None: it
    runs one LSTM controller stack, without layer norm, nor dropout while training."""
    controller = core.controllers[0]
    if len(core.controllers) > 1:
        return "it runs one controller stack (num_layers is more than 1)"
    if controller.kind != "lstm":
        return f"it runs an LSTM controller (not {controller.kind})"
    if controller.norms is not None:
        return "it has no layer norm"
    if controller.dropout > 0 and controller.layers > 1 and core.training:
        return "it has no dropout"
    return None


def _refuse(reason: str) -> UserError:
    return UserError(f"model.backend: native cannot run here: {reason}; use auto or fused")


def check_native(write_heads: int) -> None:
    """What can be known of ``model.backend: native`` when the model is built (device,
    dtype and batch come later): a ``UserError`` unless the kernel is there and fits."""
    reason = native_obstacle(write_heads, torch.device("cpu"), torch.float32, None)
    if reason is not None:
        raise _refuse(reason)


def plan(
    core: DNCCore, batch: int, device: torch.device, dtype: torch.dtype, record: bool = False
) -> Plan:
    """How ``core.run`` runs a batch of ``batch`` sequences on ``device`` in ``dtype``
    (``record``: keeping every step's state, which compiled loops do not)."""
    memory = core.memories[0]
    compiled_sequence = core._sequence is not None and not record
    compiled_step = core._step != core.step
    access: Access = "fused" if core.backend == "auto" else core.backend
    if core.backend in ("auto", "native"):
        link_elements = batch * memory.write_heads * memory.memory_size**2
        reason = native_obstacle(memory.write_heads, device, dtype, link_elements)
        if reason is None:
            if native_sequence_obstacle(core) is None:
                return Plan("native", "native")
            if not (compiled_sequence or compiled_step):
                return Plan("eager", "native")
            reason = "a compiled step (train.compile) cannot call it per step"
        if core.backend == "native":
            raise _refuse(reason)
        access = "fused"
    if compiled_sequence:
        return Plan("compiled_sequence", access)
    if compiled_step:
        return Plan("compiled_step", access)
    return Plan("eager", access)


def step_access(core: DNCCore, link: torch.Tensor) -> Access:
    """The memory access of a step called on its own (``DNCCore.step`` without ``access``,
    as a compiled step is): ``plan``'s, for this link matrix ``[B, W, N, N]``, and never
    the native one while ``torch.compile`` traces."""
    if core.backend in ("reference", "fused"):
        return core.backend
    heads = core.memories[0].write_heads
    reason = native_obstacle(heads, link.device, link.dtype, link.numel())
    if reason is None:
        return "native"
    if core.backend == "native" and not torch.compiler.is_compiling():
        raise _refuse(reason)
    return "fused"
