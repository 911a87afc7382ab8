"""References in recipes (validation, eval's and show's lines) and memctl report over the
seeds of a sweep or of separate runs, its numbers checked against the runs' eval.csv."""

from __future__ import annotations

import copy
import io
import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

import memctl.cli
from memctl.recipe import ReferenceSection, validate_recipe
from memctl.sweep import make_executor, plan_sweep, read_trials_csv, run_sweep, write_trials_csv
from tests.conftest import TINY, cli, snapshot, write_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# TINY (an LSTM on copy, 40 steps) with two references: one it meets at its trained
# length 4, one it cannot meet at length 8 (no evaluation of TINY's runs there otherwise).
REFERENCES = [
    {"source": "Graves et al. 2014, Fig. 4", "metric": "bit_errors", "value": 100,
     "at": {"level": 4}},
    {"source": "a test", "metric": "accuracy", "value": 0.99, "at": {"level": 8},
     "note": "no LSTM of 40 steps gets there"},
]  # fmt: skip


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich wraps tables to 80 columns off a terminal; the assertions read whole lines."""
    monkeypatch.setattr(memctl.cli.console, "_width", 250)


def tiny_with_references(tmp_path: Path, **changes) -> Path:
    data = copy.deepcopy(TINY) | {"reference": REFERENCES} | changes
    return write_recipe(tmp_path / f"{data['name']}.yaml", data)


def test_one_mapping_or_a_list_and_the_direction_is_the_metrics_own():
    single = validate_recipe(TINY | {"reference": REFERENCES[0]}, "r")
    assert [r.metric for r in single.reference] == ["bit_errors"]
    listed = validate_recipe(TINY | {"reference": REFERENCES}, "r")
    assert [r.lower_is_better for r in listed.reference] == [True, False]
    assert listed.resolved()["reference"][1]["lower_is_better"] is False
    assert validate_recipe(TINY, "r").reference == []


def test_references_do_not_change_what_trains_so_not_the_digest():
    plain = validate_recipe(TINY, "r")
    assert validate_recipe(TINY | {"reference": REFERENCES}, "r").digest() == plain.digest()
    assert validate_recipe(TINY | {"seed": 4}, "r").digest() != plain.digest()


def test_lower_is_better_is_met_below_and_higher_at_or_above():
    below = ReferenceSection(source="s", metric="bit_errors", value=1, at={"level": 50},
                             lower_is_better=True)  # fmt: skip
    assert below.met_by(0.99) and not below.met_by(1.0) and not below.met_by(float("nan"))
    above = below.model_copy(update={"metric": "accuracy", "lower_is_better": False})
    assert above.met_by(1.0) and above.met_by(1.5) and not above.met_by(0.99)
    assert below.condition() == "bit_errors < 1 at level 50"
    assert above.condition() == "accuracy >= 1 at level 50"


def test_every_shipped_recipe_validates_with_its_references():
    for path in sorted(RECIPES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "base" not in data:  # not a sweep file
            validate_recipe(data, str(path))


def test_show_lists_the_references(tmp_path: Path, wide_console: None):
    result = cli("show", tiny_with_references(tmp_path), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "reference (Graves et al. 2014, Fig. 4): bit_errors < 100 at level 4\n" in result.output
    assert (
        "reference (a test): accuracy >= 0.99 at level 8 (no LSTM of 40 steps gets there)"
        in result.output
    )


def test_eval_prints_each_reference_beside_ours_and_runs_its_level(
    tmp_path: Path, runs_dir: Path, wide_console: None
):
    trained = cli("train", tiny_with_references(tmp_path), "--runs-dir", runs_dir)
    assert trained.exit_code == 0, trained.output
    run = runs_dir / "tiny"
    evals = pd.read_csv(run / "eval.csv")
    final = evals.query("checkpoint == 'final' and step == 40")
    assert sorted(final["level"]) == [4, 6, 8]  # eval.lengths [6] and the references' 8
    periodic = evals.query("checkpoint == 'train'")  # step 20: the level then, and 6
    assert len(periodic) and 8 not in set(periodic["level"])
    assert "- ours " in trained.output  # training ends with the same lines

    result = cli("eval", run)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(run / "eval.csv").query("checkpoint == 'last'").set_index("level")
    ours = rows.loc[4, "bit_errors"]
    assert f"bit_errors < 100 at level 4 - ours {ours:.4g}: met" in result.output
    accuracy = rows.loc[8, "accuracy"]
    assert f"accuracy >= 0.99 at level 8 - ours {accuracy:.4g}: not met" in result.output

    narrow = cli("eval", run, "--lengths", "5")
    assert "accuracy >= 0.99 at level 8 - not evaluated at level 8" in narrow.output

    as_json = cli("eval", run, "--json")
    objects = [json.loads(line) for line in as_json.stdout.splitlines()]
    by_level = {row["level"]: row["references"] for row in objects}
    assert by_level[6] == []
    assert by_level[4][0] | {"ours": None} == {**REFERENCES[0], "value": 100.0,
                                               "lower_is_better": True, "note": None,
                                               "ours": None, "met": True}  # fmt: skip
    assert by_level[8][0]["met"] is False and by_level[8][0]["ours"] == accuracy


def final_rows(run: Path) -> pd.DataFrame:
    """The rows the report should use, found here independently: the final checkpoint's
    last evaluation at each level."""
    info = json.loads((run / "run.json").read_text())
    frame = pd.read_csv(run / "eval.csv")
    frame = frame[(frame["checkpoint_step"] == info["step"])
                  & frame["checkpoint"].isin(["final", "last"])]  # fmt: skip
    return frame.groupby("level").last()


def test_report_on_a_tiny_sweep_matches_the_runs_eval_csv(tmp_path: Path, wide_console: None):
    base = yaml.safe_load((RECIPES / "ntm_copy_small.yaml").read_text())
    base |= {"device": "cpu", "reference": [
        {"source": "made up, met", "metric": "bit_errors", "value": 100, "at": {"level": 4}},
        {"source": "made up, not met", "metric": "accuracy", "value": 0.999, "at": {"level": 8}},
    ]}  # fmt: skip
    write_recipe(tmp_path / "small.yaml", base)
    sweep = {"name": "small", "base": "small.yaml", "seeds": [0, 1],
             "set": {"train.steps": 20, "train.log_every": 10, "train.eval_every": 0,
                     "train.checkpoint_every": 20}}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    plan = plan_sweep(tmp_path / "sweep.yaml", tmp_path / "runs")
    rows = run_sweep(plan, make_executor(plan, "local", 2), poll_s=0.2)
    assert [row["status"] for row in rows] == ["finished", "finished"]
    runs = [plan.sweep_dir / trial.name for trial in plan.trials]
    # A later evaluation of one seed's final checkpoint with more batches replaces its rows.
    assert cli("eval", runs[1], "--batches", "8").exit_code == 0
    evals = [final_rows(run) for run in runs]
    assert (evals[1]["sequences"] == 8 * 16).all() and (evals[0]["sequences"] == 4 * 16).all()

    before = snapshot(plan.sweep_dir)
    result = cli("report", plan.sweep_dir, "--csv")
    assert result.exit_code == 0, result.output
    assert snapshot(plan.sweep_dir) == before  # the report only reads
    table = pd.read_csv(io.StringIO(result.stdout))
    assert list(table["level"]) == [4, 8]  # ntm_copy_small evaluates at 4 and 8
    assert set(table["recipe"]) == {"small"} and set(table["seeds"]) == {"0,1"}
    for _, row in table.iterrows():
        values = [frame.loc[row["level"], row["metric"]] for frame in evals]
        assert row["median"] == pytest.approx(statistics.median(values))
        assert (row["min"], row["max"]) == (pytest.approx(min(values)), pytest.approx(max(values)))
        assert (row["runs"], row["evaluated"]) == (2, 2)
    assert list(table["metric"]) == ["bit_errors", "accuracy"]
    assert list(table["met"]) == [2, 0]  # 20 steps: under 100 bit errors, not 99.9% exact
    assert set(table["steps"]) == {20}
    walls = [pd.read_csv(run / "metrics.csv")["wall_s"].iloc[-1] for run in runs]
    assert table["wall_s"].iloc[0] == pytest.approx(statistics.median(walls))

    markdown = cli("report", plan.sweep_dir, "--markdown")
    assert markdown.exit_code == 0, markdown.output
    lines = markdown.stdout.splitlines()
    assert lines[0].startswith(f"`memctl report {plan.sweep_dir} --markdown` (20")
    info = json.loads((runs[0] / "run.json").read_text())
    machine = f"- machine: torch {info['versions']['torch']}, {info['threads']} thread"
    assert lines[2].startswith(machine) and lines[2].endswith(": 2 runs")
    assert f"{info['cpu']} ({info['cores']} cores), cpu" in lines[2]
    assert lines[4].startswith("| recipe | level | metric | median | min | max | met |")
    assert lines[6].startswith("| small | 4 | bit_errors |") and "| 2/2 | < 100 |" in lines[6]
    assert "| 0/2 | >= 0.999 | made up, not met | 0,1 | 20 |" in lines[7]

    people = cli("report", plan.sweep_dir)
    assert people.exit_code == 0, people.output
    assert "reference of small at level 8: made up, not met" in people.output
    assert "machine: torch" in people.output

    # A trial that never started (or failed before its first step) is a seed not met.
    stored = yaml.safe_load(
        (plan.sweep_dir / "recipes" / f"{plan.trials[0].name}.yaml").read_text()
    )
    write_recipe(plan.sweep_dir / "recipes" / "small-seed=2.yaml",
                 stored | {"name": "small-seed=2", "seed": 2})  # fmt: skip
    trials = read_trials_csv(plan.sweep_dir)
    write_trials_csv(plan.sweep_dir, [*trials, {**trials[0], "trial": "small-seed=2",
                                                "status": "failed", "seed": "2"}])  # fmt: skip
    table = pd.read_csv(io.StringIO(cli("report", plan.sweep_dir, "--csv").stdout))
    assert list(table["runs"]) == [3, 3] and list(table["evaluated"]) == [2, 2]
    assert list(table["met"]) == [2, 0] and set(table["seeds"]) == {"0,1,2"}
    assert "small-seed=2: failed, no final evaluation" in cli("report", plan.sweep_dir).output


def test_report_groups_plain_runs_by_recipe_and_counts_an_unfinished_seed(
    tmp_path: Path, runs_dir: Path, wide_console: None
):
    recipe = tiny_with_references(tmp_path)
    for seed in (0, 1, 2):
        result = cli("train", recipe, "--runs-dir", runs_dir, "--name", f"tiny_s{seed}",
                     "--seed", seed, "--steps", 10)  # fmt: skip
        assert result.exit_code == 0, result.output
    other = cli("train", recipe, "--runs-dir", runs_dir, "--name", "wide", "--steps", 10,
                "--set", "model.hidden=8")  # fmt: skip
    assert other.exit_code == 0, other.output
    info_file = runs_dir / "tiny_s2" / "run.json"
    info_file.write_text(json.dumps(json.loads(info_file.read_text()) | {"status": "failed"}))

    paths = [runs_dir / name for name in ("tiny_s0", "tiny_s1", "tiny_s2", "wide")]
    table = pd.read_csv(io.StringIO(cli("report", *paths, "--csv").stdout))
    # Ten steps: the curriculum's level 2, eval.lengths' 6 and the references' 4 and 8.
    assert list(table["recipe"]) == ["tiny_s"] * 4 + ["wide"] * 4
    assert list(table["level"]) == [2, 4, 6, 8] * 2
    assert list(table["seeds"]) == ["0,1,2"] * 4 + ["3"] * 4  # TINY's seed
    met = table.iloc[1]
    assert (met["runs"], met["evaluated"], met["met"]) == (3, 2, 2)
    values = [final_rows(runs_dir / f"tiny_s{s}").loc[4, "bit_errors"] for s in (0, 1)]
    assert met["median"] == pytest.approx(statistics.median(values))
    assert table.iloc[2]["metric"] == "bit_errors" and pd.isna(table.iloc[2]["met"])

    result = cli("report", *paths)
    assert "tiny_s2: failed, no final evaluation" in result.output


def test_report_bad_input_is_one_line(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for args, needle in (
        ([tmp_path / "missing"], "no such run directory or sweep folder"),
        ([tmp_path / "empty"], "not a memctl run or sweep folder"),
        ([tmp_path / "empty", "--csv", "--markdown"], "--markdown and --csv: choose one"),
    ):
        result = cli("report", *args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_results_sweeps_run_their_recipe_as_shipped_over_their_seeds(tmp_path: Path):
    sweeps = sorted((RECIPES / "results").glob("*_seeds.yaml"))
    names = {path.name.removesuffix("_seeds.yaml") for path in sweeps}
    # issue 22's HAM comparison: a median of 3 seeds for each model on each task
    ham_tasks = {f"{model}_{task}" for model in ("ham", "lstm", "lstm_attention")
                 for task in ("sort", "reverse", "search", "merge", "add")}  # fmt: skip
    assert names == {"ham_min8", "ntm_copy", "dnc_copy", "fw_assoc", "ntm_associative_recall",
                     "lstm_associative_recall", "dnc_adding", "dnc_argmax",
                     "dnc_repeat_copy", "sam_copy", "sam_adding",
                     "sdnc_copy"} | ham_tasks  # fmt: skip
    for path in sweeps:
        recipe = path.name.removesuffix("_seeds.yaml")
        plan = plan_sweep(path, tmp_path)
        shipped = validate_recipe(yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text()), "r")
        # issue 21's sparse recipes: a median of 3 seeds (runs of 15 minutes to 2 hours)
        three = ham_tasks | {"sam_copy", "sdnc_copy", "sam_adding"}
        seeds = [0, 1, 2] if recipe in three else [0, 1, 2, 3, 4]
        assert [t.recipe.seed for t in plan.trials] == seeds
        first = plan.trials[0].recipe.model_copy(update={"name": shipped.name})
        assert first.resolved() == shipped.resolved()  # seed 0 is the recipe itself
    assert list(tmp_path.iterdir()) == []  # planning writes nothing


@pytest.mark.parametrize("task", ["sort", "reverse", "search", "merge", "add"])
def test_ham_baselines_train_on_the_ham_recipes_task_curriculum_and_budget(task: str):
    # the HAM paper's comparison: the baselines see the same data for as long
    def load(name: str) -> dict:
        return validate_recipe(yaml.safe_load((RECIPES / f"{name}.yaml").read_text()), name)

    ham = load(f"ham_{task}").resolved()
    for baseline in (f"lstm_{task}", f"lstm_attention_{task}"):
        other = load(baseline).resolved()
        for section in ("task", "curriculum", "eval", "seed"):
            assert other[section] == ham[section], (baseline, section)
        assert other["train"]["steps"] == ham["train"]["steps"], baseline
        assert other["train"]["batch_size"] == ham["train"]["batch_size"], baseline
