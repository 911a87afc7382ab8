"""The command line's conveniences and its fixed defects: help, listings, shortcuts."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

import memctl.models  # noqa: F401  (registers the models)
from memctl.registry import MODELS

ROOT = Path(__file__).resolve().parent.parent
# The names the package description uses, and the registered model each stands for.
DESCRIBED_MODELS = {"NTM": "ntm", "DNC": "dnc", "HAM": "ham", "Fast Weights": "rnn_ln_fw",
                    "LSTM": "lstm"}  # fmt: skip


def test_package_description_names_only_models_that_exist():
    description = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]
    named = re.search(r"\(([^)]*)\)", description).group(1).split(", ")
    assert set(named) == set(DESCRIBED_MODELS), named
    assert all(DESCRIBED_MODELS[name] in MODELS for name in named)
