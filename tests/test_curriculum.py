import pytest
import torch

from memctl.curriculum import Curriculum
from memctl.errors import UserError
from memctl.recipe import CurriculumSection
from memctl.tasks.copy import CopyConfig, CopyTask

TASK = CopyTask(CopyConfig(min_length=1, max_length=10))


def test_fixed_uses_the_task_parameter():
    curriculum = Curriculum(CurriculumSection(type="fixed", start=3), TASK)
    assert curriculum.level == 10
    curriculum.load_state_dict({"level": 4, "window": []})
    assert curriculum.level == 10


def test_step_increments_every_n_steps_up_to_max():
    curriculum = Curriculum(CurriculumSection(type="step", start=2, increment=3, every=5), TASK)
    levels = []
    for step in range(1, 21):
        curriculum.after_step(step)
        levels.append(curriculum.level)
    assert levels[3] == 2 and levels[4] == 5 and levels[9] == 8 and levels[14] == 10
    assert levels[-1] == 10


def test_adaptive_advances_when_window_mean_passes_and_restarts_window():
    section = CurriculumSection(
        type="adaptive", start=1, metric="bit_errors", threshold=0.5, window=3
    )
    curriculum = Curriculum(section, TASK)
    for value in (2.0, 0.1, 0.1):
        curriculum.after_log({"bit_errors": value})
    assert curriculum.level == 1  # mean 0.73
    curriculum.after_log({"bit_errors": 0.1})
    assert curriculum.level == 2 and curriculum.window == []
    state = curriculum.state_dict()
    again = Curriculum(section, TASK)
    again.load_state_dict(state)
    assert again.level == 2


def test_start_outside_the_task_range_is_a_user_error():
    with pytest.raises(UserError, match=r"curriculum\.start"):
        Curriculum(CurriculumSection(type="step", start=11), TASK)


def test_batch_mix_draws_one_level_per_batch_covering_the_range():
    curriculum = Curriculum(CurriculumSection(type="step", start=6, mix="batch"), TASK)
    generator = torch.Generator().manual_seed(0)
    drawn = set()
    for _ in range(200):
        low, high = curriculum.batch_levels(generator)
        assert low == high
        drawn.add(high)
    assert drawn == set(range(1, 7))
    uniform = Curriculum(CurriculumSection(type="step", start=6), TASK)
    assert uniform.batch_levels(generator) == (1, 6)
    level = Curriculum(CurriculumSection(type="step", start=6, mix="level"), TASK)
    assert level.batch_levels(generator) == (6, 6)
