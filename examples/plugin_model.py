"""An Elman RNN (Elman 1990), a model that memctl does not ship, registered by a plugin.

h_t = tanh(W_x x_t + W_h h_{t-1} + b), y_t = W_y h_t: the simplest recurrent network,
a baseline below the LSTM. It follows memctl's model contract (memctl/models/base.py):
built as ``cls(config, input_size, output_size)``, ``forward(inputs [T, B, I], state)``
returns logits ``[T, B, O]`` and a named-tuple state, and ``trace`` keeps the hidden
state of every step for ``memctl inspect``.

Train it with ``memctl --plugin examples/plugin_model.py train examples/plugin_model.yaml``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import nn

import memctl


class ElmanConfig(memctl.ModelConfig):
    type: str = "elman"
    hidden: int = Field(64, ge=1, description="recurrent units")


class ElmanState(NamedTuple):
    """hidden: ``[1, B, hidden]``, h_t of the last step."""

    hidden: torch.Tensor


@memctl.register_model("elman", ElmanConfig)
class Elman(nn.Module):
    def __init__(self, config: ElmanConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        self.rnn = nn.RNN(input_size, config.hidden, nonlinearity="tanh")
        self.readout = nn.Linear(config.hidden, output_size)

    def forward(
        self, inputs: torch.Tensor, state: ElmanState | None = None
    ) -> tuple[torch.Tensor, ElmanState]:
        hidden_seq, hidden = self.rnn(inputs, None if state is None else state.hidden)
        return self.readout(hidden_seq), ElmanState(hidden)

    def trace(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward pass from a fresh state, with h_t of every step: ``[T, B, H]``."""
        hidden_seq, _ = self.rnn(inputs)
        return self.readout(hidden_seq), {"hidden": hidden_seq}
