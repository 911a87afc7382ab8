"""The Differentiable Neural Computer: the model (``model.py``), its implementations
behind one boundary (``backend.py`` chooses among the reference maths of
``addressing.py``, ``fused.py``'s hand-written backwards, ``torch.compile`` and the C++
kernel of ``native.py``), and pytorch-dnc's drop-in ``DNC`` (``compat.py``).
"""

from memctl.models.controllers import ControllerState
from memctl.models.dnc.compat import DNC, debug_views
from memctl.models.dnc.model import (
    AccessState,
    DNCConfig,
    DNCCore,
    DNCModel,
    DNCState,
    MemoryAccess,
)

__all__ = [
    "DNC",
    "AccessState",
    "ControllerState",
    "DNCConfig",
    "DNCCore",
    "DNCModel",
    "DNCState",
    "MemoryAccess",
    "debug_views",
]
