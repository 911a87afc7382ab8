"""Binary addition, the ``add`` task of Hierarchical Attentive Memory (Andrychowicz & Kurach
2016, section 4): two n-bit numbers in, their (n+1)-bit sum out.

The input is the symbol sequence ``a_1 .. a_n + b_1 .. b_n =`` (2n + 2 data steps, bits
least significant first), the output ``c_1 .. c_(n+1)`` on n + 1 go steps, where
``c = a + b`` and ``c_(n+1)`` is the carry out. Every symbol is one-hot over
``0, 1, +, =``; the last two channels are the layout the HAM model reads (data steps
become its leaves, go steps its memory accesses), as in ``ham_tasks.py``:

    step          0 .. 2n+1                  2n+2 .. 2N+1   2N+2 .. 2N+n+2   .. 2N+N+2
    inputs[:4]    one-hot a_i, +, b_i, =     0              0                0
    inputs[4]     1 (is_data)                0              0                0
    inputs[5]     0                          0              1 (is_go)        0
    targets       -                          -              c_1 .. c_(n+1)   -

``N`` is the batch's largest n; shorter sequences are padded after their data and after
their answers, and only the answers are scored (sigmoid cross-entropy on the one output
bit). The curriculum parameter is ``n``.

``layout: columns`` gives the two numbers a bit position at a time instead: data step i
holds ``a_i`` and ``b_i`` (n data steps, each one HAM leaf, the columns of the written
sum), with the same answers:

    step          0 .. n-1          n .. N-1    N .. N+n        .. 2N
    inputs[:2]    a_i, b_i          0           0               0
    inputs[2]     1 (is_data)       0           0               0
    inputs[3]     0                 0           1 (is_go)       0
    targets       -                 -           c_1 .. c_(n+1)  -

With one memory access per answer, the symbol layout asks a hard HAM for two leaves
(``a_i`` and ``b_i``) at once; in columns each answer needs one leaf, the next one.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from memctl.registry import TASKS
from memctl.tasks.base import Batch, Task, TaskConfig, draw_levels

ZERO, ONE, PLUS, EQUALS = range(4)  # the symbols' channels


class AddConfig(TaskConfig):
    type: str = "add"
    min_n: int = Field(1, ge=1, description="fewest bits per number in a mixed batch")
    n: int = Field(8, ge=1, description="bits per number: the curriculum parameter")
    layout: Literal["symbols", "columns"] = Field(
        "symbols",
        description="symbols: a_1 .. a_n + b_1 .. b_n = one symbol a step; columns: "
        "a_i and b_i together on step i",
    )

    ordered_fields = (("min_n", "n"),)


@TASKS.register("add", AddConfig)
class AddTask(Task):
    level_field = "n"
    primary_metric = "accuracy"
    higher_is_better = True
    output_size = 1

    def __init__(self, config: AddConfig) -> None:
        super().__init__(config)
        # the symbols or the two bits, then is_data, is_go
        self.input_size = (4 if config.layout == "symbols" else 2) + 2

    @property
    def min_level(self) -> int:
        return self.config.min_n

    def sample(
        self, batch_size: int, generator: torch.Generator, *, max_level: int, min_level: int
    ) -> Batch:
        counts = draw_levels(batch_size, min_level, max_level, generator)  # [B]
        most = int(counts.max())
        bits = torch.randint(0, 2, (2, most, batch_size), generator=generator)
        position = torch.arange(most).unsqueeze(1)  # [N, 1]
        bits = bits * (position < counts)  # each number has n bits
        # Ripple-carry, a bit position at a time (no integer overflow for any n); past a
        # sequence's n bits both numbers are 0, so its c_(n+1) is the carry out.
        answer = torch.zeros(most + 1, batch_size, dtype=torch.long)
        carry = torch.zeros(batch_size, dtype=torch.long)
        for i in range(most):
            digit_sum = bits[0, i] + bits[1, i] + carry
            answer[i], carry = digit_sum % 2, digit_sum // 2
        answer[most] = carry
        layout = self._symbols if self.config.layout == "symbols" else self._columns
        return self._answering(layout(bits, counts), answer, counts)

    def _symbols(self, bits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The data steps of the symbol layout, ``[2N + 2, B, input_size]``, from ``bits``
        ``[2, N, B]`` (zero past each n)."""
        most, batch_size = bits.shape[1:]
        data_steps = 2 * most + 2
        symbols = torch.full((data_steps, batch_size), -1, dtype=torch.long)
        step = torch.arange(data_steps).unsqueeze(1)  # [2N+2, 1]
        batch_index = torch.arange(batch_size)
        in_a = step < counts
        in_b = (step > counts) & (step <= 2 * counts)
        a_bits = bits[0].gather(0, step.clamp(max=most - 1).expand(-1, batch_size))
        b_index = (step - counts - 1).clamp(0, most - 1)
        b_bits = bits[1].gather(0, b_index)
        symbols = torch.where(in_a, a_bits, symbols)
        symbols = torch.where(in_b, b_bits, symbols)
        symbols[counts, batch_index] = PLUS
        symbols[2 * counts + 1, batch_index] = EQUALS
        is_data = symbols >= 0
        data = torch.zeros(data_steps, batch_size, self.input_size)
        one_hot = torch.nn.functional.one_hot(symbols.clamp_min(0), 4).float()
        data[:, :, :4] = one_hot * is_data.unsqueeze(-1)
        data[:, :, 4] = is_data.float()
        return data

    def _columns(self, bits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The data steps of the columns layout, ``[N, B, input_size]``."""
        most, batch_size = bits.shape[1:]
        data = torch.zeros(most, batch_size, self.input_size)
        data[:, :, :2] = bits.permute(1, 2, 0).float()
        data[:, :, 2] = (torch.arange(most).unsqueeze(1) < counts).float()
        return data

    def _answering(self, data: torch.Tensor, answer: torch.Tensor, counts: torch.Tensor) -> Batch:
        """``data`` ``[D, B, I]`` followed by the N + 1 go steps that answer ``answer``
        ``[N + 1, B]``, the first n + 1 of each sequence scored."""
        answer_steps, batch_size = answer.shape
        is_answer = torch.arange(answer_steps).unsqueeze(1) <= counts  # n + 1 answers
        go = torch.zeros(answer_steps, batch_size, self.input_size)
        go[:, :, -1] = is_answer.float()
        inputs = torch.cat((data, go))
        targets = torch.zeros(inputs.shape[0], batch_size, 1)
        targets[len(data) :, :, 0] = (answer * is_answer).float()
        mask = torch.zeros(inputs.shape[0], batch_size)
        mask[len(data) :] = is_answer.float()
        return Batch(inputs, targets, mask)
