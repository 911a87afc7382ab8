"""The machine's build tools, for anything that compiles native code at run time
(``torch.compile`` on the CPU, a model's native kernel). Knows nothing of any model."""

from __future__ import annotations

import os
import shutil


def cpp_compiler() -> str | None:
    """The C++ compiler (as TorchInductor looks for one): ``$CXX``, g++, c++ or clang++."""
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return next((path for name in names if name and (path := shutil.which(name))), None)
