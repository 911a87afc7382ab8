"""Sparse Access Memory, SAM (Rae et al. 2016, "Scaling Memory-Augmented Neural Networks
with Sparse Reads and Writes", arXiv 1610.09027, section 3; equations numbered as there).

At every step the controller (a stack of LSTM, GRU or plain RNN layers,
``controllers.py``, as the DNC's) sees the input and the previous step's read vectors; its
output, clipped to ``+-clip``, goes through one linear layer to the interface: read keys
``k^r`` and strengths ``beta^r`` (oneplus) of R heads, a write vector ``a``, a write gate
``alpha`` and an interpolation gate ``gamma`` (sigmoids). The access then:

1. writes (eq. 4, 5): ``w^W_t = alpha (gamma w^R_{t-1} + (1 - gamma) I^U_t)`` over the K
   rows each head read at t-1 (``w^R_{t-1}`` their mean over heads) and the least
   recently used row ``U`` (``usage.py``), which is erased first:
   ``M_t = (1 - R_t) o M_{t-1} + w^W_t a^T`` with ``R_t`` ones on row ``U``;
2. reads (eq. 2, 3): each head takes the K rows nearest its key (cosine similarity,
   ``addressing.py``'s, exact on the live memory over the candidates of the slot index,
   ``index.py``) and softmaxes ``beta^r`` times their similarities:
   ``r = sum_k w~(s_k) M_t(s_k)``;
3. records the step's accesses in the usage.

The output layer sees the controller output and the read vectors, as the DNC's. Memory
rows live in ``access.SparseMemory`` (in place, gradients through the touched rows only);
a step touches ``R K + 1`` rows to write and ``R K`` to read, whatever N.

``SparseAccess.write`` and ``read`` are the two halves of a step on the memory, its index
and its usage, for models that add to them (SDNC's sparse temporal links sit beside
them). ``SAMCore`` holds it all, with the DNC's layering (``num_layers`` controller + memory
layers, one memory shared or one each); ``SAMModel`` is the recipe model
(``model.type: sam``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from memctl.models import addressing
from memctl.models.base import ModelConfig
from memctl.models.controllers import ControllerState, layered_controllers, require_positive
from memctl.models.sparse.access import SparseMemory
from memctl.models.sparse.index import build_index
from memctl.models.sparse.usage import NEVER, LeastRecentlyUsed
from memctl.registry import MODELS

Index = Literal["auto", "exact", "faiss"]


def sparse_read(
    rows: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (2)-(3): ``w~(s_k) = softmax_k(beta K[k^r, M(s_k)])``, ``r = sum_k w~(s_k) M(s_k)``
    over the K rows ``s_k`` of each head, with ``addressing.py``'s cosine similarity.

    rows: ``[B, R, K, M]``, keys: ``[B, R, M]``, strengths (beta >= 0): ``[B, R]``
    -> (weights ``[B, R, K]``, read vectors ``[B, R, M]``)
    """
    unit_keys = keys * addressing.inverse_norms(keys).unsqueeze(-1)
    similarity = (rows @ unit_keys.unsqueeze(-1)).squeeze(-1) * addressing.inverse_norms(rows)
    weights = torch.softmax(strengths.unsqueeze(-1) * similarity, dim=-1)
    return weights, (weights.unsqueeze(-2) @ rows).squeeze(-2)


def write_weighting(
    read_weights: torch.Tensor, write_gate: torch.Tensor, interpolation_gate: torch.Tensor
) -> torch.Tensor:
    """Eq. (4): ``w^W = alpha (gamma w^R_{t-1} + (1 - gamma) I^U)``, sparse: the weights of
    the rows read at t-1 (head after head, ``w^R`` the heads' mean), then of row ``U``.

    read_weights (of t-1): ``[B, R, K]``, write_gate (alpha), interpolation_gate (gamma),
    in [0, 1]: ``[B]`` -> ``[B, R K + 1]``
    """
    heads = read_weights.shape[1]
    previous = read_weights.flatten(1) * (write_gate * interpolation_gate / heads).unsqueeze(1)
    return torch.cat([previous, (write_gate * (1 - interpolation_gate)).unsqueeze(1)], 1)


def sparse_write(
    old: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    erased: torch.Tensor,
    add: torch.Tensor,
) -> torch.Tensor:
    """Eq. (5): ``M_t(i) = (1 - [i = U]) M_{t-1}(i) + w^W(i) a``, for the listed rows: a row
    listed more than once gets the sum of its weights (every copy the same new value).

    old (the rows' contents): ``[B, J, M]``, rows: ``[B, J]``, weights: ``[B, J]``, erased
    (row U): ``[B]``, add (a): ``[B, M]`` -> new contents ``[B, J, M]``
    """
    same = (rows.unsqueeze(2) == rows.unsqueeze(1)).to(weights.dtype)  # [B, J, J]
    total = torch.bmm(same, weights.unsqueeze(2))  # [B, J, 1]
    keep = (rows != erased.unsqueeze(1)).to(old.dtype).unsqueeze(2)
    return torch.addcmul(old * keep, total, add.unsqueeze(1))


class SparseAccessState(NamedTuple):
    """One sparse memory's state (its rows are in the ``SparseMemory``).

    memory:       0-d token chaining the memory's operations (``access.py``)
    version:      0-d long, on the CPU: the memory's version this state was made at
    read_rows:    ``[B, R, K]`` long, the slots each head read
    read_weights: ``[B, R, K]``, their weights
    """

    memory: torch.Tensor
    version: torch.Tensor
    read_rows: torch.Tensor
    read_weights: torch.Tensor


class SAMState(NamedTuple):
    """One ``ControllerState`` per layer, one ``SparseAccessState`` per memory (one if
    shared), and the last layer's read vectors ``[B, R, M]``."""

    controller: tuple[ControllerState, ...]
    access: tuple[SparseAccessState, ...]
    reads: torch.Tensor


class StepRecord(NamedTuple):
    """What one access did, for ``trace``: write rows ``[B, J]``, their weights ``[B, J]``
    and new contents ``[B, J, M]``; read rows and weights ``[B, R, K]``; the rows whose
    access ``usage.update`` recorded ``[B, L]`` and whether each counted, bool ``[B, L]``."""

    write_rows: torch.Tensor
    write_weights: torch.Tensor
    written: torch.Tensor
    read_rows: torch.Tensor
    read_weights: torch.Tensor
    usage_rows: torch.Tensor
    accessed: torch.Tensor


class SparseAccess(nn.Module):
    """SAM's memory access: one linear layer from the controller output to the interface
    (read keys ``R x M`` and write vector ``M``, identity; read strengths ``R``, oneplus;
    write and interpolation gates, sigmoid: ``RM + M + R + 2`` numbers), the memory, its
    slot index and its usage."""

    def __init__(
        self,
        input_size: int,
        memory_size: int,
        word_size: int,
        read_heads: int,
        sparse_reads: int,
        index: Index = "auto",
        rebuild_every: int = 1000,
    ) -> None:
        super().__init__()
        if not 1 <= sparse_reads <= memory_size:
            raise ValueError(f"sparse_reads must be in 1..memory_size (got {sparse_reads})")
        self.memory_size, self.word_size = memory_size, word_size
        self.read_heads, self.sparse_reads = read_heads, sparse_reads
        self.sizes = [(read_heads + 1) * word_size, read_heads, 2]
        self.interface = nn.Linear(input_size, sum(self.sizes))
        self.index_kind = index
        self.memory = SparseMemory(memory_size, word_size)
        self.index = build_index(index, memory_size, self.memory.peek, rebuild_every)
        self.usage = LeastRecentlyUsed(memory_size)

    def initial_state(
        self, batch: int, device: torch.device, dtype: torch.dtype
    ) -> SparseAccessState:
        """Start an episode: empty the memory, the index and the usage (O(rows touched) in
        the last episode); nothing read yet (weights 0 on rows 0..K-1)."""
        token = self.memory.reset(batch, device, dtype)
        self.index.reset(batch, self.memory_size, self.word_size)
        self.usage.reset(batch, device)
        shape = (batch, self.read_heads, self.sparse_reads)
        rows = torch.arange(self.sparse_reads, device=device).expand(shape)
        weights = torch.zeros(shape, device=device, dtype=dtype)
        return SparseAccessState(token, torch.tensor(self.memory.version), rows, weights)

    def nearest(self, keys: torch.Tensor) -> torch.Tensor:
        """The K slots nearest each key ``[B, R, M]`` -> long ``[B, R, K]``: the index's
        candidates rescored exactly on the live memory."""
        candidates = self.index.candidates(keys, self.sparse_reads)
        unit_keys = keys * addressing.inverse_norms(keys).unsqueeze(-1)
        if candidates.stride(1) == 0:  # the same candidates for every head
            values = self.memory.peek(candidates[:, 0])  # [B, C, M]
            similarity = torch.bmm(unit_keys, values.transpose(1, 2))
            similarity = similarity * addressing.inverse_norms(values).unsqueeze(1)
        else:
            batch, heads, width = candidates.shape
            values = self.memory.peek(candidates.flatten(1)).view(batch, heads, width, -1)
            similarity = (values @ unit_keys.unsqueeze(-1)).squeeze(-1)
            similarity = similarity * addressing.inverse_norms(values)
        best = similarity.topk(self.sparse_reads, dim=-1).indices
        return candidates.gather(-1, best)

    def write(
        self,
        state: SparseAccessState,
        write_vector: torch.Tensor,
        write_gate: torch.Tensor,
        interpolation_gate: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eqs. (4)-(5) on the memory: write ``a`` ``[B, M]`` with gates ``[B]`` to the
        rows ``state`` read and the least recently used row (erased) -> (token, write rows
        ``[B, R K + 1]``, their weights, their new contents ``[B, R K + 1, M]``)."""
        least_used = self.usage.least_recent()
        rows = torch.cat([state.read_rows.flatten(1), least_used.unsqueeze(1)], 1)
        weights = write_weighting(state.read_weights, write_gate, interpolation_gate)
        old, token = self.memory.gather(state.memory, rows)
        written = sparse_write(old, rows, weights, least_used, write_vector)
        token = self.memory.assign(token, rows, written)
        self.index.update(rows, written.detach())
        return token, rows, weights, written

    def read(
        self, token: torch.Tensor, keys: torch.Tensor, strengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eqs. (2)-(3) on the memory: keys ``[B, R, M]``, strengths ``[B, R]`` -> (token,
        read rows ``[B, R, K]``, their weights ``[B, R, K]``, read vectors ``[B, R, M]``)."""
        batch, heads, word = keys.shape
        with torch.no_grad():
            rows = self.nearest(keys.detach())
        values, token = self.memory.gather(token, rows.flatten(1))
        values = values.view(batch, heads, self.sparse_reads, word)
        weights, reads = sparse_read(values, keys, strengths)
        return token, rows, weights, reads

    def step(
        self, controller_output: torch.Tensor, state: SparseAccessState, record: bool = False
    ) -> tuple[torch.Tensor, SparseAccessState, StepRecord | None]:
        """controller_output ``[B, H]`` -> (read vectors ``[B, R, M]``, state, with
        ``record`` what the step did)."""
        self.memory.check(state.memory, int(state.version))
        batch, word, heads = controller_output.shape[0], self.word_size, self.read_heads
        linear, oneplus, gates = self.interface(controller_output).split(self.sizes, 1)
        read_keys, write_vector = linear.split([heads * word, word], 1)
        read_keys = read_keys.view(batch, heads, word)
        read_strengths = 1 + F.softplus(oneplus)
        write_gate, interpolation_gate = torch.sigmoid(gates).unbind(1)

        token, write_rows, write_weights, written = self.write(
            state, write_vector, write_gate, interpolation_gate
        )
        token, read_rows, read_weights, reads = self.read(token, read_keys, read_strengths)

        usage_rows = torch.cat([write_rows, read_rows.flatten(1)], 1)
        usage_weights = torch.cat([write_weights, read_weights.flatten(1)], 1).detach()
        accessed = self.usage.update(usage_rows, usage_weights)
        version = torch.tensor(self.memory.version)
        state = SparseAccessState(token, version, read_rows, read_weights)
        trail = None
        if record:
            trail = StepRecord(
                write_rows,
                write_weights.detach(),
                written.detach(),
                read_rows,
                read_weights.detach(),
                usage_rows,
                accessed,
            )
        return reads, state, trail


class SAMCore(nn.Module):
    """Controller layers, their sparse memories and the output layer;
    ``forward(inputs [T, B, I], state=None) -> (outputs [T, B, O], state)``. A state of
    None starts an episode (the memories are emptied); a state from the last call
    carries on (the memories hold its contents)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        controller: str = "lstm",
        hidden_size: int = 64,
        controller_layers: int = 1,
        num_layers: int = 1,
        share_memory: bool = True,
        memory_size: int = 1024,
        word_size: int = 16,
        read_heads: int = 4,
        sparse_reads: int = 4,
        index: Index = "auto",
        rebuild_every: int = 1000,
        access: Callable[[], SparseAccess] | None = None,
        bias: bool = True,
        nonlinearity: str = "tanh",
        dropout: float = 0.0,
        layer_norm: bool = False,
        clip: float | None = 20.0,
        output_clip: float | None = None,
    ) -> None:
        super().__init__()
        require_positive(
            hidden_size=hidden_size,
            controller_layers=controller_layers,
            num_layers=num_layers,
            memory_size=memory_size,
            word_size=word_size,
            read_heads=read_heads,
        )
        self.clip, self.output_clip = clip or None, output_clip
        read_size = read_heads * word_size
        self.controllers = layered_controllers(
            controller,
            input_size,
            read_size,
            num_layers,
            hidden=hidden_size,
            layers=controller_layers,
            bias=bias,
            nonlinearity=nonlinearity,
            dropout=dropout,
            layer_norm=layer_norm,
        )

        def default_access() -> SparseAccess:
            return SparseAccess(
                hidden_size, memory_size, word_size, read_heads, sparse_reads, index, rebuild_every
            )

        self.memories = nn.ModuleList(
            (access or default_access)() for _ in range(1 if share_memory else num_layers)
        )
        self.readout = nn.Linear(hidden_size + read_size, output_size)

    def initial_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> SAMState:
        """A new episode's state; empties the memories."""
        memory = self.memories[0]
        return SAMState(
            controller=tuple(c.initial_state(batch, device, dtype) for c in self.controllers),
            access=tuple(m.initial_state(batch, device, dtype) for m in self.memories),
            reads=torch.zeros(
                batch, memory.read_heads, memory.word_size, device=device, dtype=dtype
            ),
        )

    def step(
        self, projected: torch.Tensor, state: SAMState, record: bool = False
    ) -> tuple[torch.Tensor, SAMState, list[StepRecord]]:
        """One time step. projected: the first controller's ``project`` of this step's
        input ``[B, G]`` -> (the last controller's output ``[B, H]``, the next state, and
        with ``record`` each layer's ``StepRecord``)."""
        step_input = state.reads.flatten(1)
        controllers, accesses, trail = [], list(state.access), []
        for layer, controller in enumerate(self.controllers):
            output, controller_state = controller.step(
                projected if layer == 0 else None, step_input, state.controller[layer]
            )
            if self.clip is not None:
                output = F.hardtanh(output, -self.clip, self.clip)
            index = layer if len(self.memories) > 1 else 0
            reads, accesses[index], done = self.memories[index].step(
                output, accesses[index], record
            )
            if layer + 1 < len(self.controllers):
                step_input = torch.cat([output, reads.flatten(1)], 1)
            controllers.append(controller_state)
            if done is not None:
                trail.append(done)
        return output, SAMState(tuple(controllers), tuple(accesses), reads), trail

    def run(
        self, inputs: torch.Tensor, state: SAMState | None, record: bool = False
    ) -> tuple[torch.Tensor, SAMState, list[list[StepRecord]]]:
        """inputs ``[T, B, I]`` -> (outputs ``[T, B, O]``, final state, with ``record``
        every step's records, time major)."""
        if state is None:
            state = self.initial_state(inputs.shape[1], inputs.device, inputs.dtype)
        projected = self.controllers[0].project(inputs)
        outputs, reads, records = [], [], []
        for projected_step in projected.unbind(0):
            output, state, trail = self.step(projected_step, state, record)
            outputs.append(output)
            reads.append(state.reads)
            records.append(trail)
        features = torch.cat([torch.stack(outputs), torch.stack(reads).flatten(2)], -1)
        logits = self.readout(features)
        if self.output_clip is not None:
            logits = F.hardtanh(logits, -self.output_clip, self.output_clip)
        return logits, state, records

    def forward(
        self, inputs: torch.Tensor, state: SAMState | None = None
    ) -> tuple[torch.Tensor, SAMState]:
        """inputs ``[T, B, I]`` -> (outputs ``[T, B, O]``, final state)."""
        outputs, state, _ = self.run(inputs, state)
        return outputs, state

    def describe_backend(self, batch_size: int) -> str:
        """The one implementation, and the search ``model.index`` chose (``base.py``'s
        contract)."""
        return f"sparse access in place, {self.memories[0].index.describe()}"


class SAMConfig(ModelConfig):
    type: str = "sam"
    controller: Literal["lstm", "gru", "rnn"] = "lstm"
    nonlinearity: Literal["tanh", "relu"] = Field("tanh", description="rnn controller only")
    controller_size: int = Field(64, ge=1, description="hidden units per controller layer")
    controller_layers: int = Field(1, ge=1, description="pytorch-dnc's num_hidden_layers")
    layer_norm: bool = Field(False, description="layer-normalise each controller layer's output")
    memory_size: int = Field(1024, ge=1, description="N, memory slots")
    word_size: int = Field(16, ge=1, description="M, width of a memory slot")
    read_heads: int = Field(4, ge=1)
    sparse_reads: int = Field(4, ge=1, description="K, slots each read head attends to")
    index: Index = Field(
        "auto",
        description="the slot search: exact (top K over the rows written since the episode "
        "began and K never-written ones, exact whatever N), faiss (an inverted-file index per "
        "batch element, candidates rescored exactly), auto (exact until an episode has "
        "written 2^17 rows, then faiss)",
    )
    rebuild_every: int = Field(
        1000,
        ge=1,
        description="faiss: steps between updates of the index's snapshot with the rows "
        "written since (searched exactly until then); its lists are trained again as the "
        "memory fills and turns over",
    )
    controller_clip: float | None = Field(
        20.0, gt=0, description="clamp the controller output (DeepMind's 20)"
    )
    output_clip: float | None = Field(20.0, gt=0, description="clamp output logits")

    @model_validator(mode="after")
    def _reads_fit(self) -> SAMConfig:
        if self.sparse_reads > self.memory_size:
            raise ValueError(
                f"sparse_reads ({self.sparse_reads}) must be at most memory_size "
                f"({self.memory_size})"
            )
        return self


@MODELS.register("sam", SAMConfig)
class SAMModel(SAMCore):
    """The recipe model: one controller stack and one sparse memory."""

    def __init__(self, config: SAMConfig, input_size: int, output_size: int) -> None:
        super().__init__(
            input_size,
            output_size,
            controller=config.controller,
            hidden_size=config.controller_size,
            controller_layers=config.controller_layers,
            memory_size=config.memory_size,
            word_size=config.word_size,
            read_heads=config.read_heads,
            sparse_reads=config.sparse_reads,
            index=config.index,
            rebuild_every=config.rebuild_every,
            access=self.memory_access(config),
            nonlinearity=config.nonlinearity,
            layer_norm=config.layer_norm,
            clip=config.controller_clip,
            output_clip=config.output_clip,
        )
        self.config = config

    def memory_access(self, config: SAMConfig) -> Callable[[], SparseAccess] | None:
        """What builds each memory; None: SAM's ``SparseAccess`` (SDNC's model says
        ``SDNCAccess``)."""
        return None

    def trace(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run ``inputs`` ``[T, B, I]`` from a new episode, recording every step, over the
        S slots the sequence touched (read or written, in any batch element) only.

        Returns (logits ``[T, B, O]``, a dict, time first, batch second): ``slots``
        ``[T, B, S]`` (the touched slots' indices, ascending, the same every step),
        ``read_weights`` ``[T, B, R, S]``, ``write_weights`` ``[T, B, 1, S]``, ``memory``
        ``[T + 1, B, S, M]`` (empty, then after each step) and ``usage`` ``[T, B, S]``
        (steps since the slot's last access, ``t + 1`` at step t for one never accessed).
        """
        initial = self.initial_state(inputs.shape[1], inputs.device, inputs.dtype)
        logits, _, records = self.run(inputs, initial, record=True)
        steps = [trail[0] for trail in records]
        touched = torch.cat([torch.cat([s.write_rows, s.read_rows.flatten(1)], 1) for s in steps])
        slots = torch.unique(touched)  # sorted
        batch, width = inputs.shape[1], slots.numel()
        heads, word = self.memories[0].read_heads, self.memories[0].word_size

        def position(rows: torch.Tensor) -> torch.Tensor:
            return torch.searchsorted(slots, rows.flatten(1)).view(rows.shape)

        dtype = logits.dtype
        read_weights, write_weights, usage = [], [], []
        memory = [torch.zeros(batch, width, word, dtype=dtype, device=inputs.device)]
        last = torch.full((batch, width), NEVER, dtype=torch.long, device=inputs.device)
        for time, step in enumerate(steps):
            reads = torch.zeros(batch, heads, width, dtype=dtype, device=inputs.device)
            reads.scatter_add_(2, position(step.read_rows), step.read_weights)
            read_weights.append(reads)
            writes = torch.zeros(batch, width, dtype=dtype, device=inputs.device)
            write_positions = position(step.write_rows)
            writes.scatter_add_(1, write_positions, step.write_weights)
            write_weights.append(writes.unsqueeze(1))
            contents = memory[-1].clone()
            contents.scatter_(1, write_positions.unsqueeze(2).expand(-1, -1, word), step.written)
            memory.append(contents)
            usage_positions = position(step.usage_rows)
            stamped = torch.where(step.accessed, time, last.gather(1, usage_positions))
            last.scatter_(1, usage_positions, stamped)
            usage.append(time - last)
        trace = {
            "slots": slots.expand(len(steps), batch, width),
            "read_weights": torch.stack(read_weights),
            "write_weights": torch.stack(write_weights),
            "memory": torch.stack(memory),
            "usage": torch.stack(usage).to(dtype),
        }
        return logits.detach(), trace
