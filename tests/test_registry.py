"""``registry.import_submodules``: every module of a package's tree is imported, those in
subpackages too (``models/dnc/``), so a registration anywhere in the tree runs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from memctl.registry import import_submodules


def test_modules_of_subpackages_are_imported(tmp_path: Path, monkeypatch):
    package = tmp_path / "plugin_tree"
    (package / "family").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "top.py").write_text("")
    (package / "family" / "__init__.py").write_text("")  # imports nothing itself
    (package / "family" / "leaf.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("plugin_tree", "plugin_tree.top", "plugin_tree.family", "plugin_tree.family.leaf"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import_submodules(importlib.import_module("plugin_tree"))
    assert {"plugin_tree.top", "plugin_tree.family", "plugin_tree.family.leaf"} <= set(sys.modules)
