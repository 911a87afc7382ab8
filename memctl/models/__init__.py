"""Models, registered by name in ``memctl.registry.MODELS``.

Every registered class is also importable from here: ``from memctl.models import LSTM``.
"""

import sys

from memctl.models.base import ModelConfig, detach_state, parameter_count
from memctl.registry import MODELS, import_submodules

import_submodules(sys.modules[__name__])

for _name in MODELS.names():
    _cls = MODELS.get(_name).cls
    globals()[_cls.__name__] = _cls

# pytorch-dnc's drop-in classes (the recipe models of types "dnc", "sam" and "sdnc" are
# DNCModel, SAMModel and SDNCModel).
from memctl.models.dnc import DNC  # noqa: E402
from memctl.models.sparse.compat import SAM, SDNC  # noqa: E402

__all__ = ["DNC", "SAM", "SDNC", "MODELS", "ModelConfig", "detach_state", "parameter_count"] + [
    MODELS.get(n).cls.__name__ for n in MODELS.names()
]
