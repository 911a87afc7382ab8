"""Fast weights (Ba, Hinton, Mnih, Leibo & Ionescu 2016, "Using Fast Weights to Attend to
the Recent Past", arXiv 1610.06258) and the recurrent baselines of its section 4.1.

``rnn_ln_fw``  layer-normalised ReLU RNN with a fast associative memory (eqs. 1-2 and the
               layer-normalised inner loop of section 3.1):
                   A(t) = lambda A(t-1) + eta h(t) h(t)^T,                A(0) = 0
                   h_0(t+1) = f(LN[W h(t) + C x(t)])
                   h_{s+1}(t+1) = f(LN[W h(t) + C x(t) + A(t) h_s(t+1)]),  s = 0..S-1
               and h(t+1) = h_S(t+1), f = ReLU. ``A(t) h`` is computed by default without
               the H x H matrix, as the paper's section 3 describes:
                   A(t) h = eta sum_{tau=1..t} lambda^(t-tau) h(tau) (h(tau)^T h)
               (``explicit: true`` keeps the matrix instead; both give the same numbers).
               ``attend_current: false`` attends with A(t-1) instead of A(t).
``rnn_ln``     the same network without fast weights: h(t+1) = f(LN[W h(t) + C x(t)]).
``control``    plain ReLU RNN without layer normalisation, W = I at start (the paper's
               IRNN baseline, Le, Jaitly & Hinton 2015): h(t+1) = f(W h(t) + C x(t)).
``gru_ln``     GRU (Cho et al. 2014) with layer normalisation of every pre-activation.

The LSTM baseline is the ``lstm`` model (``memctl/models/lstm.py``). Every model reads out
logits from its hidden state at every step through one linear layer; the task scores the
steps it needs (associative retrieval: the last one). ``W`` starts as ``recurrent_init * I``
(0.05 I for the layer-normalised RNNs, as in the paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field
from torch import nn

from memctl.models.base import ModelConfig, readout_layer
from memctl.models.lstm import LSTMState
from memctl.registry import MODELS


def fast_weight_update(
    fast_weights: torch.Tensor, hidden: torch.Tensor, decay: float, fast_lr: float
) -> torch.Tensor:
    """Explicit fast-weight matrix, eq. 1: ``A(t) = lambda A(t-1) + eta h(t) h(t)^T``.

    fast_weights: ``[B, H, H]``, A(t-1); hidden: ``[B, H]``, h(t). Returns ``[B, H, H]``.
    """
    return decay * fast_weights + fast_lr * hidden.unsqueeze(2) * hidden.unsqueeze(1)


def fast_weight_apply(fast_weights: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``A(t) h_s`` with the explicit matrix. fast_weights ``[B, H, H]``, query ``[B, H]``."""
    return torch.bmm(fast_weights, query.unsqueeze(2)).squeeze(2)


def fast_weight_attend(
    history: torch.Tensor, query: torch.Tensor, decay: float, fast_lr: float
) -> torch.Tensor:
    """``A(t) h_s`` without the matrix (section 3, "attention to the recent past"):

        A(t) h = eta sum_{tau=1..t} lambda^(t-tau) h(tau) (h(tau)^T h)

    history: ``[B, t, H]``, the hidden vectors h(1)..h(t), oldest first; query: ``[B, H]``,
    h_s(t+1). Returns ``[B, H]``. Costs O(t H) per sequence instead of O(H^2).
    """
    steps = history.shape[1]
    ages = torch.arange(steps - 1, -1, -1, dtype=history.dtype, device=history.device)
    scores = torch.bmm(history, query.unsqueeze(2)).squeeze(2) * decay**ages  # [B, t]
    return fast_lr * torch.bmm(scores.unsqueeze(1), history).squeeze(1)


class _EncoderReadoutConfig(ModelConfig):
    """Input encoding and read-out shared by the section 4.1 models (defaults: none)."""

    embedding: int = Field(
        0, ge=0, description="learned linear embedding of the inputs before C (0: none)"
    )
    readout_hidden: int = Field(
        0, ge=0, description="ReLU layer of this many units before the logits (0: none)"
    )


class RNNLNConfig(_EncoderReadoutConfig):
    type: str = "rnn_ln"
    hidden: int = Field(50, ge=1, description="R, the number of hidden units")
    recurrent_init: float = Field(0.05, ge=0, description="W = recurrent_init * I at start")
    ln_eps: float = Field(1e-5, gt=0, description="layer-norm epsilon")


class FastWeightsConfig(RNNLNConfig):
    type: str = "rnn_ln_fw"
    decay: float = Field(0.95, gt=0, le=1, description="lambda, fast-weight decay")
    fast_lr: float = Field(0.5, gt=0, description="eta, fast-weight learning rate")
    inner_steps: int = Field(1, ge=1, description="S, inner-loop iterations per step")
    explicit: bool = Field(False, description="keep the H x H matrix A(t) per sequence")
    # Eq. 1 puts h(t) h(t)^T into the A(t) that computes h(t+1). The public reproduction
    # jxwufan/AssociativeRetrieval attends with A(t-1) instead; in our runs that escaped
    # the chance-among-the-values plateau much sooner (README, Fast weights).
    attend_current: bool = Field(True, description="attend with A(t) (eq. 1); false: A(t-1)")


class ControlConfig(_EncoderReadoutConfig):
    type: str = "control"
    hidden: int = Field(50, ge=1, description="R, the number of hidden units")
    recurrent_init: float = Field(1.0, ge=0, description="W = recurrent_init * I (IRNN: 1)")


class GRULNConfig(_EncoderReadoutConfig):
    type: str = "gru_ln"
    hidden: int = Field(50, ge=1, description="R, the number of hidden units")
    ln_eps: float = Field(1e-5, gt=0, description="layer-norm epsilon")


class RNNState(NamedTuple):
    """hidden: ``[B, H]``, h(t)."""

    hidden: torch.Tensor


class FastWeightsMatrixState(NamedTuple):
    """hidden: ``[B, H]``, h(t); fast_weights: ``[B, H, H]``, A(t-1) (h(t) not yet added)."""

    hidden: torch.Tensor
    fast_weights: torch.Tensor


class FastWeightsHistoryState(NamedTuple):
    """hidden: ``[B, H]``, h(t); history: ``[B, t, H]``, h(1)..h(t-1) (h(0) = 0 included)."""

    hidden: torch.Tensor
    history: torch.Tensor


def input_layer(input_size: int, size: int, embedding: int) -> nn.Module:
    """``C x + b``; with ``embedding > 0``, ``C E x + b`` through a learned linear embedding
    ``E`` (no bias) of that width, as public reproductions embed the one-hot characters."""
    if embedding == 0:
        return nn.Linear(input_size, size)
    return nn.Sequential(nn.Linear(input_size, embedding, bias=False), nn.Linear(embedding, size))


class _ReluRNN(nn.Module):
    """Shared parts of the ReLU RNNs: ``C x(t) + b`` (``input``), ``W`` (``recurrent``),
    the read-out, and the time loop; subclasses define one transition."""

    def __init__(
        self, config: ControlConfig | RNNLNConfig, input_size: int, output_size: int
    ) -> None:
        super().__init__()
        self.config = config
        self.input = input_layer(input_size, config.hidden, config.embedding)
        self.recurrent = nn.Parameter(config.recurrent_init * torch.eye(config.hidden))
        self.readout = readout_layer(config.hidden, output_size, config.readout_hidden)

    def initial_state(self, inputs: torch.Tensor) -> tuple:
        hidden = inputs.new_zeros(inputs.shape[1], self.recurrent.shape[0])
        return RNNState(hidden)

    def step(self, driven: torch.Tensor, state: tuple) -> tuple:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor, state: tuple | None = None) -> tuple:
        """inputs ``[T, B, I]`` -> (logits ``[T, B, O]``, state)."""
        driven = self.input(inputs)  # C x(t) + b for every step at once: [T, B, H]
        state = self.initial_state(inputs) if state is None else state
        hiddens = []
        for step in range(inputs.shape[0]):
            state = self.step(driven[step], state)
            hiddens.append(state.hidden)
        return self.readout(torch.stack(hiddens)), state


@MODELS.register("control", ControlConfig)
class ControlRNN(_ReluRNN):
    """h(t+1) = ReLU(W h(t) + C x(t) + b)."""

    def step(self, driven: torch.Tensor, state: RNNState) -> RNNState:
        return RNNState(torch.relu(state.hidden @ self.recurrent.T + driven))


@MODELS.register("rnn_ln", RNNLNConfig)
class LayerNormRNN(_ReluRNN):
    """h(t+1) = ReLU(LN[W h(t) + C x(t) + b]), LN with learned gain and bias."""

    def __init__(self, config: RNNLNConfig, input_size: int, output_size: int) -> None:
        super().__init__(config, input_size, output_size)
        self.norm = nn.LayerNorm(config.hidden, eps=config.ln_eps)

    def step(self, driven: torch.Tensor, state: RNNState) -> RNNState:
        return RNNState(torch.relu(self.norm(state.hidden @ self.recurrent.T + driven)))


@MODELS.register("rnn_ln_fw", FastWeightsConfig)
class FastWeightsRNN(_ReluRNN):
    """Layer-normalised ReLU RNN with fast weights; equations in the module docstring.

    One layer norm (gain and bias) serves h_0 and every inner step, as the inner loop is
    the same computation with a growing fast-weight term.
    """

    def __init__(self, config: FastWeightsConfig, input_size: int, output_size: int) -> None:
        super().__init__(config, input_size, output_size)
        self.norm = nn.LayerNorm(config.hidden, eps=config.ln_eps)

    def initial_state(
        self, inputs: torch.Tensor
    ) -> FastWeightsMatrixState | FastWeightsHistoryState:
        hidden = super().initial_state(inputs).hidden
        size = hidden.shape[1]
        if self.config.explicit:
            return FastWeightsMatrixState(hidden, hidden.new_zeros(hidden.shape[0], size, size))
        return FastWeightsHistoryState(hidden, hidden.new_zeros(hidden.shape[0], 0, size))

    def remember(self, state: FastWeightsMatrixState | FastWeightsHistoryState) -> torch.Tensor:
        """Add h(t) to the fast memory: A(t) ``[B, H, H]``, or h(1)..h(t) ``[B, t, H]``."""
        if self.config.explicit:
            return fast_weight_update(
                state.fast_weights, state.hidden, self.config.decay, self.config.fast_lr
            )
        return torch.cat([state.history, state.hidden.unsqueeze(1)], dim=1)

    def recall(self, memory: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """A(t) h_s(t+1), ``[B, H]``."""
        if self.config.explicit:
            return fast_weight_apply(memory, query)
        return fast_weight_attend(memory, query, self.config.decay, self.config.fast_lr)

    def step(
        self, driven: torch.Tensor, state: FastWeightsMatrixState | FastWeightsHistoryState
    ) -> FastWeightsMatrixState | FastWeightsHistoryState:
        memory = self.remember(state)  # A(t)
        attended = memory if self.config.attend_current else state[1]  # A(t) or A(t-1)
        boundary = state.hidden @ self.recurrent.T + driven  # W h(t) + C x(t) + b
        hidden = torch.relu(self.norm(boundary))  # h_0(t+1)
        for _ in range(self.config.inner_steps):
            hidden = torch.relu(self.norm(boundary + self.recall(attended, hidden)))
        return type(state)(hidden, memory)

    def trace(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward`` from a fresh state, keeping every step's state (the model contract
        in ``base.py``): logits ``[T, B, O]``, ``hidden`` h(t+1) ``[T, B, H]`` and
        ``fast_weight_norm`` ``[T, B]``, the Frobenius norm of the A(t) = lambda A(t-1)
        + eta h(t) h(t)^T that the step's inner loop attends with (eq. 1; with
        ``attend_current: false`` the loop uses the previous step's matrix). The matrix is
        kept explicitly here whatever ``explicit`` says."""
        driven = self.input(inputs)
        state = self.initial_state(inputs)
        size = state.hidden.shape[1]
        fast_weights = state.hidden.new_zeros(state.hidden.shape[0], size, size)
        hiddens, norms = [], []
        for step in range(inputs.shape[0]):
            fast_weights = fast_weight_update(
                fast_weights, state.hidden, self.config.decay, self.config.fast_lr
            )
            state = self.step(driven[step], state)
            hiddens.append(state.hidden)
            norms.append(torch.linalg.matrix_norm(fast_weights))
        hidden = torch.stack(hiddens)
        return self.readout(hidden), {"hidden": hidden, "fast_weight_norm": torch.stack(norms)}


class GRULNState(NamedTuple):
    """hidden: ``[B, H]``."""

    hidden: torch.Tensor


@MODELS.register("gru_ln", GRULNConfig)
class LayerNormGRU(nn.Module):
    """GRU with layer normalisation (Ba, Kiros & Hinton 2016) of each pre-activation:

    r = sigmoid(LN_r[W_r x + U_r h]),  z = sigmoid(LN_z[W_z x + U_z h])
    n = tanh(LN_n[W_n x + r * (U_n h)]),  h' = (1 - z) * n + z * h
    """

    def __init__(self, config: GRULNConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        size = config.hidden
        self.input = input_layer(input_size, 3 * size, config.embedding)
        self.recurrent = nn.Linear(size, 3 * size, bias=False)
        self.norm_reset = nn.LayerNorm(size, eps=config.ln_eps)
        self.norm_update = nn.LayerNorm(size, eps=config.ln_eps)
        self.norm_candidate = nn.LayerNorm(size, eps=config.ln_eps)
        self.readout = readout_layer(size, output_size, config.readout_hidden)

    def step(self, driven: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """driven ``[B, 3H]`` = W x + b (reset, update, candidate); hidden ``[B, H]``."""
        x_reset, x_update, x_candidate = driven.chunk(3, dim=-1)
        h_reset, h_update, h_candidate = self.recurrent(hidden).chunk(3, dim=-1)
        reset = torch.sigmoid(self.norm_reset(x_reset + h_reset))
        update = torch.sigmoid(self.norm_update(x_update + h_update))
        candidate = torch.tanh(self.norm_candidate(x_candidate + reset * h_candidate))
        return (1 - update) * candidate + update * hidden

    def forward(
        self, inputs: torch.Tensor, state: GRULNState | None = None
    ) -> tuple[torch.Tensor, GRULNState]:
        """inputs ``[T, B, I]`` -> (logits ``[T, B, O]``, state)."""
        driven = self.input(inputs)
        hidden = (
            inputs.new_zeros(inputs.shape[1], self.config.hidden) if state is None else state.hidden
        )
        hiddens = []
        for step in range(inputs.shape[0]):
            hidden = self.step(driven[step], hidden)
            hiddens.append(hidden)
        return self.readout(torch.stack(hiddens)), GRULNState(hidden)


class LSTMARConfig(_EncoderReadoutConfig):
    type: str = "lstm_ar"
    hidden: int = Field(50, ge=1, description="R, the number of LSTM cells")


@MODELS.register("lstm_ar", LSTMARConfig)
class EncodedLSTM(nn.Module):
    """The LSTM baseline with the same optional input embedding and ReLU read-out layer as
    the other section 4.1 models, so that a comparison changes only the recurrent core.
    With ``embedding: 0`` and ``readout_hidden: 0`` it is the ``lstm`` model (one layer)."""

    def __init__(self, config: LSTMARConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        self.config = config
        self.embed = (
            nn.Linear(input_size, config.embedding, bias=False) if config.embedding else None
        )
        self.rnn = nn.LSTM(config.embedding or input_size, config.hidden)
        self.readout = readout_layer(config.hidden, output_size, config.readout_hidden)

    def forward(
        self, inputs: torch.Tensor, state: LSTMState | None = None
    ) -> tuple[torch.Tensor, LSTMState]:
        """inputs ``[T, B, I]`` -> (logits ``[T, B, O]``, state)."""
        encoded = inputs if self.embed is None else self.embed(inputs)
        hidden_seq, (hidden, cell) = self.rnn(encoded, None if state is None else tuple(state))
        return self.readout(hidden_seq), LSTMState(hidden, cell)
