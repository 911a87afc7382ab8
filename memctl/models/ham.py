"""Hierarchical Attentive Memory (Andrychowicz & Kurach 2016, "Learning Efficient
Algorithms with Hierarchical Attentive Memory", arXiv 1602.03218).

The memory is a complete binary tree of ``d``-wide vectors kept as a heap ``[B, 2N-1, d]``
(root at 0, the children of node ``e`` at ``2e+1`` and ``2e+2``, level ``k`` at rows
``2^k - 1 .. 2^(k+1) - 2``, the ``N`` leaves last). Four small MLPs (section 3.1):

    EMBED(x)          input item -> leaf value
    JOIN(h_l, h_r)    two children -> their parent; builds every inner node bottom-up
    SEARCH(h_e, s)    node and controller signal -> logit of going right
    WRITE(h_a, s)     reached leaf and signal -> the leaf's new value

A sequence is read in two phases, as in the paper. Its data steps (input channel
``is_data``, the second-last) become the leaves, in order, and JOIN builds the tree;
``N`` is the number of data steps (at least ``min_leaves``) rounded up to a power of two,
and the extra leaves (and those of padded, shorter sequences) hold a learned EMPTY
vector. From the first go step on (input channel ``is_go``, the last) every step is one
memory access:

    s_t = controller(x_t, r_{t-1})   the signal: ``none`` = a linear map of x_t (a
                                     constant for min, the seed's raw HAM); ``lstm`` =
                                     an LSTM cell on [x_t, r_{t-1}] (LSTM+HAM)
    r_t = access(tree, s_t)          the read
    y_t = OUT(r_t)                   raw HAM;  OUT([s_t, r_t]) with the LSTM
    tree <- write(tree, s_t)

``mode: hard`` (section 3.1): from the root, go right with probability
``p_e = sigma(SEARCH(h_e, s))``, sampled while training and greedy (``p_e > 1/2``) in
eval mode; read the reached leaf ``a``; ``h_a <- WRITE(h_a, s)``; JOIN recomputes the
``log2 N`` nodes on the path back to the root. An access's forward pass does O(log N)
work: log2 N SEARCH and JOIN calls of batch size B and in-place row updates. Training
too, with ``backend: path`` (the default, ``ham_tree.py``): the tree's gradient is
accumulated along the paths. ``backend: reference`` is this file's plain autograd on the
heap tensor, whose backward builds a tree-sized gradient for every row read and write
(O(N log N) per training access); see benchmarks/ham_access.py. SEARCH is trained by
REINFORCE (``auxiliary_loss``) with a learned baseline and an entropy bonus.

``mode: soft`` (DHAM, Appendix A): the attention splits at every node,
``a_root = 1``, ``a_l(e) = a_e (1 - p_e)``, ``a_r(e) = a_e p_e``; the read is
``r = sum_i a_i h_i`` over the leaves; the write is ``h_i <- (1 - a_i) h_i + a_i
WRITE(h_i, s)``, after which JOIN rebuilds the tree. All nodes of a level go through
SEARCH or JOIN in one call, so the Python loops run over the log2 N levels only; an
access costs O(N).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from memctl.models.base import ModelConfig, readout_layer
from memctl.models.ham_tree import HardTree
from memctl.registry import MODELS


class HAMConfig(ModelConfig):
    type: str = "ham"
    mode: Literal["soft", "hard"] = Field(
        "soft", description="soft: DHAM attention over all leaves; hard: one sampled path"
    )
    controller: Literal["none", "lstm"] = Field(
        "none", description="none: raw HAM driven by the current input; lstm: LSTM+HAM"
    )
    tree_size: int = Field(20, ge=1, description="width of every tree node")
    controller_size: int = Field(20, ge=1, description="width of the controller signal")
    mlp_hidden: int = Field(20, ge=1, description="hidden units of EMBED/JOIN/SEARCH/WRITE")
    readout_hidden: int = Field(
        0,
        ge=0,
        description="ReLU layer of this many units between [signal, read] and the outputs "
        "(0: linear)",
    )
    min_leaves: int = Field(
        1,
        ge=1,
        description="leaves the tree has at least (rounded up to a power of two), EMPTY "
        "where no data step fills them: room for what later accesses write (stack, queue)",
    )
    entropy_bonus: float = Field(0.01, ge=0, description="hard: weight of the path entropy")
    baseline_weight: float = Field(1.0, ge=0, description="hard: weight of the baseline fit")
    backend: Literal["path", "reference"] = Field(
        "path",
        description="hard: path = the tree in place, its gradient accumulated along the "
        "paths, O(log n) per training access (ham_tree.py); reference = plain autograd on "
        "the heap tensor, O(n log n)",
    )


class HAMState(NamedTuple):
    """tree: ``[B, 2N-1, d]`` heap; hidden, cell: ``[B, c]`` (``[B, 0]`` without an LSTM);
    read: ``[B, d]`` the last access's read."""

    tree: torch.Tensor
    hidden: torch.Tensor
    cell: torch.Tensor
    read: torch.Tensor


class PathTrace(NamedTuple):
    """What REINFORCE needs from the last training forward in hard mode, ``[A, B]`` for
    A accesses: log-probability and entropy of each sampled path, baseline prediction."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    baseline: torch.Tensor


class MLP(nn.Module):
    """``Linear -> ReLU -> Linear``, then tanh where the output is a node value."""

    def __init__(self, inputs: int, hidden: int, outputs: int, squash: bool) -> None:
        super().__init__()
        self.hidden = nn.Linear(inputs, hidden)
        self.out = nn.Linear(hidden, outputs)
        self.squash = squash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.relu(self.hidden(x)))
        return torch.tanh(y) if self.squash else y


class Search(nn.Module):
    """SEARCH(h_e, s): nodes ``[B, M, d]`` and signal ``[B, c]`` -> logits ``[B, M]``."""

    def __init__(self, tree_size: int, signal_size: int, hidden: int) -> None:
        super().__init__()
        self.mlp = MLP(tree_size + signal_size, hidden, 1, squash=False)

    def forward(self, nodes: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        signal = signal.unsqueeze(1).expand(-1, nodes.shape[1], -1)
        return self.mlp(torch.cat((nodes, signal), dim=-1)).squeeze(-1)


def level_slice(level: int) -> slice:
    """Heap rows of tree level ``level`` (root = level 0)."""
    return slice(2**level - 1, 2 ** (level + 1) - 1)


def tree_depth(tree: torch.Tensor | HardTree) -> int:
    """log2 N for a heap of ``2N - 1`` nodes."""
    return ((tree.shape[1] + 1) // 2).bit_length() - 1


def build_tree(leaves: torch.Tensor, join: nn.Module) -> torch.Tensor:
    """Every inner node from its children, bottom-up: ``h_e = JOIN(h_l(e), h_r(e))``.

    leaves: ``[B, N, d]``, N a power of two; join maps ``[..., 2d] -> [..., d]``.
    Returns the heap ``[B, 2N-1, d]``. One JOIN call per level.
    """
    batch, count, width = leaves.shape
    levels = [leaves]
    while count > 1:
        count //= 2
        # Siblings are adjacent rows, so a view pairs them as [h_l, h_r].
        levels.insert(0, join(levels[0].reshape(batch, count, 2 * width)))
    return torch.cat(levels, dim=1)


def soft_attention(tree: torch.Tensor, signal: torch.Tensor, search: nn.Module) -> torch.Tensor:
    """DHAM leaf attention (Appendix A): ``a_root = 1``, ``a_l(e) = a_e (1 - p_e)``,
    ``a_r(e) = a_e p_e``, ``p_e = sigma(SEARCH(h_e, s))``.

    tree: ``[B, 2N-1, d]``; signal: ``[B, c]``. Returns ``[B, N]``, summing to 1.
    """
    attention = tree.new_ones(tree.shape[0], 1)
    for level in range(tree_depth(tree)):
        p_right = torch.sigmoid(search(tree[:, level_slice(level)], signal))
        attention = torch.stack((attention * (1 - p_right), attention * p_right), dim=-1)
        attention = attention.flatten(1)
    return attention


def soft_read(leaves: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """``r = sum_i a_i h_i``: leaves ``[B, N, d]``, attention ``[B, N]`` -> ``[B, d]``."""
    return torch.einsum("bn,bnd->bd", attention, leaves)


def soft_write(leaves: torch.Tensor, attention: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``h_i <- (1 - a_i) h_i + a_i WRITE(h_i, s)``; ``new`` is WRITE of every leaf,
    ``[B, N, d]``. Returns the new leaves ``[B, N, d]``."""
    return leaves + attention.unsqueeze(-1) * (new - leaves)


def node_rows(tree: torch.Tensor | HardTree, rows: torch.Tensor) -> torch.Tensor:
    """One node per batch element: heap rows ``[B]`` -> values ``[B, d]``; tree is the
    heap tensor or the ``path`` backend's ``HardTree`` (the same rows)."""
    if isinstance(tree, HardTree):
        return tree.read(rows.unsqueeze(1)).squeeze(1)
    return tree[torch.arange(tree.shape[0], device=tree.device), rows]


def hard_path(
    tree: torch.Tensor | HardTree, signal: torch.Tensor, search: nn.Module, greedy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One root-to-leaf path: go right with probability ``p_e = sigma(SEARCH(h_e, s))``.

    tree: ``[B, 2N-1, d]`` (or a ``HardTree``); signal: ``[B, c]``. Samples with the
    global torch generator (greedy: right iff ``p_e > 1/2``). Returns the leaf index
    ``[B]`` (0..N-1), the path's log-probability ``sum_e log P(choice_e)`` ``[B]`` and its
    entropy ``sum_e H(p_e)`` ``[B]``. Exactly log2 N SEARCH calls, each on B nodes.
    """
    node = signal.new_zeros(signal.shape[0], dtype=torch.long)  # index within the level
    log_prob = signal.new_zeros(signal.shape[0])
    entropy = signal.new_zeros(signal.shape[0])
    for level in range(tree_depth(tree)):
        logit = search(node_rows(tree, node + 2**level - 1).unsqueeze(1), signal).squeeze(1)
        p_right = torch.sigmoid(logit)
        go_right = logit > 0 if greedy else torch.bernoulli(p_right.detach()).bool()
        log_p_right, log_p_left = F.logsigmoid(logit), F.logsigmoid(-logit)
        log_prob = log_prob + torch.where(go_right, log_p_right, log_p_left)
        entropy = entropy - p_right * log_p_right - (1 - p_right) * log_p_left
        node = 2 * node + go_right.long()
    return node, log_prob, entropy


def hard_write(
    tree: torch.Tensor, leaf: torch.Tensor, value: torch.Tensor, join: nn.Module
) -> None:
    """In place: ``h_a <- value``, then ``h_e <- JOIN(h_l(e), h_r(e))`` for every node on
    the path from leaf ``a`` to the root. tree: ``[B, 2N-1, d]``; leaf: ``[B]``; value:
    ``[B, d]``. log2 N JOIN calls, each on B nodes; no row off the path is touched.

    The tree must not be an input saved by autograd (indexing saves only indices, so
    reads from it are fine).
    """
    batch = torch.arange(tree.shape[0], device=tree.device)
    node = leaf + tree.shape[1] // 2  # heap row of the leaf
    tree[batch, node] = value
    siblings = torch.tensor([1, 2], device=tree.device)
    for _ in range(tree_depth(tree)):
        node = (node - 1) // 2
        children = tree[batch.unsqueeze(1), 2 * node.unsqueeze(1) + siblings]  # [B, 2, d]
        tree[batch, node] = join(children.flatten(1))


@MODELS.register("ham", HAMConfig)
class HAM(nn.Module):
    """Raw HAM or LSTM+HAM, soft or hard attention (see the module docstring).

    In training mode a hard forward keeps its ``PathTrace`` in ``self.paths`` for
    ``auxiliary_loss``; in eval mode paths are greedy and nothing is kept.
    """

    def __init__(self, config: HAMConfig, input_size: int, output_size: int) -> None:
        super().__init__()
        if input_size < 3:
            raise ValueError(f"HAM needs item channels plus is_data and is_go, got {input_size}")
        self.config = config
        self.output_size = output_size
        width, signal, hidden = config.tree_size, config.controller_size, config.mlp_hidden
        self.embed = MLP(input_size - 2, hidden, width, squash=True)
        self.empty_leaf = nn.Parameter(torch.zeros(width))
        self.join = MLP(2 * width, hidden, width, squash=True)
        self.search = Search(width, signal, hidden)
        self.write = MLP(width + signal, hidden, width, squash=True)
        if config.controller == "lstm":
            self.controller = nn.LSTMCell(input_size + width, signal)
            self.readout = readout_layer(signal + width, output_size, config.readout_hidden)
        else:
            self.signal = nn.Linear(input_size, signal)
            self.readout = readout_layer(width, output_size, config.readout_hidden)
        if config.mode == "hard":
            self.baseline = nn.Linear(signal, 1)
        self.paths: PathTrace | None = None

    def initial_state(self, data: torch.Tensor) -> HAMState:
        """Tree of the data steps ``[T_data, B, I]`` and a zero controller."""
        steps, batch, _ = data.shape
        count = max(steps, self.config.min_leaves)
        leaves = self.empty_leaf.expand(batch, 1 << (count - 1).bit_length(), -1)
        if steps:
            is_data = data[..., -2].transpose(0, 1).unsqueeze(-1) > 0  # [B, T_data, 1]
            embedded = torch.where(
                is_data, self.embed(data[..., :-2].transpose(0, 1)), leaves[:, :steps]
            )
            leaves = torch.cat((embedded, leaves[:, steps:]), dim=1)
        controller = self.config.controller_size if self.config.controller == "lstm" else 0
        zeros = data.new_zeros(batch, controller)
        return HAMState(
            build_tree(leaves, self.join),
            zeros,
            zeros,
            data.new_zeros(batch, self.config.tree_size),
        )

    def forward(
        self, inputs: torch.Tensor, state: HAMState | None = None
    ) -> tuple[torch.Tensor, HAMState]:
        """inputs ``[T, B, I]`` -> outputs ``[T, B, O]`` (zero on data steps), state.

        Without a state the steps before the first go step are the data; with one, its
        tree is the memory and every step is an access.
        """
        return self._run(inputs, state, None)

    def trace(self, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward`` from a fresh state, keeping every access's attention (the model
        contract in ``base.py``): outputs ``[T, B, O]`` and ``leaf_attention``
        ``[T, B, N]``, the DHAM attention a_i over the N leaves (hard: 1 on the leaf the
        path reached), zero on the data steps, which access nothing."""
        attentions: list[torch.Tensor] = []
        outputs, state = self._run(inputs, None, attentions)
        leaves = state.tree.shape[1] // 2 + 1
        idle = inputs.new_zeros(inputs.shape[0] - len(attentions), inputs.shape[1], leaves)
        accesses = torch.stack(attentions) if attentions else idle[:0]
        return outputs, {"leaf_attention": torch.cat([idle, accesses])}

    def _run(
        self,
        inputs: torch.Tensor,
        state: HAMState | None,
        attentions: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, HAMState]:
        """``forward``; appends each access's leaf attention ``[B, N]`` to ``attentions``
        when given one."""
        steps = inputs.shape[0]
        if state is None:
            go = (inputs[..., -1] > 0).any(dim=1)
            start = int(go.int().argmax()) if bool(go.any()) else steps
            state = self.initial_state(inputs[:start])
        else:
            start = 0
        tree, hidden, cell, read = state
        hard = self.config.mode == "hard"
        path_backend = hard and self.config.backend == "path"
        if hard:
            tree = HardTree(tree) if path_backend else tree.clone()  # hard writes are in place
        greedy = not self.training
        outputs = [inputs.new_zeros(start, inputs.shape[1], self.output_size)]
        log_probs, entropies, baselines = [], [], []
        leaf_rows = slice(tree.shape[1] // 2, None)
        for step in range(start, steps):
            if self.config.controller == "lstm":
                hidden, cell = self.controller(torch.cat((inputs[step], read), -1), (hidden, cell))
                signal = hidden
            else:
                signal = self.signal(inputs[step])
            if hard:
                leaf, log_prob, entropy = hard_path(tree, signal, self.search, greedy)
                read = node_rows(tree, leaf + tree.shape[1] // 2)
                value = self.write(torch.cat((read, signal), -1))
                if path_backend:
                    tree.write_path(leaf, value, self.join)
                else:
                    hard_write(tree, leaf, value, self.join)
                if attentions is not None:
                    attentions.append(F.one_hot(leaf, tree.shape[1] // 2 + 1).to(tree.dtype))
                log_probs.append(log_prob)
                entropies.append(entropy)
                baselines.append(self.baseline(signal.detach()).squeeze(-1))
            else:
                attention = soft_attention(tree, signal, self.search)
                leaves = tree[:, leaf_rows]
                read = soft_read(leaves, attention)
                expanded = signal.unsqueeze(1).expand(-1, leaves.shape[1], -1)
                new = self.write(torch.cat((leaves, expanded), -1))
                tree = build_tree(soft_write(leaves, attention, new), self.join)
                if attentions is not None:
                    attentions.append(attention)
            features = read if self.config.controller == "none" else torch.cat((hidden, read), -1)
            outputs.append(self.readout(features).unsqueeze(0))
        if path_backend:
            tree = tree.finish()
        self.paths = None
        if hard and self.training and log_probs:
            self.paths = PathTrace(
                torch.stack(log_probs), torch.stack(entropies), torch.stack(baselines)
            )
        return torch.cat(outputs), HAMState(tree, hidden, cell, read)

    def describe_backend(self, batch_size: int) -> str:
        """The implementation of the memory accesses (``memctl/models/base.py``)."""
        if self.config.mode == "soft":
            return "reference (PyTorch autograd)"
        if self.config.backend == "path":
            return "path (hard tree in place, O(log n) backward, ham_tree.py)"
        return "reference (PyTorch autograd on the heap)"

    def auxiliary_loss(self, sequence_losses: torch.Tensor) -> torch.Tensor:
        """REINFORCE for the hard paths of the last training forward (Williams 1992).

        sequence_losses: ``[B]``, detached; the reward is ``R = -loss``. With the path
        log-probabilities ``log pi_t``, entropies ``H_t`` and baselines ``b_t`` of every
        access t, the loss averaged over the batch is
        ``sum_t [-(R - b_t) log pi_t - beta H_t + lambda (b_t - R)^2]``, the advantage
        ``R - b_t`` held constant. Zero in soft mode or when nothing was sampled.
        """
        if self.paths is None:
            return sequence_losses.new_zeros(())
        reward = -sequence_losses
        advantage = (reward - self.paths.baseline).detach()
        policy = -(advantage * self.paths.log_prob).sum(0).mean()
        entropy = self.paths.entropy.sum(0).mean()
        fit = (self.paths.baseline - reward).pow(2).sum(0).mean()
        return policy - self.config.entropy_bonus * entropy + self.config.baseline_weight * fit
