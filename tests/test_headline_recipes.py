"""The headline recipes still learn: each shipped recipe, cut to a small variant with
``--steps`` and ``--set`` as a user would, trained by ``memctl train``, loses most of its
loss within a minute. Their long results are ``memctl report``'s, in docs/results.md."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import cli

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# recipe, the small variant's settings, steps, the factor the loss must fall by.
SMALL_VARIANTS = [
    ("ham_min8", [], 500, 4),
    ("ntm_copy_small", [], 400, 5),
    (
        "dnc_copy",
        [
            "task.max_length=4",
            "curriculum.type=fixed",
            "train.batch_size=32",
            "train.lr_decay.metric=null",
            "train.optimizer.lr=0.005",
            "model.read_heads=1",
            "model.memory_size=16",
            "model.controller_layers=1",
        ],
        400,
        20,
    ),
    ("fw_assoc", ["curriculum.type=fixed", "task.pairs=2", "train.batch_size=64"], 400, 1.8),
    ("ntm_associative_recall_small", ["task.max_items=2"], 400, 2.5),
    ("ham_stack", ["curriculum.max=3", "model.min_leaves=4"], 300, 3),
    ("ham_reverse", ["curriculum.max=4", "eval.lengths=[8]"], 300, 10),
    # hard attention (REINFORCE) at n = 2: loss 0.68 to 0.12 in 800 steps
    ("ham_sort", ["curriculum.type=fixed", "task.n=2", "eval.lengths=[2]"], 800, 3),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "settings", "steps", "factor"), SMALL_VARIANTS, ids=[v[0] for v in SMALL_VARIANTS]
)
def test_the_small_variant_learns(tmp_path: Path, name, settings, steps, factor):
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    overrides += ["--set", "train.log_every=20", "--set", "train.eval_every=0"]
    overrides += ["--set", "train.compile=false", "--set", "device=cpu"]
    done = cli(
        "train", RECIPES / f"{name}.yaml", "--steps", str(steps), "--runs-dir", tmp_path,
        "--name", "small", *overrides,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    losses = pd.read_csv(tmp_path / "small" / "metrics.csv")["loss"]
    first, last = losses.iloc[:2].mean(), losses.iloc[-3:].mean()
    assert last < first / factor, (first, last)
