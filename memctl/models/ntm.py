"""Neural Turing Machine (Graves, Wayne & Danihelka 2014, arXiv 1410.5401, sections 3-4),
with the choices of Collier & Beel 2018, "Implementing Neural Turing Machines"
(arXiv 1807.08518) that make it train reliably: memory initialised to a small constant,
learned initial read vectors and weightings, controller and output clipping to +-20.

At every time step the controller (feed-forward or LSTM) sees the input and the previous
read vectors; one linear layer emits the parameters of every head; all heads address the
previous memory together (content, interpolation, shift, sharpening; see
``addressing.py``); the read heads read it, then the write heads erase and add. The
output layer sees the controller's output and this step's read vectors. The state is
reset at the start of every sequence (``state=None``).

Speed: the per-step work is a handful of fused ops (one ``nn.LSTMCell`` per layer, one
head projection, one addressing pipeline for all heads); the output layer runs once over
the whole sequence after the time loop. ``compile_step`` swaps in a ``torch.compile``d
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
    controller_clip: float | None = Field(20.0, gt=0, description="clamp controller output")
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


@MODELS.register("ntm", NTMConfig)
class NTM(nn.Module):
    def __init__(self, config: NTMConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        size, layers = config.controller_size, config.controller_layers
        word, heads = config.word_size, config.read_heads + config.write_heads
        self.shifts = 2 * config.max_shift + 1
        controller_input = input_size + config.read_heads * word
        if config.controller == "lstm":
            self.controller = nn.ModuleList(
                nn.LSTMCell(controller_input if i == 0 else size, size) for i in range(layers)
            )
        else:
            self.controller = nn.ModuleList(
                nn.Linear(controller_input if i == 0 else size, size) for i in range(layers)
            )
        # Per head: key [M], strength and sharpening [2], gate [1], shift [S];
        # per write head also erase and add [2M].
        self.addressing_size = word + 3 + self.shifts
        self.heads = nn.Linear(size, heads * self.addressing_size + config.write_heads * 2 * word)
        self.readout = nn.Linear(size + config.read_heads * word, output_size)

        self.initial_reads = nn.Parameter(0.1 * torch.randn(config.read_heads, word))
        # Random logits: a uniform start would stay uniform on a constant memory, where
        # every slot looks the same to every head (the gradient is symmetric too).
        self.initial_weight_logits = nn.Parameter(torch.randn(heads, config.memory_size))
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
        layers = config.controller_layers
        zeros = torch.zeros(layers, batch_size, config.controller_size, device=device, dtype=dtype)
        return NTMState(
            memory=memory,
            reads=self.initial_reads.to(dtype).expand(batch_size, -1, -1),
            weights=weights.expand(batch_size, -1, -1),
            hidden=zeros,
            cell=zeros,
        )

    def step(self, inputs: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """One time step. inputs ``[B, I]`` -> (features ``[B, C + R M]`` for the output
        layer, the next state)."""
        config = self.config
        batch, word = inputs.shape[0], config.word_size
        heads, reads_count = state.weights.shape[1], config.read_heads

        layer_input = torch.cat([inputs, state.reads.flatten(1)], dim=1)
        hiddens, cells = [], []
        for layer, cell in enumerate(self.controller):
            if config.controller == "lstm":
                hidden, memory_cell = cell(layer_input, (state.hidden[layer], state.cell[layer]))
                cells.append(memory_cell)
            else:
                hidden = torch.tanh(cell(layer_input))
                cells.append(state.cell[layer])
            hiddens.append(hidden)
            layer_input = hidden
        output = layer_input
        if config.controller_clip is not None:
            output = output.clamp(-config.controller_clip, config.controller_clip)

        params = self.heads(output)
        addressing_params, write_params = params.split(
            [heads * self.addressing_size, params.shape[1] - heads * self.addressing_size], 1
        )
        keys, sharpness, gates, shift_logits = addressing_params.view(
            batch, heads, self.addressing_size
        ).split([word, 2, 1, self.shifts], dim=-1)
        strengths, gammas = F.softplus(sharpness).unbind(-1)
        weights = addressing.address(
            state.memory,
            state.weights,
            keys=torch.tanh(keys),
            strengths=strengths,
            gates=torch.sigmoid(gates.squeeze(-1)),
            shift_weights=torch.softmax(shift_logits, dim=-1),
            gammas=1 + gammas,
        )
        read_weights, write_weights = weights.split([reads_count, heads - reads_count], 1)
        erase, add = write_params.view(batch, heads - reads_count, 2, word).unbind(2)
        reads = addressing.read(state.memory, read_weights)
        memory = addressing.write(
            state.memory, write_weights, torch.sigmoid(erase), torch.tanh(add)
        )
        features = torch.cat([output, reads.flatten(1)], dim=1)
        next_state = NTMState(memory, reads, weights, torch.stack(hiddens), torch.stack(cells))
        return features, next_state

    def forward(
        self, inputs: torch.Tensor, state: NTMState | None = None
    ) -> tuple[torch.Tensor, NTMState]:
        """inputs ``[T, B, I]`` -> (logits ``[T, B, O]``, final state)."""
        if state is None:
            state = self.initial_state(inputs.shape[1], inputs.device, inputs.dtype)
        features = []
        for step_inputs in inputs.unbind(0):
            step_features, state = self._step(step_inputs, state)
            features.append(step_features)
        outputs = self.readout(torch.stack(features))
        if self.config.output_clip is not None:
            outputs = outputs.clamp(-self.config.output_clip, self.config.output_clip)
        return outputs, state

    def compile_step(self, **options: Any) -> None:
        """Run ``forward``'s time steps through ``torch.compile(self.step, **options)``.

        Compiles on the first call (10-25 s on a 2-core CPU for the copy sizes), again
        only for a new batch size, dtype or device; sequences of any length reuse it.
        """
        self._step = torch.compile(self.step, **options)
