"""A training loop in the style of pytorch-dnc's tasks/copy_task.py with
``-memory_type sdnc`` (smaller here), using only the documented API: the memory dict is
carried between calls as ``(None, mhx, None)``, every tensor of it detached as the copy
task does, and reset with reset_experience=True."""

import sys

import numpy as np
import torch
import torch.nn.functional as F

from memctl.models import SDNC

torch.manual_seed(0)
np.random.seed(0)
input_size, batch_size, max_length = 6, 32, 3
rnn = SDNC(
    input_size=input_size,
    hidden_size=32,
    rnn_type="lstm",
    num_layers=1,
    num_hidden_layers=2,
    dropout=0,
    nr_cells=16,
    cell_size=8,
    sparse_reads=4,
    temporal_reads=4,
    read_heads=1,
    gpu_id=-1,
    batch_first=True,
    independent_linears=False,
)
optimizer = torch.optim.Adam(rnn.parameters(), lr=0.01)


def generate_data(batch_size, length, size):
    input_data = np.zeros((batch_size, 2 * length + 1, size), dtype=np.float32)
    target_output = np.zeros((batch_size, 2 * length + 1, size), dtype=np.float32)
    sequence = np.random.binomial(1, 0.5, (batch_size, length, size - 1))
    input_data[:, :length, : size - 1] = sequence
    input_data[:, length, -1] = 1
    target_output[:, length + 1 :, : size - 1] = sequence
    return torch.from_numpy(input_data), torch.from_numpy(target_output)


(chx, mhx, rv) = (None, None, None)
losses = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 150):
    optimizer.zero_grad()
    random_length = np.random.randint(1, max_length + 1)
    input_data, target_output = generate_data(batch_size, random_length, input_size)
    output, (chx, mhx, rv) = rnn(
        input_data, (None, mhx, None), reset_experience=True, pass_through_memory=True
    )
    loss = F.binary_cross_entropy_with_logits(output, target_output)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(rnn.parameters(), 50)
    optimizer.step()
    mhx = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in mhx.items()}
    losses.append(loss.item())

print(
    f"first 10 mean loss {np.mean(losses[:10]):.4f} last 10 mean loss {np.mean(losses[-10:]):.4f}"
)
