"""The model contract shared by every model family.

A model is an ``nn.Module`` built as ``cls(config, input_size, output_size)`` with
``forward(inputs [T, B, I], state=None) -> (outputs [T, B, O], state)``. ``state`` is a
named tuple of tensors so it can be detached, saved and inspected. Outputs are logits;
the task owns the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict


class ModelConfig(BaseModel):
    """Base of every model's config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


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
