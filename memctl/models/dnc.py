"""Differentiable Neural Computer, dense (Graves et al. 2016, "Hybrid computing using a
neural network with dynamic external memory", Nature 538, Methods), and a drop-in
replacement for the ``DNC`` class of pytorch-dnc (PyPI ``dnc`` 1.1.0).

At every time step the controller (a stack of LSTM, GRU or plain RNN layers) sees the
input and the previous step's read vectors; its output, clipped to ``+-clip``, goes
through one linear layer to the whole interface vector. The memory access then, in the
paper's order: updates the usage from the previous weightings and the free gates, looks
up the write key, allocates from the usage, writes (erase then add), updates the link
matrix and the precedence, and reads with the read modes mixing content lookup and the
forward and backward weightings of the link matrix. The output layer sees the controller
output and this step's read vectors. The maths is in ``addressing.py``.

``DNCCore`` holds it all; ``num_layers > 1`` stacks controller + memory-access layers as
pytorch-dnc does (layer ``l > 0`` sees layer ``l - 1``'s output and read vectors), with
one memory shared by the layers or one each. ``DNCModel`` is the recipe model
(``model.type: dnc``); ``DNC`` has pytorch-dnc's constructor and call.

Speed: the time loop is the only Python loop (with the layers of a stack, and backward
the same time steps again where link matrices are recomputed); every head is a tensor
dimension; the controller's weights on the external input and the output layer run once
over the whole sequence; the allocation is one batched sort; the content lookups and the
link update with the reads through it are single autograd nodes with hand-written
backwards (``addressing.fused_content_weights``, ``addressing.link_step``). ``run`` gives
each sequence an ``addressing.LinkWorkspace``: the link steps share their backward
buffers and, for large N, keep one link matrix in ten and recompute the rest.
``compile_step`` runs the time steps through ``torch.compile`` (without the workspace);
``compile_sequence`` compiles the whole time loop as one graph (for fixed lengths). On the
CPU, ``run`` does the whole sequence as one native call forward and one backward where
the model allows (``native_parameters``, ``native.py``), and ``MemoryAccess.step`` its
memory access where only that does: the same maths, tested against this path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memctl.models import addressing, native
from memctl.models.base import ModelConfig
from memctl.registry import MODELS

# Gate blocks per hidden unit, in torch.nn.LSTM / GRU / RNN's order (LSTM: input, forget,
# candidate, output; GRU: reset, update, candidate).
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class ControllerState(NamedTuple):
    """One controller stack's state. hidden, cell: ``[layers, B, H]`` (cell: LSTM only,
    zeros for GRU and RNN)."""

    hidden: torch.Tensor
    cell: torch.Tensor


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


class Controller(nn.Module):
    """A stack of recurrent layers with torch.nn.LSTM / GRU / RNN's parameters (two bias
    vectors per layer), so parameter counts match theirs.

    Layer 0 sees an external input of ``external_size`` (projected for the whole sequence
    at once by ``project``) and a per-step input of ``step_size``; upper layers see the
    layer below. ``dropout`` applies between layers when training (as torch's);
    ``layer_norm`` normalises each layer's output on its way up (the recurrence keeps the
    raw state).
    """

    def __init__(
        self,
        kind: str,
        external_size: int,
        step_size: int,
        hidden: int,
        layers: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        dropout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"rnn_type must be one of lstm, gru, rnn (got {kind!r})")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be tanh or relu (got {nonlinearity!r})")
        self.kind, self.hidden, self.layers = kind, hidden, layers
        self.external_size, self.dropout = external_size, dropout
        self.activation = torch.tanh if nonlinearity == "tanh" else torch.relu
        gates = GATES[kind] * hidden
        widths = [external_size + step_size] + [hidden] * (layers - 1)
        bound = 1 / math.sqrt(hidden)  # torch's RNN initialisation

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.weight_ih = nn.ParameterList(uniform(gates, width) for width in widths)
        self.weight_hh = nn.ParameterList(uniform(gates, hidden) for _ in widths)
        self.bias_ih = nn.ParameterList(uniform(gates) for _ in widths) if bias else None
        self.bias_hh = nn.ParameterList(uniform(gates) for _ in widths) if bias else None
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in widths) if layer_norm else None

    def _input_bias(self, layer: int) -> torch.Tensor | None:
        """The bias added with the input weights: both biases but GRU's hidden one, which
        sits inside the reset gate's product."""
        if self.bias_ih is None:
            return None
        if self.kind == "gru":
            return self.bias_ih[layer]
        return self.bias_ih[layer] + self.bias_hh[layer]

    def project(self, external: torch.Tensor) -> torch.Tensor | None:
        """Layer 0's input weights on the external input, ``[T, B, E] -> [T, B, G]``."""
        if self.external_size == 0:
            return None
        weight = self.weight_ih[0][:, : self.external_size]
        return F.linear(external, weight, self._input_bias(0))

    def initial_state(
        self, batch: int, device: torch.device, dtype: torch.dtype
    ) -> ControllerState:
        zeros = torch.zeros(self.layers, batch, self.hidden, device=device, dtype=dtype)
        return ControllerState(zeros, zeros)

    def step(
        self, projected: torch.Tensor | None, step_input: torch.Tensor, state: ControllerState
    ) -> tuple[torch.Tensor, ControllerState]:
        """projected: ``project``'s row for this step ``[B, G]`` (or None), step_input:
        ``[B, S]`` -> (output ``[B, H]``, state)."""
        hiddens, cells = [], []
        below = step_input
        for layer, (hidden, cell) in enumerate(zip(state.hidden, state.cell, strict=True)):
            if layer > 0 and self.dropout > 0 and self.training:
                below = F.dropout(below, self.dropout, training=True)
            weight = self.weight_ih[layer]
            if layer == 0 and projected is not None:
                gates = torch.addmm(projected, below, weight[:, self.external_size :].t())
            else:
                gates = F.linear(below, weight, self._input_bias(layer))
            recurrent_weight = self.weight_hh[layer]
            if self.kind == "gru":
                recurrent_bias = None if self.bias_hh is None else self.bias_hh[layer]
                recurrent = F.linear(hidden, recurrent_weight, recurrent_bias)
                size = self.hidden
                reset, update = torch.sigmoid(
                    gates[:, : 2 * size] + recurrent[:, : 2 * size]
                ).chunk(2, 1)
                candidate = torch.tanh(
                    torch.addcmul(gates[:, 2 * size :], reset, recurrent[:, 2 * size :])
                )
                hidden = torch.lerp(candidate, hidden, update)
            else:
                gates = torch.addmm(gates, hidden, recurrent_weight.t())
                if self.kind == "lstm":
                    # One sigmoid over all four blocks (the candidate's is not used): fewer
                    # ops than three, each with its own backward.
                    input_gate, forget_gate, _, output_gate = torch.sigmoid(gates).chunk(4, 1)
                    candidate = torch.tanh(gates[:, 2 * self.hidden : 3 * self.hidden])
                    cell = torch.addcmul(forget_gate * cell, input_gate, candidate)
                    hidden = output_gate * torch.tanh(cell)
                else:
                    hidden = self.activation(gates)
            hiddens.append(hidden)
            cells.append(cell)
            below = hidden if self.norms is None else self.norms[layer](hidden)
        stack = torch.stack if len(hiddens) > 1 else lambda parts: parts[0].unsqueeze(0)
        return below, ControllerState(stack(hiddens), stack(cells))


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
        workspace: addressing.LinkWorkspace | None = None,
    ) -> tuple[torch.Tensor, AccessState, torch.Tensor]:
        """controller_output ``[B, H]`` -> (read vectors ``[B, R, M]``, state, this step's
        allocation weightings ``[B, W, N]``). ``workspace``: one per sequence (see
        ``addressing.link_step``)."""
        interface = self.interface(controller_output)
        if native.usable(state.link, self.write_heads):
            reads, *access, allocation = native.dnc_access(interface, *state)
            return reads, AccessState(*access), allocation
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
        write_content = addressing.fused_content_weights(state.memory, write_keys, write_strengths)
        allocation = addressing.write_allocation(usage, allocation_gates * write_gates)
        write_weights = addressing.write_weighting(
            write_content, allocation, allocation_gates, write_gates
        )
        memory = addressing.write(
            state.memory, write_weights, erase.view(batch, writes, word), write_vectors
        )
        link, forward, backward = addressing.link_step(
            state.link, write_weights, state.precedence, state.read_weights, workspace
        )
        precedence = addressing.precedence_update(state.precedence, write_weights)
        read_content = addressing.fused_content_weights(memory, read_keys, read_strengths)
        read_weights = addressing.read_weighting(read_content, forward, backward, read_modes)
        read_vectors = addressing.read(memory, read_weights)
        state = AccessState(memory, read_weights, write_weights, usage, link, precedence)
        return read_vectors, state, allocation


class DNCCore(nn.Module):
    """Controller layers, their memories and the output layer; ``forward(inputs [T, B, I],
    state=None) -> (outputs [T, B, O], state)``."""

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
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("controller_layers", controller_layers),
            ("num_layers", num_layers),
            ("memory_size", memory_size),
            ("word_size", word_size),
            ("read_heads", read_heads),
            ("write_heads", write_heads),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1 (got {value})")
        self.clip, self.output_clip = clip or None, output_clip
        read_size = read_heads * word_size
        self.controllers = nn.ModuleList(
            Controller(
                controller,
                external_size=input_size if layer == 0 else 0,
                step_size=read_size if layer == 0 else hidden_size + read_size,
                hidden=hidden_size,
                layers=controller_layers,
                bias=bias,
                nonlinearity=nonlinearity,
                dropout=dropout,
                layer_norm=layer_norm,
            )
            for layer in range(num_layers)
        )
        self.memories = nn.ModuleList(
            MemoryAccess(hidden_size, memory_size, word_size, read_heads, write_heads)
            for _ in range(1 if share_memory else num_layers)
        )
        self.readout = nn.Linear(hidden_size + read_size, output_size)
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
        workspaces: tuple[addressing.LinkWorkspace, ...] | None = None,
    ) -> tuple[torch.Tensor, DNCState, tuple[tuple[AccessState, torch.Tensor], ...]]:
        """One time step. projected: the first controller's ``project`` of this step's
        input ``[B, G]`` -> (the last controller's output ``[B, H]``, which the output layer
        sees with the next state's ``reads``, the next state, and per layer the state of the
        memory it used after its access with that access's allocation weightings
        ``[B, W, N]``, for traces). ``workspaces``: one per memory, shared by a sequence's
        steps (eager only)."""
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
                output, accesses[index], workspace
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
        parameters = self.native_parameters(state)
        if parameters is not None:
            outputs, reads, state, records = self.native_run(projected, state, parameters, record)
        elif self._sequence is not None and not record:
            outputs, reads, state, records = self._sequence(projected, state)
        else:
            step = self._step
            if step == self.step:
                # Recorded states must stay as they are: keep every link matrix then.
                every = None if record else addressing.CHECKPOINT_EVERY
                workspaces = tuple(addressing.LinkWorkspace(every) for _ in self.memories)
                step = functools.partial(self.step, workspaces=workspaces)
            outputs, reads, state, records = self._loop(projected, state, step, record)
        # The output layer's input, [controller output, read vectors], joined once.
        features = torch.cat([outputs, reads.flatten(2)], -1)
        outputs = self.readout(features)
        if self.output_clip is not None:
            outputs = F.hardtanh(outputs, -self.output_clip, self.output_clip)
        return outputs, state, records

    def native_parameters(self, state: DNCState) -> tuple[torch.Tensor, ...] | None:
        """``native.dnc_sequence``'s parameters, or None where it does not serve
        this model: one LSTM stack without layer norm (nor dropout while training), one
        write head and a memory that ``native.usable`` takes (its link matrices small
        enough to keep every step's; larger ones take the PyTorch path, which recomputes
        them)."""
        controller, memory = self.controllers[0], self.memories[0]
        link = state.access[0].link
        if (
            len(self.controllers) > 1
            or controller.kind != "lstm"
            or controller.norms is not None
            or (controller.dropout > 0 and controller.layers > 1 and self.training)
            or not native.usable(link, memory.write_heads)
        ):
            return None
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
                parameters.append(link.new_zeros(weight.shape[0]) if bias is None else bias)
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

    def compile_step(self, **options: Any) -> None:
        """Run the time steps through ``torch.compile(self.step, **options)``: compiled on
        the first call, again only for a new batch size, dtype or device. Where the native
        sequence serves the model (``native_parameters``), ``run`` keeps using it: one
        native call a sequence, faster than the compiled PyTorch step."""
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


class DNC(DNCCore):
    """pytorch-dnc's ``DNC``: same constructor, same call, same returned structures, and
    exactly as many parameters for the same arguments.

    ``output, (controller_hidden, memory, read_vectors) = rnn(x, (None, None, None),
    reset_experience=True)`` with ``x`` ``[B, T, input_size]`` (``batch_first``) or
    ``[T, B, input_size]``; ``output`` has the same layout and ``input_size`` features;
    ``controller_hidden`` is a list with one entry per layer, ``(h, c)`` for an LSTM or
    ``h`` otherwise, each ``[num_hidden_layers, B, hidden_size]``; ``memory`` is a dict
    (a list of dicts with ``share_memory=False``) of ``memory`` ``[B, N, W]``,
    ``link_matrix`` ``[B, 1, N, N]``, ``precedence`` ``[B, 1, N]``, ``read_weights``
    ``[B, R, N]``, ``write_weights`` ``[B, 1, N]``, ``usage_vector`` ``[B, N]``;
    ``read_vectors`` is ``[B, R * W]``. Pass them back as the second argument to go on;
    ``reset_experience=True`` empties the memory first. With ``debug=True`` a third value
    holds numpy views of the memory for batch element 0, one row per time step and layer.

    Differences from pytorch-dnc 1.1.0, where it has bugs: the controller starts from
    zeros (pytorch-dnc draws a new random initial state on every call and gives the LSTM
    the same tensor as h and c), and the controller sees the previous step's read vectors
    (pytorch-dnc feeds it the read vectors given at the call, zeros by default, at every
    step). Interface keys and write vectors are not squashed by tanh and the strengths are
    oneplus (the paper's; pytorch-dnc: tanh and softplus). ``independent_linears`` is
    accepted and changes nothing: one linear layer for the whole interface has the same
    parameters, function and initial distribution as one per interface part.
    ``PackedSequence`` inputs and ``bidirectional=True`` are not supported (pytorch-dnc
    does not implement them either).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        rnn_type: str = "lstm",
        num_layers: int = 1,
        num_hidden_layers: int = 2,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0,
        bidirectional: bool = False,
        nr_cells: int = 5,
        read_heads: int = 2,
        cell_size: int = 10,
        nonlinearity: str = "tanh",
        gpu_id: int = -1,
        independent_linears: bool = False,
        share_memory: bool = True,
        debug: bool = False,
        clip: float = 20,
    ) -> None:
        if bidirectional:
            raise ValueError("bidirectional=True is not supported (nor is it by pytorch-dnc)")
        super().__init__(
            input_size,
            input_size,
            controller=rnn_type.lower(),
            hidden_size=hidden_size,
            controller_layers=num_hidden_layers,
            num_layers=num_layers,
            share_memory=share_memory,
            memory_size=nr_cells,
            word_size=cell_size,
            read_heads=read_heads,
            bias=bias,
            nonlinearity=nonlinearity,
            dropout=dropout,
            clip=clip,
        )
        self.rnn_type, self.batch_first, self.debug = rnn_type.lower(), batch_first, debug
        self.share_memory, self.gpu_id = share_memory, gpu_id
        if gpu_id != -1:
            self.to(torch.device("cuda", gpu_id))

    def _state_from(
        self, hx: tuple[Any, Any, Any] | None, batch: int, like: torch.Tensor, reset: bool
    ) -> DNCState:
        state = self.initial_state(batch, like.device, like.dtype)
        controller_hidden, memory, read_vectors = hx if hx is not None else (None, None, None)
        controller = state.controller
        if controller_hidden is not None:
            controller = tuple(
                ControllerState(*layer)
                if self.rnn_type == "lstm"
                else ControllerState(layer, zeros.cell)
                for layer, zeros in zip(controller_hidden, state.controller, strict=True)
            )
        access = state.access
        if memory is not None and not reset:
            memories = [memory] if self.share_memory else memory
            access = tuple(
                AccessState(
                    memory=m["memory"],
                    read_weights=m["read_weights"],
                    write_weights=m["write_weights"],
                    usage=m["usage_vector"],
                    link=m["link_matrix"],
                    precedence=m["precedence"],
                )
                for m in memories
            )
        reads = state.reads
        if read_vectors is not None:
            reads = read_vectors.reshape(state.reads.shape)
        return DNCState(controller, access, reads)

    def _peer_state(self, state: DNCState) -> tuple[list[Any], Any, torch.Tensor]:
        controller = [
            (c.hidden, c.cell) if self.rnn_type == "lstm" else c.hidden for c in state.controller
        ]
        memories = [
            {
                "memory": a.memory,
                "link_matrix": a.link,
                "precedence": a.precedence,
                "read_weights": a.read_weights,
                "write_weights": a.write_weights,
                "usage_vector": a.usage,
            }
            for a in state.access
        ]
        return controller, memories[0] if self.share_memory else memories, state.reads.flatten(1)

    def forward(
        self,
        input: torch.Tensor,  # pytorch-dnc's keyword
        hx: tuple[Any, Any, Any] | None = (None, None, None),
        reset_experience: bool = False,
    ) -> Any:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"DNC takes a tensor input, not {type(input).__name__}")
        inputs = input.transpose(0, 1) if self.batch_first else input
        state = self._state_from(hx, inputs.shape[1], inputs, reset_experience)
        outputs, state, records = self.run(inputs, state, record=self.debug)
        if self.batch_first:
            outputs = outputs.transpose(0, 1)
        hidden = self._peer_state(state)
        if not self.debug:
            return outputs, hidden
        return outputs, hidden, debug_views(records)


def debug_views(records: list[tuple[AccessState, torch.Tensor]]) -> dict[str, np.ndarray]:
    """pytorch-dnc's ``debug`` output: one row per time step and layer (time major), batch
    element 0's memory, link matrix, precedence, read weights, write weights and usage
    after that layer's access, each flattened."""
    parts = {
        "memory": "memory",
        "link_matrix": "link",
        "precedence": "precedence",
        "read_weights": "read_weights",
        "write_weights": "write_weights",
        "usage_vector": "usage",
    }
    return {
        key: torch.stack([getattr(state, name)[0].flatten() for state, _ in records])
        .detach()
        .cpu()
        .numpy()
        for key, name in parts.items()
    }
