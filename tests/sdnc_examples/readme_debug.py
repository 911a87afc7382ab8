"""pytorch-dnc's README SDNC "Debugging" example, with memctl's import and gpu_id=-1."""

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
    batch_first=True,
    sparse_reads=4,
    temporal_reads=4,
    gpu_id=-1,
    debug=True,
)

(controller_hidden, memory, read_vectors) = (None, None, None)

output, (controller_hidden, memory, read_vectors), debug_memory = rnn(
    torch.randn(10, 4, 64), (controller_hidden, memory, read_vectors), reset_experience=True
)

for key in sorted(debug_memory):
    print(key, type(debug_memory[key]).__name__, debug_memory[key].shape)
