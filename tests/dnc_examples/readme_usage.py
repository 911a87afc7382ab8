"""pytorch-dnc's README "Example usage", with memctl's import and gpu_id=-1 (CPU); the
README's call has reset_experience inside the tuple, a syntax error, fixed here."""

import torch

from memctl.models import DNC

rnn = DNC(
    input_size=64,
    hidden_size=128,
    rnn_type="lstm",
    num_layers=4,
    nr_cells=100,
    cell_size=32,
    read_heads=4,
    batch_first=True,
    gpu_id=-1,
)

(controller_hidden, memory, read_vectors) = (None, None, None)

output, (controller_hidden, memory, read_vectors) = rnn(
    torch.randn(10, 4, 64), (controller_hidden, memory, read_vectors), reset_experience=True
)

print("output", tuple(output.shape))
print("controller_hidden", len(controller_hidden), tuple(controller_hidden[0][0].shape))
print("memory", {key: tuple(value.shape) for key, value in memory.items()})
print("read_vectors", tuple(read_vectors.shape))
