"""LSTM encoder-decoder with attention over the inputs (Bahdanau, Cho & Bengio 2015,
"Neural Machine Translation by Jointly Learning to Align and Translate", arXiv 1409.0473),
the baseline of Andrychowicz & Kurach 2016 (arXiv 1602.03218, section 4).

It reads the HAM tasks' layout (``memctl/tasks/ham_tasks.py``): the input channel
``is_data`` (second-last) marks the items, ``is_go`` (last) the steps that answer. An
encoder LSTM reads every step; the steps before the first go step are the input phase.
From the first go step on, a decoder LSTM cell, started from the encoder's state at the
end of the input phase, makes one step per input step, attending over the encoder's
outputs ``e_s`` at the data steps seen so far (``is_data_s = 1``, ``s <= t``):

    h_t, c_t = DecoderLSTM([x_t, r_(t-1)], (h_(t-1), c_(t-1)))
    u_st = v^T tanh(W_e e_s + W_h h_t)                      (additive attention)
    a_t = softmax_s(u_st) over the attendable s;  r_t = sum_s a_st e_s
    y_t = OUT([h_t, r_t])

The outputs are zero in the input phase. Each answer attends over every item, so an
answer costs O(n): the comparison HAM's O(log n) access is measured against.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import nn

from memctl.models.base import ModelConfig
from memctl.registry import MODELS


class LSTMAttentionConfig(ModelConfig):
    type: str = "lstm_attention"
    hidden: int = Field(128, ge=1, description="units of the encoder and of the decoder LSTM")
    attention_size: int = Field(64, ge=1, description="width of the additive attention's tanh")


class LSTMAttentionState(NamedTuple):
    """encoder_hidden, encoder_cell, decoder_hidden, decoder_cell, read: ``[B, H]``;
    memory: the encoder outputs so far ``[S, B, H]``; attendable: ``[S, B]``, 1 at the
    data steps among them."""

    encoder_hidden: torch.Tensor
    encoder_cell: torch.Tensor
    decoder_hidden: torch.Tensor
    decoder_cell: torch.Tensor
    read: torch.Tensor
    memory: torch.Tensor
    attendable: torch.Tensor


def additive_attention(
    keys: torch.Tensor, query: torch.Tensor, scale: torch.Tensor, attendable: torch.Tensor
) -> torch.Tensor:
    """``a_s = softmax_s(v^T tanh(k_s + q))`` over the attendable s, 0 elsewhere; all 0
    where nothing is attendable.

    keys: ``W_e e_s``, ``[S, B, A]``; query: ``W_h h_t``, ``[B, A]``; scale: ``v``,
    ``[A]``; attendable: ``[S, B]`` (bool). Returns the weights ``[S, B]``.
    """
    scores = torch.tanh(keys + query) @ scale  # [S, B]
    scores = scores.masked_fill(~attendable, float("-inf"))
    weights = torch.softmax(scores, dim=0)
    return torch.where(attendable.any(dim=0), weights, 0.0)


@MODELS.register("lstm_attention", LSTMAttentionConfig)
class LSTMAttention(nn.Module):
    """The encoder-decoder above; ``trace`` gives the attention as ``read_weights``."""

    def __init__(self, config: LSTMAttentionConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        if input_size < 3:
            raise ValueError(
                f"lstm_attention needs item channels plus is_data and is_go, got {input_size}"
            )
        self.config = config
        hidden, width = config.hidden, config.attention_size
        self.encoder = nn.LSTM(input_size, hidden)
        self.decoder = nn.LSTMCell(input_size + hidden, hidden)
        self.key = nn.Linear(hidden, width, bias=False)  # W_e
        self.query = nn.Linear(hidden, width)  # W_h
        self.scale = nn.Parameter(torch.randn(width) / width**0.5)  # v
        self.readout = nn.Linear(2 * hidden, output_size)

    def initial_state(self, inputs: torch.Tensor) -> LSTMAttentionState:
        zeros = inputs.new_zeros(inputs.shape[1], self.config.hidden)
        return LSTMAttentionState(
            zeros, zeros, zeros, zeros, zeros, inputs.new_zeros(0, *zeros.shape), zeros[:0] > 0
        )

    def forward(
        self, inputs: torch.Tensor, state: LSTMAttentionState | None = None
    ) -> tuple[torch.Tensor, LSTMAttentionState]:
        """inputs ``[T, B, I]`` -> outputs ``[T, B, O]`` (zero in the input phase), state.

        Without a state the steps before the first go step are the input phase; with one,
        every step is a decoder step."""
        return self._run(inputs, state, None)

    def trace(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward`` from a fresh state with the attention of every step over the input
        steps: ``read_weights`` ``[T, B, 1, T]`` (zero in the input phase)."""
        attentions: list[torch.Tensor] = []
        outputs, _ = self._run(inputs, None, attentions)
        steps, batch = inputs.shape[:2]
        weights = inputs.new_zeros(steps, batch, 1, steps)
        start = steps - len(attentions)
        for offset, attention in enumerate(attentions):
            weights[start + offset, :, 0] = attention.T
        return outputs, {"read_weights": weights}

    def _run(
        self,
        inputs: torch.Tensor,
        state: LSTMAttentionState | None,
        attentions: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, LSTMAttentionState]:
        steps, batch = inputs.shape[:2]
        if state is None:
            go = (inputs[..., -1] > 0).any(dim=1)
            start = int(go.int().argmax()) if bool(go.any()) else steps
            state = self.initial_state(inputs)
            memory, hidden, cell = self._encode(
                inputs[:start], state.encoder_hidden, state.encoder_cell
            )
            state = LSTMAttentionState(
                hidden, cell, hidden, cell, state.read, memory, inputs[:start, :, -2] > 0
            )
        else:
            start = 0
        # The encoder is causal, so it reads the decoder phase's steps all at once.
        encoded, encoder_hidden, encoder_cell = self._encode(
            inputs[start:], state.encoder_hidden, state.encoder_cell
        )
        memory = torch.cat((state.memory, encoded))
        attendable = torch.cat((state.attendable, inputs[start:, :, -2] > 0))
        keys = self.key(memory)
        hidden, cell, read = state.decoder_hidden, state.decoder_cell, state.read
        seen = torch.arange(memory.shape[0], device=inputs.device).unsqueeze(1)  # [S, 1]
        prefix = state.memory.shape[0]
        outputs = [inputs.new_zeros(start, batch, self.readout.out_features)]
        for step in range(start, steps):
            hidden, cell = self.decoder(torch.cat((inputs[step], read), -1), (hidden, cell))
            now = prefix + step - start  # this step's row of memory
            weights = additive_attention(
                keys, self.query(hidden), self.scale, attendable & (seen <= now)
            )
            read = torch.einsum("sb,sbh->bh", weights, memory)
            outputs.append(self.readout(torch.cat((hidden, read), -1)).unsqueeze(0))
            if attentions is not None:
                attentions.append(weights)
        new_state = LSTMAttentionState(
            encoder_hidden, encoder_cell, hidden, cell, read, memory, attendable
        )
        return torch.cat(outputs), new_state

    def _encode(
        self, inputs: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder over ``inputs`` ``[T, B, I]`` from ``(hidden, cell)`` ``[B, H]``:
        its outputs ``[T, B, H]`` and final state (the given one for ``T = 0``)."""
        if not inputs.shape[0]:
            return inputs.new_zeros(0, *hidden.shape), hidden, cell
        encoded, (hidden, cell) = self.encoder(inputs, (hidden[None], cell[None]))
        return encoded, hidden[0], cell[0]
