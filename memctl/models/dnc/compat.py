"""A drop-in replacement for the ``DNC`` class of pytorch-dnc (PyPI ``dnc`` 1.1.0):
its constructor, call and returned structures on ``model.DNCCore``, and its ``debug``
views. Everything else (the maths, the backends) is the recipe model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memctl.models.controllers import ControllerState
from memctl.models.dnc.model import AccessState, DNCCore, DNCState


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
