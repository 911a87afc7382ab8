"""Drop-in replacements for the ``SAM`` and ``SDNC`` classes of pytorch-dnc (PyPI ``dnc``
1.1.0): their constructors, calls, returned structures and ``debug`` views, on
``sam.SAMCore``. The maths, the in-place memory and the search are the recipe models'.

``SDNC`` subclasses ``SAM``: constructor arguments ``SAM`` does not know go to the core
(``**core_options``, SDNC's memories among them), ``_memory_dict`` / ``_access_from_dict``
are the two places a memory's dict is built and read back, and ``_debug_start`` /
``_debug_views`` the two halves of the ``debug`` views.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import numpy as np
import torch

from memctl.models.controllers import ControllerState
from memctl.models.sparse.sam import (
    Index,
    SAMCore,
    SAMState,
    SparseAccess,
    SparseAccessState,
    StepRecord,
)
from memctl.models.sparse.sdnc import SDNCAccess, SDNCAccessState

_wait_policy_warned = False


def warn_without_wait_policy(name: str) -> None:
    """Warn once per process when ``OMP_WAIT_POLICY`` is not set: faiss and torch each
    bring an OpenMP runtime, whose threads spin against each other unless it is PASSIVE
    (the ``memctl`` command sets it; a library user has to, before importing torch)."""
    global _wait_policy_warned
    if _wait_policy_warned or "OMP_WAIT_POLICY" in os.environ:
        return
    _wait_policy_warned = True
    warnings.warn(
        f"{name}: OMP_WAIT_POLICY is not set; set OMP_WAIT_POLICY=PASSIVE in the environment "
        "before torch is imported, or faiss and torch slow each other down",
        RuntimeWarning,
        stacklevel=3,
    )


class SAM(SAMCore):
    """pytorch-dnc's ``SAM``: same constructor, same call, same returned structures.

    ``output, (controller_hidden, memory, read_vectors) = rnn(x, (None, None, None),
    reset_experience=True)`` with ``x`` ``[B, T, input_size]`` (``batch_first``) or
    ``[T, B, input_size]``; ``output`` has the same layout and ``input_size`` features;
    ``controller_hidden`` is a list with one entry per layer, ``(h, c)`` for an LSTM or
    ``h`` otherwise, each ``[num_hidden_layers, B, hidden_size]``; ``read_vectors`` is
    ``[B, R * W]``; ``memory`` is a dict (a list of dicts with ``share_memory=False``)
    with pytorch-dnc's keys, C = R K + 1 visible rows:

    - ``memory`` ``[B, N, W]``: the memory buffer itself (it changes in place as the
      model runs on; copy it to keep a snapshot);
    - ``visible_memory`` ``[B, C, W]``: the rows of ``read_positions``;
    - ``read_weights`` ``[B, N]``: the last read's weights, the heads' mean (the
      ``w^R_{t-1}`` of the next write); ``write_weights`` ``[B, N]``: the last write's;
    - ``read_vectors`` ``[B, R, W]``; ``least_used_mem`` ``[B, 1]`` long: the slot the
      next write erases; ``usage`` ``[B, N]``: steps since each slot's last access;
    - ``read_positions`` ``[B, C]`` long: the slots each head read, head after head,
      then ``least_used_mem``;

    these outside autograd, and three of memctl's, the state to carry on from:
    ``sparse_read_weights`` ``[B, R, K]`` (each head's weights over its slots, in the
    graph), ``token`` and ``version`` (``sam.SparseAccessState``'s). Passed back as the
    second argument with ``reset_experience=False`` the model carries on from the dict;
    detached (pytorch-dnc's copy task detaches every tensor of it) it carries on as a new
    chunk of truncated backpropagation. ``reset_experience=True`` empties the memory. A
    dict the memory has moved on from (the model ran since) is refused
    (``access.MemoryMovedOn``). With ``debug=True`` a third value holds numpy views for
    batch element 0, one row per time step and layer, of the keys above but the last
    three, ``memory``, ``read_weights``, ``write_weights`` and ``usage`` over all N.

    Differences from pytorch-dnc 1.1.0, by design: the read strengths (one per head) are
    in the interface and the interpolation gate is one number, the paper's (pytorch-dnc:
    no strengths, one gate per visible row), so the interface has ``R (K - 1)`` fewer
    outputs; the controller starts from zeros and sees the previous step's read vectors
    (pytorch-dnc: a random initial state each call, the call's read vectors at every
    step); the dense ``[B, N]`` views are built once per call, not kept per step.
    ``independent_linears`` is accepted and changes nothing (one linear layer has the same
    parameters and function). ``PackedSequence`` inputs, ``bidirectional=True`` and
    ``pass_through_memory=False`` are not supported.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        rnn_type: str = "lstm",
        num_layers: int = 1,
        num_hidden_layers: int = 2,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0,
        bidirectional: bool = False,
        nr_cells: int = 5000,
        sparse_reads: int = 4,
        read_heads: int = 4,
        cell_size: int = 10,
        nonlinearity: str = "tanh",
        gpu_id: int = -1,
        independent_linears: bool = False,
        share_memory: bool = True,
        debug: bool = False,
        clip: float = 20,
        **core_options: Any,
    ) -> None:
        if bidirectional:
            raise ValueError("bidirectional=True is not supported (nor is it by pytorch-dnc)")
        warn_without_wait_policy(type(self).__name__)
        super().__init__(
            input_size,
            input_size,
            controller=rnn_type.lower(),
            hidden_size=hidden_size,
            controller_layers=num_hidden_layers,
            num_layers=num_layers,
            share_memory=share_memory,
            memory_size=nr_cells,
            word_size=cell_size,
            read_heads=read_heads,
            sparse_reads=min(sparse_reads, nr_cells),  # pytorch-dnc's K
            bias=bias,
            nonlinearity=nonlinearity,
            dropout=dropout,
            clip=clip,
            **core_options,
        )
        self.rnn_type, self.batch_first, self.debug = rnn_type.lower(), batch_first, debug
        self.share_memory, self.gpu_id = share_memory, gpu_id
        if gpu_id != -1:
            self.to(torch.device("cuda", gpu_id))

    def _access_from_dict(self, memory: SparseAccess, hidden: dict[str, Any]) -> Any:
        """A memory's dict -> the access state it carries on from."""
        weights = hidden["sparse_read_weights"]
        rows = hidden["read_positions"][:, : weights.shape[1] * weights.shape[2]]
        return SparseAccessState(
            hidden["token"], hidden["version"], rows.reshape(weights.shape), weights
        )

    def _memory_dict(
        self, memory: SparseAccess, access: Any, last: StepRecord | None
    ) -> dict[str, Any]:
        """A memory's dict after a call: ``access`` its state, ``last`` its last step."""
        batch, slots = access.read_rows.shape[0], memory.memory_size
        dtype = access.read_weights.dtype
        heads = memory.read_heads
        rows = access.read_rows.flatten(1)
        least_used = memory.usage.least_recent().unsqueeze(1)
        positions = torch.cat([rows, least_used], 1)
        weights = access.read_weights.detach()
        values = memory.memory.peek(access.read_rows.flatten(1)).view(*weights.shape, -1)
        read_weights = weights.new_zeros(batch, slots)
        read_weights.scatter_add_(1, rows, weights.flatten(1) / heads)
        write_weights = weights.new_zeros(batch, slots)
        if last is not None:
            write_weights.scatter_add_(1, last.write_rows, last.write_weights)
        usage = memory.usage
        assert memory.memory.buffer is not None and usage.stamps is not None
        return {
            "memory": memory.memory.buffer,
            "visible_memory": memory.memory.peek(positions),
            "read_weights": read_weights,
            "write_weights": write_weights,
            "read_vectors": (weights.unsqueeze(-2) @ values).squeeze(-2),
            "least_used_mem": least_used,
            "usage": (usage.time - usage.stamps).to(dtype),
            "read_positions": positions,
            "sparse_read_weights": access.read_weights,
            "token": access.memory,
            "version": access.version,
        }

    def _state_from(
        self, hx: tuple[Any, Any, Any] | None, batch: int, like: torch.Tensor, reset: bool
    ) -> SAMState:
        device, dtype = like.device, like.dtype
        controller_hidden, memory, read_vectors = hx if hx is not None else (None, None, None)
        controller = tuple(c.initial_state(batch, device, dtype) for c in self.controllers)
        if controller_hidden is not None:
            controller = tuple(
                ControllerState(*layer)
                if self.rnn_type == "lstm"
                else ControllerState(layer, zeros.cell)
                for layer, zeros in zip(controller_hidden, controller, strict=True)
            )
        if memory is None or reset:
            access = tuple(m.initial_state(batch, device, dtype) for m in self.memories)
        else:
            dicts = [memory] if self.share_memory else memory
            access = tuple(
                self._access_from_dict(m, d) for m, d in zip(self.memories, dicts, strict=True)
            )
            if any(a.read_rows.shape[0] != batch for a in access):
                raise ValueError(
                    f"{type(self).__name__}: the memory carried on from has another batch size"
                )
        first = self.memories[0]
        reads = torch.zeros(batch, first.read_heads, first.word_size, device=device, dtype=dtype)
        if read_vectors is not None:
            reads = read_vectors.reshape(reads.shape)
        return SAMState(controller, access, reads)

    def _memory_of(self, layer: int) -> int:
        return layer if len(self.memories) > 1 else 0

    def forward(
        self,
        input: torch.Tensor,  # pytorch-dnc's keyword
        hx: tuple[Any, Any, Any] | None = (None, None, None),
        reset_experience: bool = False,
        pass_through_memory: bool = True,
    ) -> Any:
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__} takes a tensor input, not {type(input).__name__}"
            )
        if not pass_through_memory:
            raise ValueError("pass_through_memory=False is not supported")
        inputs = input.transpose(0, 1) if self.batch_first else input
        state = self._state_from(hx, inputs.shape[1], inputs, reset_experience)
        start = self._debug_start() if self.debug else None
        outputs, state, records = self.run(inputs, state, record=True)
        if self.batch_first:
            outputs = outputs.transpose(0, 1)
        last: list[StepRecord | None] = [None] * len(self.memories)
        for layer, record in enumerate(records[-1] if records else []):
            last[self._memory_of(layer)] = record
        memories = [
            self._memory_dict(m, a, r)
            for m, a, r in zip(self.memories, state.access, last, strict=True)
        ]
        controller = [
            (c.hidden, c.cell) if self.rnn_type == "lstm" else c.hidden for c in state.controller
        ]
        hidden = (
            controller,
            memories[0] if self.share_memory else memories,
            state.reads.flatten(1),
        )
        if not self.debug:
            return outputs, hidden
        return outputs, hidden, self._debug_views(start, records)

    def _debug_start(self) -> Any:
        """What the ``debug`` views replay from, taken before a call."""
        return [DebugStart(m) for m in self.memories]

    def _debug_views(self, start: Any, records: list[list[StepRecord]]) -> dict[str, np.ndarray]:
        """The ``debug`` views of a call, from ``_debug_start``'s and the steps' records."""
        return debug_views(self.memories, start, records, self._memory_of)


class DebugStart:
    """Batch element 0 of a memory at the start of a call, as numpy: its contents
    ``[N, W]``, each slot's last access ``[N]`` (-1: never) and the usage clock."""

    def __init__(self, memory: SparseAccess) -> None:
        assert memory.memory.buffer is not None and memory.usage.stamps is not None
        self.contents = memory.memory.buffer[0].detach().cpu().numpy().copy()
        self.last = (memory.usage.stamps[0] - 1).cpu().numpy().copy()
        self.clock = memory.usage.time


def debug_views(
    memories: Any, starts: list[DebugStart], records: list[list[StepRecord]], memory_of: Any
) -> dict[str, np.ndarray]:
    """pytorch-dnc's SAM ``debug`` output: one row per time step and layer (time major),
    batch element 0 after that layer's access, each flattened. Replayed from the steps'
    records on a dense copy of element 0's memory and usage (O(N) a row, as pytorch-dnc's)."""
    rows: dict[str, list[np.ndarray]] = {
        key: []
        for key in (
            "memory",
            "visible_memory",
            "read_weights",
            "write_weights",
            "read_vectors",
            "least_used_mem",
            "usage",
            "read_positions",
        )
    }
    for trail in records:
        for layer, record in enumerate(trail):
            start = starts[memory_of(layer)]
            heads = memories[memory_of(layer)].read_heads
            contents, last = start.contents, start.last
            write_rows = record.write_rows[0].cpu().numpy()
            contents[write_rows] = record.written[0].cpu().numpy()
            accessed = record.accessed[0].cpu().numpy()
            last[record.usage_rows[0].cpu().numpy()[accessed]] = start.clock
            usage = start.clock - last
            start.clock += 1
            least_used = np.array([int(np.argmin(last))])
            read_rows = record.read_rows[0].cpu().numpy()  # [R, K]
            read_weights = record.read_weights[0].cpu().numpy()
            positions = np.concatenate([read_rows.ravel(), least_used])
            dense_reads = np.zeros(len(last), dtype=contents.dtype)
            np.add.at(dense_reads, read_rows.ravel(), read_weights.ravel() / heads)
            dense_writes = np.zeros(len(last), dtype=contents.dtype)
            np.add.at(dense_writes, write_rows, record.write_weights[0].cpu().numpy())
            rows["memory"].append(contents.ravel().copy())
            rows["visible_memory"].append(contents[positions].ravel())
            rows["read_weights"].append(dense_reads)
            rows["write_weights"].append(dense_writes)
            rows["read_vectors"].append(
                np.einsum("rk,rkw->rw", read_weights, contents[read_rows]).ravel()
            )
            rows["least_used_mem"].append(least_used)
            rows["usage"].append(usage.astype(contents.dtype))
            rows["read_positions"].append(positions)
    return {key: np.stack(value) for key, value in rows.items()}


class SDNC(SAM):
    """pytorch-dnc's ``SDNC``: same constructor (``SAM``'s and ``temporal_reads``), same
    call, same returned structures, on ``sdnc.SDNCAccess`` memories.

    The call and its values are ``SAM``'s, with S = K + 2 K_L rows read per head (K by
    content, K_L forward and K_L backward through the link) and so C = R S + 1 visible
    rows: ``visible_memory`` ``[B, C, W]`` and ``read_positions`` ``[B, C]`` (each head's
    S slots, head after head, then ``least_used_mem``). The memory dict adds pytorch-dnc's
    link and precedence keys, views outside autograd built once per call:

    - ``link_matrix`` ``[B, N, K_L]``: the values of row i of the link L (``L[i, j]``,
      written to i after j) at the columns ``link_positions`` ``[B, N, K_L]`` long names
      (N: no entry, value 0);
    - ``rev_link_matrix`` ``[B, N, K_L]``: the values of column i of L (row i of
      ``L^T``) at the rows ``rev_link_positions`` ``[B, N, K_L]`` names;
    - ``precedence`` ``[B, N]``;

    and four more of the state to carry on from: ``link_token``, ``link_version``,
    ``precedence_positions`` ``[B, K_L]`` long and ``sparse_precedence`` ``[B, K_L]`` (in
    the graph). With ``debug=True`` the views add, one row per time step and layer, batch
    element 0 flattened, ``link_matrix``, ``link_positions``, ``rev_link_matrix``,
    ``rev_link_positions`` and ``precedence``.

    Differences from pytorch-dnc 1.1.0, by design, beyond ``SAM``'s: the link keeps K_L
    entries per row and column of the N x N matrix (pytorch-dnc: ``[B, N, 2 K_L]`` against
    the visible rows of the step, masked by an identity), so its views are entries and
    positions; each head has its own forward and backward weightings and read modes (3 R
    interface outputs, the DNC's; pytorch-dnc: none, and one set of 2 K_L temporal rows for
    all heads), so the interface has ``R (K - 1) + 2 K_L - 3 R`` fewer outputs than
    pytorch-dnc's.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        rnn_type: str = "lstm",
        num_layers: int = 1,
        num_hidden_layers: int = 2,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0,
        bidirectional: bool = False,
        nr_cells: int = 5000,
        sparse_reads: int = 4,
        temporal_reads: int = 4,
        read_heads: int = 4,
        cell_size: int = 10,
        nonlinearity: str = "tanh",
        gpu_id: int = -1,
        independent_linears: bool = False,
        share_memory: bool = True,
        debug: bool = False,
        clip: float = 20,
        index: Index = "auto",
        rebuild_every: int = 1000,
    ) -> None:
        warn_without_wait_policy("SDNC")  # pointing at the caller's line
        access = functools.partial(
            ViewedSDNCAccess,
            hidden_size,
            nr_cells,
            cell_size,
            read_heads,
            min(sparse_reads, nr_cells),  # pytorch-dnc's K and K_L
            min(temporal_reads, nr_cells),
            index,
            rebuild_every,
        )
        super().__init__(
            input_size,
            hidden_size,
            rnn_type=rnn_type,
            num_layers=num_layers,
            num_hidden_layers=num_hidden_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            nr_cells=nr_cells,
            sparse_reads=sparse_reads,
            read_heads=read_heads,
            cell_size=cell_size,
            nonlinearity=nonlinearity,
            gpu_id=gpu_id,
            independent_linears=independent_linears,
            share_memory=share_memory,
            debug=debug,
            clip=clip,
            index=index,
            rebuild_every=rebuild_every,
            access=access,
        )

    def _access_from_dict(self, memory: SparseAccess, hidden: dict[str, Any]) -> Any:
        sam = super()._access_from_dict(memory, hidden)
        return SDNCAccessState(
            *sam,
            hidden["link_token"],
            hidden["link_version"],
            hidden["precedence_positions"],
            hidden["sparse_precedence"],
        )

    def _memory_dict(
        self, memory: SparseAccess, access: Any, last: StepRecord | None
    ) -> dict[str, Any]:
        assert isinstance(memory, SDNCAccess)
        sam = super()._memory_dict(memory, access, last)
        carried = ("sparse_read_weights", "token", "version")
        return {
            **{key: value for key, value in sam.items() if key not in carried},
            **link_views(memory, access, access.precedence.shape[0]),
            **{key: sam[key] for key in carried},
            "link_token": access.link,
            "link_version": access.link_version,
            "precedence_positions": access.precedence_rows,
            "sparse_precedence": access.precedence,
        }

    def _debug_start(self) -> Any:
        steps: list[dict[str, np.ndarray]] = []
        for memory in self.memories:
            memory.views = steps
        return super()._debug_start(), steps

    def _debug_views(self, start: Any, records: list[list[StepRecord]]) -> dict[str, np.ndarray]:
        starts, steps = start
        for memory in self.memories:
            memory.views = None
        views = super()._debug_views(starts, records)
        for key in LINK_KEYS:
            views[key] = np.stack([step[key] for step in steps])
        return views


LINK_KEYS = ("link_matrix", "link_positions", "rev_link_matrix", "rev_link_positions", "precedence")


def link_views(access: SDNCAccess, state: SDNCAccessState, batch: int) -> dict[str, torch.Tensor]:
    """The link and precedence of batch elements ``0 .. batch - 1`` as ``SDNC``'s dict
    gives them (``LINK_KEYS``), outside autograd: O(N K_L) per element."""
    link, slots = access.link, access.memory_size
    keep = link.keep
    assert link.values.buffer is not None
    values = link.values.buffer[:batch].detach()
    rows = torch.arange(slots, device=values.device).expand(batch, slots)
    entries = link.entries_of(rows)
    precedence = values.new_zeros(batch, slots + 1)  # slot N: no entry
    precedence.scatter_add_(1, state.precedence_rows[:batch], state.precedence[:batch].detach())
    return {
        "link_matrix": values[..., :keep].clone(),
        "link_positions": entries[..., :keep],
        "rev_link_matrix": values[..., keep:].clone(),
        "rev_link_positions": entries[..., keep:],
        "precedence": precedence[:, :slots],
    }


class ViewedSDNCAccess(SDNCAccess):
    """``sdnc.SDNCAccess`` that, while ``views`` is a list (``SDNC``'s ``debug``), appends
    batch element 0's ``link_views`` (numpy, flattened) after each step."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.views: list[dict[str, np.ndarray]] | None = None

    def step(
        self, controller_output: torch.Tensor, state: SDNCAccessState, record: bool = False
    ) -> tuple[torch.Tensor, SDNCAccessState, StepRecord | None]:
        reads, state, trail = super().step(controller_output, state, record)
        if self.views is not None:
            views = link_views(self, state, 1)
            self.views.append(
                {key: value[0].flatten().cpu().numpy() for key, value in views.items()}
            )
        return reads, state, trail
