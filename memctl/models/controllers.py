"""The controller cells every memory model shares.

``lstm_cell`` is the one LSTM update (torch.nn.LSTM's gate order: input, forget,
candidate, output), used by the NTM's controller and by ``Controller``; ``Controller`` is
a stack of LSTM, GRU or plain RNN layers with torch.nn.LSTM / GRU / RNN's parameter
layout (the DNC's, and its native kernel's). Models keep the loop over time steps; a cell
here is one step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Gate blocks per hidden unit, in torch.nn.LSTM / GRU / RNN's order (LSTM: input, forget,
# candidate, output; GRU: reset, update, candidate).
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class ControllerState(NamedTuple):
    """One controller stack's state. hidden, cell: ``[layers, B, H]`` (cell: LSTM only,
    zeros for GRU and RNN)."""

    hidden: torch.Tensor
    cell: torch.Tensor


def lstm_cell(gates: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM cell update from pre-activations ``gates`` ``[B, 4C]`` in torch.nn.LSTM's order
    (input ``i``, forget ``f``, candidate ``g``, output ``o``) and the previous cell
    ``[B, C]``: ``c' = f c + i tanh(g)``, ``h' = o tanh(c')`` -> (h', c'), each ``[B, C]``.

    One sigmoid over all four blocks (the candidate's is not used): fewer ops than three,
    each with its own backward.
    """
    size = cell.shape[1]
    input_gate, forget_gate, _, output_gate = torch.sigmoid(gates).chunk(4, 1)
    candidate = torch.tanh(gates[:, 2 * size : 3 * size])
    cell = torch.addcmul(forget_gate * cell, input_gate, candidate)
    return output_gate * torch.tanh(cell), cell


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
                    hidden, cell = lstm_cell(gates, cell)
                else:
                    hidden = self.activation(gates)
            hiddens.append(hidden)
            cells.append(cell)
            below = hidden if self.norms is None else self.norms[layer](hidden)
        stack = torch.stack if len(hiddens) > 1 else lambda parts: parts[0].unsqueeze(0)
        return below, ControllerState(stack(hiddens), stack(cells))


def require_positive(**sizes: int) -> None:
    """A ValueError naming the first of ``sizes`` under 1."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1 (got {value})")


def layered_controllers(
    controller: str,
    input_size: int,
    read_size: int,
    num_layers: int,
    **options: Any,
) -> nn.ModuleList:
    """The controllers of pytorch-dnc's layering (DNC, SAM, SDNC): layer 0 sees the
    external input and its memory's last reads, layer ``l > 0`` layer ``l - 1``'s output
    (``options["hidden"]`` wide) and the reads. ``options`` are ``Controller``'s."""
    hidden = options["hidden"]
    return nn.ModuleList(
        Controller(
            controller,
            external_size=input_size if layer == 0 else 0,
            step_size=read_size if layer == 0 else hidden + read_size,
            **options,
        )
        for layer in range(num_layers)
    )
