"""The model contract shared by every model family.

A model is an ``nn.Module`` built as ``cls(config, input_size, output_size)`` with
``forward(inputs [T, B, I], state=None) -> (outputs [T, B, O], state)``. ``state`` is a
named tuple of tensors so it can be detached, saved and inspected. Outputs are logits;
the task owns the loss.

A model MAY also define ``trace(inputs [T, B, I]) -> (logits [T, B, O], quantities)``:
the same computation as ``forward`` from a fresh state, keeping what happened at every
step for ``memctl inspect`` (which calls it under ``torch.no_grad`` in eval mode, and
plots each quantity present). ``quantities`` maps names to tensors, time first, batch
second; the names and shapes are fixed so that every model's figures look alike:

    read_weights      [T, B, R, N]  read weightings w^r_t of the R read heads
    write_weights     [T, B, W, N]  write weightings w^w_t of the W write heads
    memory            [T+1, B, N, M]  memory M_t before the first step, then after each
    usage             [T, B, N]     DNC usage u_t
    allocation        [T, B, W, N]  DNC allocation weightings a_t
    link              [T, B, N, N]  DNC temporal link matrix L_t
    precedence        [T, B, N]     DNC precedence weighting p_t
    leaf_attention    [T, B, L]     HAM attention over the L leaves (zero where no access)
    fast_weight_norm  [T, B]        Frobenius norm of the fast-weight matrix A(t)
    hidden            [T, B, H]     the recurrent hidden state h_t
    slots             [T, B, S]     where a model traces only the S slots it touched (the
                                    sparse memories), their indices, ascending; the other
                                    quantities' N axis then has S entries, those slots'

A model without ``trace`` is inspected through its inputs, targets and outputs only.

A model MAY define ``describe_backend(batch_size: int) -> str``: which implementation
``forward`` will run for a batch of that size on the model's current device and dtype,
in a few words for people, e.g. "native (C++ kernel, whole sequence)", "native access
(C++ kernel per step)", "fused (PyTorch, hand-written backwards)", "reference (PyTorch
autograd)", "compiled (torch.compile step)". It is the same decision ``forward`` takes
(not a second guess at it), and it may raise ``memctl.errors.UserError`` where the
recipe asks for an implementation that cannot run there. The trainer calls it after
moving the model to its device (and compiling it, with ``train.compile``), prints it and
writes it to run.json. A model without it has one implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class ModelConfig(BaseModel):
    """Base of every model's config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def readout_layer(hidden: int, output_size: int, readout_hidden: int) -> nn.Module:
    """Logits from the hidden state: linear, or with ``readout_hidden > 0`` through one ReLU
    layer of that width (``U_2 ReLU(U_1 h + c_1) + c_2``)."""
    if readout_hidden == 0:
        return nn.Linear(hidden, output_size)
    return nn.Sequential(
        nn.Linear(hidden, readout_hidden), nn.ReLU(), nn.Linear(readout_hidden, output_size)
    )


def detach_state(state: Any) -> Any:
    """Detach every tensor of a (possibly nested) named tuple of tensors."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, tuple):
        parts = [detach_state(part) for part in state]
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    return state


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
