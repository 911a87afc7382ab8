"""Differentiable Neural Computer, dense (Graves et al. 2016, "Hybrid computing using a
neural network with dynamic external memory", Nature 538, Methods).

At every time step the controller (a stack of LSTM, GRU or plain RNN layers,
``controllers.py``) sees the input and the previous step's read vectors; its output,
clipped to ``+-clip``, goes through one linear layer to the whole interface vector. The
memory access then, in the paper's order: updates the usage from the previous weightings
and the free gates, looks up the write key, allocates from the usage, writes (erase then
add), updates the link matrix and the precedence, and reads with the read modes mixing
content lookup and the forward and backward weightings of the link matrix. The output
layer sees the controller output and this step's read vectors. The maths is in
``addressing.py``.

``DNCCore`` holds it all; ``num_layers > 1`` stacks controller + memory-access layers as
pytorch-dnc does (layer ``l > 0`` sees layer ``l - 1``'s output and read vectors), with
one memory shared by the layers or one each. ``DNCModel`` is the recipe model
(``model.type: dnc``); ``compat.DNC`` has pytorch-dnc's constructor and call.

Speed: the time loop is the only Python loop (with the layers of a stack, and backward
the same time steps again where link matrices are recomputed); every head is a tensor
dimension; the controller's weights on the external input and the output layer run once
over the whole sequence; the allocation is one batched sort. Which implementation of the
memory access and of the loop runs (reference, fused, compiled, native) is
``backend.plan``'s decision, which ``run`` follows and ``describe_backend`` reports; the
fused one gives each sequence a ``fused.LinkWorkspace`` (the link steps share their
backward buffers and, for large N, keep one link matrix in ten and recompute the rest).
``compile_step`` runs the time steps through ``torch.compile`` (without the workspace);
``compile_sequence`` compiles the whole time loop as one graph (for fixed lengths).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memctl.models import addressing
from memctl.models.base import ModelConfig
from memctl.models.controllers import (
    ControllerState,
    layered_controllers,
    require_positive,
)
from memctl.models.dnc import backend as backends
from memctl.models.dnc import fused, native
from memctl.registry import MODELS


class AccessState(NamedTuple):
    """One memory's state, ``R`` read heads and ``W`` write heads.

    memory:        ``[B, N, M]``
    read_weights:  ``[B, R, N]``
    write_weights: ``[B, W, N]``
    usage:         ``[B, N]``
    link:          ``[B, W, N, N]``, one temporal link matrix per write head
    precedence:    ``[B, W, N]``
    """

    memory: torch.Tensor
    read_weights: torch.Tensor
    write_weights: torch.Tensor
    usage: torch.Tensor
    link: torch.Tensor
    precedence: torch.Tensor


class DNCState(NamedTuple):
    """The whole recurrent state: one ``ControllerState`` per layer, one ``AccessState``
    per memory (one if shared), and the last layer's read vectors ``[B, R, M]``."""

    controller: tuple[ControllerState, ...]
    access: tuple[AccessState, ...]
    reads: torch.Tensor


class MemoryAccess(nn.Module):
    """The DNC's memory: one linear layer from the controller output to the interface
    vector, then the addressing of ``R`` read and ``W`` write heads.

    Interface (Methods, "Interface parameters"), grouped by activation so that each is one
    op: identity (read keys ``R x M``, write keys ``W x M``, write vectors ``W x M``),
    oneplus ``1 + softplus`` (read strengths ``R``, write strengths ``W``), sigmoid (erase
    vectors ``W x M``, free gates ``R``, allocation gates ``W``, write gates ``W``), softmax
    (read modes ``R x (2W + 1)``). For W = 1 that is ``RM + 3M + 5R + 3`` numbers, the
    paper's (and pytorch-dnc's) interface size.
    """

    def __init__(
        self, input_size: int, memory_size: int, word_size: int, read_heads: int, write_heads: int
    ) -> None:
        super().__init__()
        self.memory_size, self.word_size = memory_size, word_size
        self.read_heads, self.write_heads = read_heads, write_heads
        self.modes = 2 * write_heads + 1
        reads, writes, word = read_heads, write_heads, word_size
        self.sizes = [
            (reads + 2 * writes) * word,
            reads + writes,
            writes * word + reads + 2 * writes,
            reads * self.modes,
        ]
        self.interface = nn.Linear(input_size, sum(self.sizes))

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> AccessState:
        """Everything zero: an empty memory, nothing read or written yet."""
        slots, writes = self.memory_size, self.write_heads

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(batch, *shape, device=device, dtype=dtype)

        return AccessState(
            memory=zeros(slots, self.word_size),
            read_weights=zeros(self.read_heads, slots),
            write_weights=zeros(writes, slots),
            usage=zeros(slots),
            link=zeros(writes, slots, slots),
            precedence=zeros(writes, slots),
        )

    def step(
        self,
        controller_output: torch.Tensor,
        state: AccessState,
        workspace: fused.LinkWorkspace | None = None,
        access: backends.Access = "fused",
    ) -> tuple[torch.Tensor, AccessState, torch.Tensor]:
        """controller_output ``[B, H]`` -> (read vectors ``[B, R, M]``, state, this step's
        allocation weightings ``[B, W, N]``). ``access``: the implementation (see
        ``backend.py``; the caller chooses); ``workspace``: one per sequence, fused only
        (see ``fused.link_step``)."""
        interface = self.interface(controller_output)
        if access == "native":
            reads, *access_state, allocation = native.dnc_access(interface, *state)
            return reads, AccessState(*access_state), allocation
        content_weights = addressing.content_weights
        if access == "fused":
            content_weights = fused.content_weights
        batch, word = controller_output.shape[0], self.word_size
        reads, writes = self.read_heads, self.write_heads
        linear, oneplus, gated, mode_logits = interface.split(self.sizes, 1)
        read_keys, write_keys, write_vectors = linear.view(batch, reads + 2 * writes, word).split(
            [reads, writes, writes], 1
        )
        read_strengths, write_strengths = (1 + F.softplus(oneplus)).split([reads, writes], 1)
        erase, free_gates, allocation_gates, write_gates = torch.sigmoid(gated).split(
            [writes * word, reads, writes, writes], 1
        )
        read_modes = torch.softmax(mode_logits.view(batch, reads, self.modes), dim=-1)

        usage = addressing.usage_update(
            state.usage, state.write_weights, free_gates, state.read_weights
        )
        write_content = content_weights(state.memory, write_keys, write_strengths)
        allocation = addressing.write_allocation(usage, allocation_gates * write_gates)
        write_weights = addressing.write_weighting(
            write_content, allocation, allocation_gates, write_gates
        )
        memory = addressing.write(
            state.memory, write_weights, erase.view(batch, writes, word), write_vectors
        )
        if access == "fused":
            link, forward, backward = fused.link_step(
                state.link, write_weights, state.precedence, state.read_weights, workspace
            )
        else:
            link = addressing.link_update(state.link, write_weights, state.precedence)
            forward, backward = addressing.directional_weightings(link, state.read_weights)
        precedence = addressing.precedence_update(state.precedence, write_weights)
        read_content = content_weights(memory, read_keys, read_strengths)
        read_weights = addressing.read_weighting(read_content, forward, backward, read_modes)
        read_vectors = addressing.read(memory, read_weights)
        state = AccessState(memory, read_weights, write_weights, usage, link, precedence)
        return read_vectors, state, allocation


class DNCCore(nn.Module):
    """Controller layers, their memories and the output layer; ``forward(inputs [T, B, I],
    state=None) -> (outputs [T, B, O], state)``. ``backend``: the implementation asked
    for (``DNCConfig.backend``; ``backend.plan`` decides what runs)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        controller: str = "lstm",
        hidden_size: int = 64,
        controller_layers: int = 1,
        num_layers: int = 1,
        share_memory: bool = True,
        memory_size: int = 32,
        word_size: int = 16,
        read_heads: int = 4,
        write_heads: int = 1,
        bias: bool = True,
        nonlinearity: str = "tanh",
        dropout: float = 0.0,
        layer_norm: bool = False,
        clip: float | None = 20.0,
        output_clip: float | None = None,
        backend: backends.Backend = "auto",
    ) -> None:
        super().__init__()
        require_positive(
            hidden_size=hidden_size,
            controller_layers=controller_layers,
            num_layers=num_layers,
            memory_size=memory_size,
            word_size=word_size,
            read_heads=read_heads,
            write_heads=write_heads,
        )
        self.clip, self.output_clip = clip or None, output_clip
        read_size = read_heads * word_size
        self.controllers = layered_controllers(
            controller,
            input_size,
            read_size,
            num_layers,
            hidden=hidden_size,
            layers=controller_layers,
            bias=bias,
            nonlinearity=nonlinearity,
            dropout=dropout,
            layer_norm=layer_norm,
        )
        self.memories = nn.ModuleList(
            MemoryAccess(hidden_size, memory_size, word_size, read_heads, write_heads)
            for _ in range(1 if share_memory else num_layers)
        )
        self.readout = nn.Linear(hidden_size + read_size, output_size)
        if backend == "native":
            backends.check_native(write_heads)
        self.backend: backends.Backend = backend
        self._step: Callable[..., Any] = self.step
        self._sequence: Callable[..., Any] | None = None

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> DNCState:
        memory = self.memories[0]
        return DNCState(
            controller=tuple(c.initial_state(batch, device, dtype) for c in self.controllers),
            access=tuple(m.initial_state(batch, device, dtype) for m in self.memories),
            reads=torch.zeros(
                batch, memory.read_heads, memory.word_size, device=device, dtype=dtype
            ),
        )

    def step(
        self,
        projected: torch.Tensor,
        state: DNCState,
        workspaces: tuple[fused.LinkWorkspace, ...] | None = None,
        access: backends.Access | None = None,
    ) -> tuple[torch.Tensor, DNCState, tuple[tuple[AccessState, torch.Tensor], ...]]:
        """One time step. projected: the first controller's ``project`` of this step's
        input ``[B, G]`` -> (the last controller's output ``[B, H]``, which the output layer
        sees with the next state's ``reads``, the next state, and per layer the state of the
        memory it used after its access with that access's allocation weightings
        ``[B, W, N]``, for traces). ``workspaces``: one per memory, shared by a sequence's
        steps (eager fused only). ``access``: the memory access's implementation, as
        ``run``'s plan has it; None (a step called on its own, or compiled) asks
        ``backend.step_access``."""
        if access is None:
            access = backends.step_access(self, state.access[0].link)
        step_input = state.reads.flatten(1)
        controllers, accesses, trail = [], list(state.access), []
        for layer, controller in enumerate(self.controllers):
            output, controller_state = controller.step(
                projected if layer == 0 else None, step_input, state.controller[layer]
            )
            if self.clip is not None:
                output = F.hardtanh(output, -self.clip, self.clip)
            index = layer if len(self.memories) > 1 else 0
            workspace = None if workspaces is None else workspaces[index]
            reads, accesses[index], allocation = self.memories[index].step(
                output, accesses[index], workspace, access
            )
            if layer + 1 < len(self.controllers):
                step_input = torch.cat([output, reads.flatten(1)], 1)
            controllers.append(controller_state)
            trail.append((accesses[index], allocation))
        return output, DNCState(tuple(controllers), tuple(accesses), reads), tuple(trail)

    def run(
        self, inputs: torch.Tensor, state: DNCState | None, record: bool = False
    ) -> tuple[torch.Tensor, DNCState, list[tuple[AccessState, torch.Tensor]]]:
        """inputs ``[T, B, I]`` -> (outputs ``[T, B, O]``, final state, and with ``record``
        every layer's memory state and allocation after its access, time major)."""
        if state is None:
            state = self.initial_state(inputs.shape[1], inputs.device, inputs.dtype)
        projected = self.controllers[0].project(inputs)
        link = state.access[0].link
        plan = backends.plan(self, inputs.shape[1], link.device, link.dtype, record)
        if plan.loop == "native":
            parameters = self.native_parameters()
            outputs, reads, state, records = self.native_run(projected, state, parameters, record)
        elif plan.loop == "compiled_sequence":
            outputs, reads, state, records = self._sequence(projected, state)
        elif plan.loop == "compiled_step":
            outputs, reads, state, records = self._loop(projected, state, self._step, record)
        else:
            workspaces = None
            if plan.access == "fused":
                # Recorded states must stay as they are: keep every link matrix then.
                every = None if record else fused.CHECKPOINT_EVERY
                workspaces = tuple(fused.LinkWorkspace(every) for _ in self.memories)
            step = functools.partial(self.step, workspaces=workspaces, access=plan.access)
            outputs, reads, state, records = self._loop(projected, state, step, record)
        # The output layer's input, [controller output, read vectors], joined once.
        features = torch.cat([outputs, reads.flatten(2)], -1)
        outputs = self.readout(features)
        if self.output_clip is not None:
            outputs = F.hardtanh(outputs, -self.output_clip, self.output_clip)
        return outputs, state, records

    def native_parameters(self) -> tuple[torch.Tensor, ...]:
        """``native.dnc_sequence``'s parameters (where ``backend.plan`` runs the native
        sequence: one LSTM stack, one memory)."""
        controller, memory = self.controllers[0], self.memories[0]
        # Each layer's weights on [its input, its hidden state] side by side (one matrix
        # product a layer and step; joined once a sequence, so autograd splits their
        # gradient once, too).
        inputs = [controller.weight_ih[0][:, controller.external_size :]]
        inputs += list(controller.weight_ih[1:])
        parameters = []
        for layer, (weight, recurrent) in enumerate(zip(inputs, controller.weight_hh, strict=True)):
            parameters.append(torch.cat([weight, recurrent], 1))
            if layer > 0:
                bias = controller._input_bias(layer)
                parameters.append(weight.new_zeros(weight.shape[0]) if bias is None else bias)
        return (*parameters, memory.interface.weight, memory.interface.bias)

    def native_run(
        self,
        projected: torch.Tensor,
        state: DNCState,
        parameters: tuple[torch.Tensor, ...],
        record: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, DNCState, list[tuple[AccessState, torch.Tensor]]]:
        """``_loop`` over ``step`` as one native call forward and one backward for the
        whole sequence (``native.dnc_sequence``)."""
        controller = state.controller[0]
        clip = math.inf if self.clip is None else float(self.clip)
        inputs = (projected, state.reads, *controller, *state.access[0], *parameters)
        # Every step's state is kept for backward or a trace; otherwise two take turns.
        keep = record or (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
        outputs, reads, hidden, cell, *access, allocations = native.dnc_sequence(
            projected,
            state.reads,
            controller.hidden,
            controller.cell,
            clip,
            tuple(state.access[0]),
            parameters,
            keep,
        )
        last = -1 if keep else len(outputs) % 2
        final = AccessState(*(tensor[last] for tensor in access))
        next_state = DNCState((ControllerState(hidden[last], cell[last]),), (final,), reads[-1])
        records = []
        if record:
            states = [AccessState(*step) for step in zip(*(t[1:] for t in access), strict=True)]
            records = list(zip(states, allocations.unbind(0), strict=True))
        return outputs, reads[1:], next_state, records

    def _loop(
        self,
        projected: torch.Tensor,
        state: DNCState,
        step: Callable[..., Any],
        record: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, DNCState, list[tuple[AccessState, torch.Tensor]]]:
        """The time loop: projected inputs ``[T, B, G]`` -> (last controller outputs
        ``[T, B, H]``, read vectors ``[T, B, R, W]``, final state, records)."""
        outputs, reads, records = [], [], []
        for projected_step in projected.unbind(0):
            output, state, trail = step(projected_step, state)
            outputs.append(output)
            reads.append(state.reads)
            if record:
                records.extend(trail)
        return torch.stack(outputs), torch.stack(reads), state, records

    def forward(
        self, inputs: torch.Tensor, state: DNCState | None = None
    ) -> tuple[torch.Tensor, DNCState]:
        """inputs ``[T, B, I]`` -> (outputs ``[T, B, O]``, final state)."""
        outputs, state, _ = self.run(inputs, state)
        return outputs, state

    def describe_backend(self, batch_size: int) -> str:
        """Which implementation ``forward`` runs for a batch of ``batch_size`` sequences on
        the model's device and dtype (``base.py``'s contract): ``backend.plan``'s, the
        decision ``run`` follows. A ``UserError`` where ``model.backend: native`` cannot
        run there."""
        parameter = self.readout.weight
        plan = backends.plan(self, batch_size, parameter.device, parameter.dtype)
        return plan.describe()

    def compile_step(self, **options: Any) -> None:
        """Run the time steps through ``torch.compile(self.step, **options)``: compiled on
        the first call, again only for a new batch size, dtype or device. Where the native
        sequence serves the model (``backend.plan``), ``run`` keeps using it: one native
        call a sequence, faster than the compiled PyTorch step."""
        self._step, self._sequence = torch.compile(self.step, **options), None

    def compile_sequence(self, **options: Any) -> None:
        """Compile the whole time loop as one graph, forward and backward
        (``torch.compile`` of the loop with ``self.step``, unrolled): no per-step call
        overhead, and the compiler fuses across steps. Compiling takes minutes and is
        redone for every new sequence length (and batch size, dtype, device), so it pays
        only where lengths repeat; the trainer's ``train.compile`` uses ``compile_step``.
        ``debug`` / ``trace`` calls stay eager, and the native sequence, where it serves
        the model, is used instead (as with ``compile_step``)."""
        self._step = self.step
        self._sequence = torch.compile(
            functools.partial(self._loop, step=self.step, record=False), **options
        )


class DNCConfig(ModelConfig):
    type: str = "dnc"
    backend: backends.Backend = Field(
        "auto",
        description="the memory access's implementation: auto (native C++ kernel where it "
        "serves, else fused), reference (PyTorch autograd of addressing.py), fused (PyTorch, "
        "hand-written backwards), native (C++ kernel, CPU, one write head; an error where it "
        "cannot run). train.compile compiles the fused or reference step",
    )
    controller: Literal["lstm", "gru", "rnn"] = "lstm"
    nonlinearity: Literal["tanh", "relu"] = Field("tanh", description="rnn controller only")
    controller_size: int = Field(64, ge=1, description="hidden units per controller layer")
    controller_layers: int = Field(1, ge=1, description="pytorch-dnc's num_hidden_layers")
    layer_norm: bool = Field(False, description="layer-normalise each controller layer's output")
    memory_size: int = Field(32, ge=1, description="N, memory slots")
    word_size: int = Field(16, ge=1, description="M, width of a memory slot")
    read_heads: int = Field(4, ge=1)
    write_heads: int = Field(1, ge=1)
    controller_clip: float | None = Field(
        20.0, gt=0, description="clamp the controller output (DeepMind's 20)"
    )
    output_clip: float | None = Field(20.0, gt=0, description="clamp output logits")


@MODELS.register("dnc", DNCConfig)
class DNCModel(DNCCore):
    """The recipe model: one controller stack and one memory."""

    def __init__(self, config: DNCConfig, input_size: int, output_size: int) -> None:
        super().__init__(
            input_size,
            output_size,
            controller=config.controller,
            hidden_size=config.controller_size,
            controller_layers=config.controller_layers,
            memory_size=config.memory_size,
            word_size=config.word_size,
            read_heads=config.read_heads,
            write_heads=config.write_heads,
            nonlinearity=config.nonlinearity,
            layer_norm=config.layer_norm,
            clip=config.controller_clip,
            output_clip=config.output_clip,
            backend=config.backend,
        )
        self.config = config

    def trace(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run ``inputs`` ``[T, B, I]`` from the initial state, recording every step.

        Returns (logits ``[T, B, O]``, a dict, time first, batch second):
        ``read_weights`` ``[T, B, R, N]``, ``write_weights`` ``[T, B, W, N]``, ``memory``
        ``[T + 1, B, N, M]`` (the initial memory, then after each step), ``usage``
        ``[T, B, N]``, ``allocation`` ``[T, B, W, N]``, ``link`` ``[T, B, N, N]`` and
        ``precedence`` ``[T, B, N]`` (with W > 1 write heads: ``[T, B, W, N, N]`` and
        ``[T, B, W, N]``).
        """
        initial = self.initial_state(inputs.shape[1], inputs.device, inputs.dtype)
        logits, _, records = self.run(inputs, initial, record=True)
        states = [state for state, _ in records]

        def stacked(name: str) -> torch.Tensor:
            values = torch.stack([getattr(state, name) for state in states])
            if name in ("link", "precedence") and self.config.write_heads == 1:
                values = values.squeeze(2)
            return values.detach()

        trace = {
            name: stacked(name)
            for name in ("read_weights", "write_weights", "usage", "link", "precedence")
        }
        memory = [initial.access[0].memory] + [state.memory for state in states]
        trace["memory"] = torch.stack(memory).detach()
        trace["allocation"] = torch.stack([allocation for _, allocation in records]).detach()
        return logits.detach(), trace
