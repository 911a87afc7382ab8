"""LSTM baseline (Hochreiter & Schmidhuber 1997), the NTM paper's comparison model.

A stack of LSTM layers followed by a linear read-out to logits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import nn

from memctl.models.base import ModelConfig
from memctl.registry import MODELS


class LSTMConfig(ModelConfig):
    type: str = "lstm"
    hidden: int = Field(256, ge=1, description="units per layer")
    layers: int = Field(1, ge=1)


class LSTMState(NamedTuple):
    """hidden, cell: ``[layers, B, hidden]``."""

    hidden: torch.Tensor
    cell: torch.Tensor


@MODELS.register("lstm", LSTMConfig)
class LSTM(nn.Module):
    def __init__(self, config: LSTMConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        self.rnn = nn.LSTM(input_size, config.hidden, num_layers=config.layers)
        self.readout = nn.Linear(config.hidden, output_size)

    def forward(
        self, inputs: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        hidden_seq, (hidden, cell) = self.rnn(inputs, None if state is None else tuple(state))
        return self.readout(hidden_seq), LSTMState(hidden, cell)
