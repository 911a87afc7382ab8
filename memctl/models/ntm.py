"""Neural Turing Machine (Graves, Wayne & Danihelka 2014, arXiv 1410.5401, sections 3-4),
with the choices of Collier & Beel 2018, "Implementing Neural Turing Machines"
(arXiv 1807.08518) that make it train reliably: memory initialised to a small constant,
learned initial read vectors and weightings, clipping of the controller's head
parameters (before their activations) and of the output logits to +-20.

At every time step the controller (feed-forward or LSTM) sees the input and the previous
read vectors; one linear layer emits the parameters of every head; all heads address the
previous memory together (content, interpolation, shift, sharpening; see
``addressing.py``); the read heads read it, then the write heads erase and add. The
output layer sees the controller's output and this step's read vectors. The state is
reset at the start of every sequence (``state=None``).

Speed: the per-step work is about 40 small ops: one matrix product per controller layer
(the first layer's weights on the external input run over the whole sequence before the
time loop), one head projection, one addressing pipeline for all heads, one activation
op per kind of head parameter; the output layer runs once over the whole sequence after
the loop. ``compile_step`` swaps in a ``torch.compile``d
step: any sequence length reuses it, since only the per-step shapes matter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from memctl.models import addressing
from memctl.models.base import ModelConfig
from memctl.models.controllers import lstm_cell
from memctl.registry import MODELS


class NTMConfig(ModelConfig):
    type: str = "ntm"
    controller: Literal["lstm", "feedforward"] = "lstm"
    controller_size: int = Field(100, ge=1, description="units per controller layer")
    controller_layers: int = Field(1, ge=1)
    memory_size: int = Field(128, ge=1, description="N, memory slots")
    word_size: int = Field(20, ge=1, description="M, width of a memory slot")
    read_heads: int = Field(1, ge=1)
    write_heads: int = Field(1, ge=1)
    max_shift: int = Field(1, ge=0, description="shifts range over -max_shift..max_shift")
    memory_init: Literal["constant", "learned", "random"] = Field(
        "constant",
        description="constant: every cell memory_init_value (Collier & Beel's choice); "
        "learned: a trained [N, M] parameter; random: N(0, 0.5^2) drawn per sequence",
    )
    memory_init_value: float = 1e-6
    controller_clip: float | None = Field(
        20.0, gt=0, description="clamp the head parameters the controller emits"
    )
    output_clip: float | None = Field(20.0, gt=0, description="clamp output logits")

    @model_validator(mode="after")
    def _shifts_fit_memory(self) -> NTMConfig:
        if 2 * self.max_shift + 1 > self.memory_size:
            raise ValueError(
                f"max_shift ({self.max_shift}) needs 2 * max_shift + 1 <= memory_size "
                f"({self.memory_size})"
            )
        return self


class NTMState(NamedTuple):
    """The recurrent state, batch ``B``, ``H = read_heads + write_heads``.

    memory:  ``[B, N, M]``
    reads:   ``[B, read_heads, M]``, the last read vectors
    weights: ``[B, H, N]``, the last head weightings, read heads first
    hidden:  ``[layers, B, controller_size]``, the controller's output
    cell:    ``[layers, B, controller_size]``, LSTM cells (zeros for feed-forward)
    """

    memory: torch.Tensor
    reads: torch.Tensor
    weights: torch.Tensor
    hidden: torch.Tensor
    cell: torch.Tensor


# The standard deviation of memory_init "random" (Collier & Beel's random initialisation).
RANDOM_MEMORY_STD = 0.5
# Logit of slot 0 in the initial head weightings (the other slots' logits are 0).
INITIAL_FOCUS_LOGIT = 6.0


@MODELS.register("ntm", NTMConfig)
class NTM(nn.Module):
    def __init__(self, config: NTMConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        self.lstm = config.controller == "lstm"
        size, word = config.controller_size, config.word_size
        read_heads, write_heads = config.read_heads, config.write_heads
        heads = read_heads + write_heads
        self.shifts = 2 * config.max_shift + 1
        gate_width = 4 * size if self.lstm else size
        # Layer 0's weights on the external input apply to the whole sequence in one
        # matrix product before the time loop; its recurrent weights see the previous
        # read vectors (and, for an LSTM, its own previous output).
        self.input_projection = nn.Linear(input_size, gate_width)
        recurrent_inputs = [read_heads * word] + [size] * (config.controller_layers - 1)
        self.recurrent = nn.ModuleList(
            nn.Linear(width + (size if self.lstm else 0), gate_width, bias=layer > 0)
            for layer, width in enumerate(recurrent_inputs)
        )
        # The head parameters, grouped by activation so that each is one op:
        # tanh (keys [H, M], add vectors [W, M]), sigmoid (gates [H], erase [W, M]),
        # softplus (strengths [H], sharpening [H]), softmax (shifts [H, S]).
        self.head_sizes = [
            heads * word + write_heads * word,
            heads + write_heads * word,
            2 * heads,
            heads * self.shifts,
        ]
        self.heads = nn.Linear(size, sum(self.head_sizes))
        self.readout = nn.Linear(size + read_heads * word, output_size)

        self.initial_reads = nn.Parameter(0.1 * torch.randn(read_heads, word))
        # Every head starts focused on slot 0 (weight 0.76 for N = 128). A uniform start
        # would stay uniform on a constant memory, where every slot looks the same to
        # every head (the gradient is symmetric too); a focused one lets shifts walk.
        initial_logits = torch.zeros(heads, config.memory_size)
        initial_logits[:, 0] = INITIAL_FOCUS_LOGIT
        self.initial_weight_logits = nn.Parameter(initial_logits)
        if config.memory_init == "learned":
            self.initial_memory = nn.Parameter(
                RANDOM_MEMORY_STD * torch.randn(config.memory_size, word)
            )
        self._step: Callable[..., Any] = self.step

    def initial_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> NTMState:
        config = self.config
        shape = (batch_size, config.memory_size, config.word_size)
        if config.memory_init == "constant":
            memory = torch.full(shape, config.memory_init_value, device=device, dtype=dtype)
        elif config.memory_init == "learned":
            memory = self.initial_memory.to(dtype).expand(shape)
        else:
            memory = RANDOM_MEMORY_STD * torch.randn(shape, device=device, dtype=dtype)
        weights = torch.softmax(self.initial_weight_logits.to(dtype), dim=-1)
        zeros = torch.zeros(
            config.controller_layers, batch_size, config.controller_size, device=device, dtype=dtype
        )
        return NTMState(
            memory=memory,
            reads=self.initial_reads.to(dtype).expand(batch_size, -1, -1),
            weights=weights.expand(batch_size, -1, -1),
            hidden=zeros,
            cell=zeros,
        )

    def step(
        self, projected_inputs: torch.Tensor, state: NTMState
    ) -> tuple[torch.Tensor, NTMState]:
        """One time step. ``projected_inputs``: ``self.input_projection`` of this step's
        inputs, ``[B, 4C]`` (LSTM, gates in torch.nn.LSTM's order, see ``lstm_cell``) or
        ``[B, C]``. Returns (the controller's output
        ``[B, C]``, the next state); the new read vectors are ``state.reads``."""
        batch, word = projected_inputs.shape[0], self.config.word_size
        heads, write_heads = state.weights.shape[1], self.config.write_heads

        below = state.reads.flatten(1)
        hiddens, cells = [], []
        previous_hiddens, previous_cells = state.hidden.unbind(0), state.cell.unbind(0)
        for layer, recurrent in enumerate(self.recurrent):
            layer_input = torch.cat([below, previous_hiddens[layer]], 1) if self.lstm else below
            if layer == 0:
                gates = torch.addmm(projected_inputs, layer_input, recurrent.weight.t())
            else:
                gates = recurrent(layer_input)
            if self.lstm:
                below, cell = lstm_cell(gates, previous_cells[layer])
            else:
                below, cell = torch.tanh(gates), previous_cells[layer]
            hiddens.append(below)
            cells.append(cell)
        output = below
        head_params = self.heads(output)
        if self.config.controller_clip is not None:
            clip = self.config.controller_clip
            head_params = F.hardtanh(head_params, -clip, clip)  # clamp, one-op backward
        squashed, gated, softplussed, shift_logits = head_params.split(self.head_sizes, 1)
        squashed, gated = torch.tanh(squashed), torch.sigmoid(gated)
        keys, add = squashed.split([heads * word, write_heads * word], 1)
        gates, erase = gated.split([heads, write_heads * word], 1)
        strengths, sharpening = F.softplus(softplussed).view(batch, 2, heads).unbind(1)
        weights = addressing.address(
            state.memory,
            state.weights,
            keys=keys.view(batch, heads, word),
            strengths=strengths,
            gates=gates,
            shift_weights=torch.softmax(shift_logits.view(batch, heads, self.shifts), dim=-1),
            gammas=1 + sharpening,
        )
        read_weights, write_weights = weights.split([heads - write_heads, write_heads], 1)
        reads = addressing.read(state.memory, read_weights)
        memory = addressing.write(
            state.memory,
            write_weights,
            erase.view(batch, write_heads, word),
            add.view(batch, write_heads, word),
        )
        stack = torch.stack if len(hiddens) > 1 else lambda parts: parts[0].unsqueeze(0)
        return output, NTMState(memory, reads, weights, stack(hiddens), stack(cells))

    def forward(
        self, inputs: torch.Tensor, state: NTMState | None = None
    ) -> tuple[torch.Tensor, NTMState]:
        """inputs ``[T, B, I]`` -> (logits ``[T, B, O]``, final state)."""
        if state is None:
            state = self.initial_state(inputs.shape[1], inputs.device, inputs.dtype)
        outputs, reads = [], []
        for projected in self.input_projection(inputs).unbind(0):
            output, state = self._step(projected, state)
            outputs.append(output)
            reads.append(state.reads.flatten(1))
        logits = self.readout(torch.cat([torch.stack(outputs), torch.stack(reads)], dim=-1))
        if self.config.output_clip is not None:
            logits = F.hardtanh(logits, -self.config.output_clip, self.config.output_clip)
        return logits, state

    def trace(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward`` from a fresh state, keeping every step's heads and memory (the
        model contract in ``base.py``): logits ``[T, B, O]`` and ``read_weights``
        ``[T, B, R, N]``, ``write_weights`` ``[T, B, W, N]``, ``memory`` ``[T+1, B, N, M]``
        (the initial memory, then the memory after each step's write)."""
        state = self.initial_state(inputs.shape[1], inputs.device, inputs.dtype)
        outputs, reads, weights, memories = [], [], [], [state.memory]
        for projected in self.input_projection(inputs).unbind(0):
            output, state = self.step(projected, state)
            outputs.append(output)
            reads.append(state.reads.flatten(1))
            weights.append(state.weights)
            memories.append(state.memory)
        logits = self.readout(torch.cat([torch.stack(outputs), torch.stack(reads)], dim=-1))
        if self.config.output_clip is not None:
            logits = F.hardtanh(logits, -self.config.output_clip, self.config.output_clip)
        read_weights, write_weights = torch.stack(weights).split(
            [self.config.read_heads, self.config.write_heads], dim=2
        )
        quantities = {
            "read_weights": read_weights,
            "write_weights": write_weights,
            "memory": torch.stack(memories),
        }
        return logits, quantities

    def compile_step(self, **options: Any) -> None:
        """Run ``forward``'s time steps through ``torch.compile(self.step, **options)``.

        Compiles on the first call (10-25 s on a 2-core CPU for the copy sizes), again
        only for a new batch size, dtype or device; sequences of any length reuse it.
        """
        self._step = torch.compile(self.step, **options)
