"""pytorch-dnc's README SDNC "Example usage", with memctl's import and gpu_id=-1 (CPU); the
printed keys are the memory dict's that pytorch-dnc 1.1.0's SDNC returns."""

import torch

from memctl.models import SDNC

rnn = SDNC(
    input_size=64,
    hidden_size=128,
    rnn_type="lstm",
    num_layers=4,
    nr_cells=100,
    cell_size=32,
    read_heads=4,
    sparse_reads=4,
    batch_first=True,
    gpu_id=-1,
)

(controller_hidden, memory, read_vectors) = (None, None, None)

output, (controller_hidden, memory, read_vectors) = rnn(
    torch.randn(10, 4, 64), (controller_hidden, memory, read_vectors), reset_experience=True
)

print("output", tuple(output.shape))
print("controller_hidden", len(controller_hidden), tuple(controller_hidden[0][0].shape))
for key in (
    "memory",
    "visible_memory",
    "link_matrix",
    "rev_link_matrix",
    "precedence",
    "read_weights",
    "write_weights",
    "read_vectors",
    "least_used_mem",
    "usage",
    "read_positions",
):
    print(key, tuple(memory[key].shape))
print("read_vectors", tuple(read_vectors.shape))
