"""The DNC's native CPU kernels (``memctl.models.dnc.native``): the same numbers and gradients
as the PyTorch path in float64, gradcheck, the whole models on both paths, and the
fallback when the kernels cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memctl.models import DNC
from memctl.models.dnc import AccessState, MemoryAccess, native
from memctl.toolchain import cpp_compiler

pytestmark = pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler")

B, N, M, R = 3, 6, 5, 2


def random_state(generator: torch.Generator, usage: str, B: int = B) -> AccessState:
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, dtype=torch.float64, generator=generator)

    link = rand(B, 1, N, N) / N
    link.diagonal(dim1=-2, dim2=-1).zero_()
    used = rand(B, N)
    if usage == "ties":
        used[:, 1] = used[:, 3] = used[:, 4]
    elif usage == "full":
        used[0] = 1.0
        used[1, :3] = 1.0
    return AccessState(
        memory=torch.randn(B, N, M, dtype=torch.float64, generator=generator),
        read_weights=torch.softmax(3 * rand(B, R, N), -1),
        write_weights=torch.softmax(3 * rand(B, 1, N), -1) * 0.9,
        usage=used,
        link=link,
        precedence=torch.softmax(3 * rand(B, 1, N), -1) * 0.8,
    )


@pytest.fixture
def threads(request):
    """Torch threads: the native kernels run W batch elements in vector lanes where every
    thread gets W of them (or there is one thread), else one element at a time."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


# One thread: the batch of 3 in four float64 lanes (one padded); two: one at a time.
LAYOUTS = pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=["lanes", "single"])


@LAYOUTS
@pytest.mark.parametrize("usage", ["random", "ties", "full"])
def test_access_gives_the_pytorch_paths_numbers_and_gradients(usage: str, threads, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    access = MemoryAccess(7, N, M, R, 1).double()
    state = random_state(generator, usage)
    controller = torch.randn(B, 7, dtype=torch.float64, generator=generator)

    monkeypatch.setenv("MEMCTL_NATIVE", "0")
    inputs = leaves(controller, *state)
    reads, new_state, allocation = access.step(inputs[0], AccessState(*inputs[1:]))
    expected = [reads, *new_state]
    monkeypatch.setenv("MEMCTL_NATIVE", "1")
    native_inputs = leaves(controller, *state)
    got = native.dnc_access(access.interface(native_inputs[0]), *native_inputs[1:])

    for have, want in zip(got[:7], expected, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[7], allocation, rtol=1e-12, atol=1e-12)
    cotangents = [torch.randn(t.shape, dtype=torch.float64, generator=generator) for t in got[:7]]
    want = torch.autograd.grad(expected, inputs, cotangents)
    have = torch.autograd.grad(got[:7], native_inputs, cotangents)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@LAYOUTS
def test_gradcheck_of_the_access(threads):
    generator = torch.Generator().manual_seed(1)
    state = random_state(generator, "ties")
    size = MemoryAccess(1, N, M, R, 1).interface.out_features
    interface = torch.randn(B, size, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(native.dnc_access, leaves(interface, *state))


def sequence_inputs(layers: int, generator: torch.Generator, steps: int = 3):
    hidden_size, gates = 4, 16
    interface_size = MemoryAccess(1, N, M, R, 1).interface.out_features

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=generator) * 0.5

    params = [randn(gates, R * M + hidden_size)]
    for _ in range(layers - 1):
        params += [randn(gates, 2 * hidden_size), randn(gates)]
    params += [randn(interface_size, hidden_size), randn(interface_size)]
    tensors = [randn(steps, B, gates), randn(B, R, M), randn(layers, B, hidden_size)]
    tensors += [randn(layers, B, hidden_size)]
    return tensors, list(random_state(generator, "random")), params


@LAYOUTS
@pytest.mark.parametrize(("layers", "clip"), [(1, 20.0), (2, 0.3)])
def test_gradcheck_of_a_whole_sequence(layers: int, clip: float, threads):
    """Every input (the projected inputs, the initial state, the parameters) against every
    output (the controller outputs and every step's state)."""
    tensors, state, params = sequence_inputs(layers, torch.Generator().manual_seed(2))
    count = len(tensors) + len(state)

    def sequence(*args: torch.Tensor):
        outputs = native.dnc_sequence(*args[:4], clip, tuple(args[4:count]), tuple(args[count:]))
        return outputs[:-1]  # the allocation weightings are not differentiated

    assert torch.autograd.gradcheck(sequence, leaves(*tensors, *state, *params))


@pytest.mark.parametrize("steps", [1, 4, 5])
def test_a_sequence_without_gradients_keeps_two_states(steps: int):
    """keep=False (no backward, no trace): the same outputs and final state, with memory
    for two states whatever the length."""
    tensors, state, params = sequence_inputs(2, torch.Generator().manual_seed(7), steps)
    kept = native.dnc_sequence(*tensors, 0.3, tuple(state), tuple(params))
    light = native.dnc_sequence(*tensors, 0.3, tuple(state), tuple(params), keep=False)
    torch.testing.assert_close(light[0], kept[0], rtol=0, atol=0)  # controller outputs
    torch.testing.assert_close(light[1], kept[1], rtol=0, atol=0)  # every step's reads
    for have, want in zip(light[2:10], kept[2:10], strict=True):  # hidden, cell, memory
        assert have.shape[0] == 2 and want.shape[0] == steps + 1
        torch.testing.assert_close(have[steps % 2], want[-1], rtol=0, atol=0)


def test_a_dnc_without_gradients_gives_the_same_outputs_and_state():
    torch.manual_seed(8)
    rnn = DNC(5, hidden_size=8, nr_cells=N, cell_size=M, read_heads=R).double()
    x = torch.randn(3, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    output, (controller, memory, reads) = rnn(x, (None, None, None), reset_experience=True)
    with torch.no_grad():
        light, (light_controller, light_memory, light_reads) = rnn(
            x, (None, None, None), reset_experience=True
        )
    torch.testing.assert_close(light, output, rtol=0, atol=0)
    torch.testing.assert_close(light_reads, reads, rtol=0, atol=0)
    torch.testing.assert_close(light_controller, controller, rtol=0, atol=0)
    for key, value in memory.items():
        torch.testing.assert_close(light_memory[key], value, rtol=0, atol=0)


CONFIGS = [
    {"num_hidden_layers": 1},
    {"num_hidden_layers": 2, "clip": 0.3},
    {"num_hidden_layers": 2, "bias": False},
    {"rnn_type": "gru"},  # the memory access alone is native
]


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("overrides", CONFIGS)
def test_a_dnc_gives_the_same_outputs_and_gradients_on_both_paths(overrides, threads, monkeypatch):
    """One thread: float64 runs a batch of 6 in two groups of four lanes, the second
    padded; two threads: one element at a time, three on each thread."""
    calls = {"dnc_sequence": 0, "dnc_access": 0}
    for name in calls:
        original = getattr(native, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(native, name, counted)

    def run(flag: str):
        monkeypatch.setenv("MEMCTL_NATIVE", flag)
        torch.manual_seed(3)
        kwargs = {"hidden_size": 8, "nr_cells": N, "cell_size": M, "read_heads": R}
        rnn = DNC(5, **kwargs, **overrides).double()
        x = torch.randn(6, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        output, (_, memory, reads) = rnn(x, (None, None, None), reset_experience=True)
        loss = output.square().sum() + memory["link_matrix"].sum() + reads.sum()
        return output, torch.autograd.grad(loss, list(rnn.parameters()))

    output, gradients = run("0")
    assert calls == {"dnc_sequence": 0, "dnc_access": 0}
    native_output, native_gradients = run("1")
    if overrides.get("rnn_type") == "gru":
        assert calls == {"dnc_sequence": 0, "dnc_access": 7}  # once per time step
    else:
        assert calls == {"dnc_sequence": 1, "dnc_access": 0}  # once for the sequence
    torch.testing.assert_close(native_output, output, rtol=1e-12, atol=1e-12)
    for have, want in zip(native_gradients, gradients, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threads", [1], indirect=True)
@pytest.mark.parametrize("usage", ["random", "ties", "full"])
def test_a_float32_access_agrees_with_float64(usage: str, threads):
    """float32 runs eight batch elements in the lanes of a vector, with its own exp (within
    2 ulp of expf): a batch of 11 is two groups, the second padded. One access agrees with
    float64's to a few float32 roundings."""
    generator = torch.Generator().manual_seed(1)
    state = random_state(generator, usage, B=11)
    access = MemoryAccess(7, N, M, R, 1).double()
    with torch.no_grad():  # sharp keys and gates
        interface = 3 * access.interface(
            torch.randn(11, 7, dtype=torch.float64, generator=generator)
        )
    want = native.dnc_access(interface, *state)
    have = native.dnc_access(interface.float(), *(tensor.float() for tensor in state))
    for got, expected in zip(have, want, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_float32_agrees_with_float64(threads, monkeypatch):
    """A whole DNC in float32, forward and backward, agrees with the PyTorch path in
    float64 to float32's precision (11 sequences: on one thread two groups of eight
    lanes, on two one at a time)."""

    def run(flag: str, dtype: torch.dtype):
        monkeypatch.setenv("MEMCTL_NATIVE", flag)
        torch.manual_seed(3)
        rnn = DNC(5, hidden_size=8, nr_cells=N, cell_size=M, read_heads=R).to(dtype)
        generator = torch.Generator().manual_seed(4)
        x = (3 * torch.randn(11, 9, 5, generator=generator)).to(dtype)
        output, (_, memory, reads) = rnn(x, (None, None, None), reset_experience=True)
        loss = output.square().sum() + memory["link_matrix"].sum() + reads.sum()
        return output, torch.autograd.grad(loss, list(rnn.parameters()))

    output, gradients = run("1", torch.float32)
    want_output, want_gradients = run("0", torch.float64)
    torch.testing.assert_close(output.double(), want_output, rtol=1e-4, atol=1e-5)
    for have, want in zip(gradients, want_gradients, strict=True):
        torch.testing.assert_close(have.double(), want, rtol=1e-3, atol=1e-4)


def test_float32_training_steps_agree(monkeypatch):
    def train(flag: str) -> list[float]:
        monkeypatch.setenv("MEMCTL_NATIVE", flag)
        torch.manual_seed(5)
        rnn = DNC(6, hidden_size=16, nr_cells=8, cell_size=6, read_heads=2)
        optimizer = torch.optim.Adam(rnn.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(6)
        losses = []
        for _ in range(5):
            x = torch.randint(0, 2, (4, 5, 6), generator=generator).float()
            output, _ = rnn(x, (None, None, None), reset_experience=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(output, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    assert train("1") == pytest.approx(train("0"), rel=1e-4)


def python_with(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


RUN_A_DNC = (
    "import torch; from memctl.models import DNC; from memctl.models.dnc import native; "
    "rnn = DNC(4, 8, nr_cells=4, cell_size=3, read_heads=1); "
    "out, _ = rnn(torch.rand(2, 3, 4)); out.sum().backward(); "
    "print(native.library())"
)


def test_without_a_working_compiler_the_dnc_says_so_and_runs(tmp_path: Path):
    done = python_with({"CXX": "false", "MEMCTL_CACHE": str(tmp_path)}, RUN_A_DNC)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    building, failed = done.stderr.strip().splitlines()
    assert building.startswith("memctl: building the DNC's native CPU kernel")
    assert failed.startswith("memctl: the DNC's native kernel is not available")
    assert "using the PyTorch path" in failed
    assert not list(tmp_path.rglob("*.so"))
    # The failure is recorded: the next process neither builds nor says anything.
    again = python_with({"CXX": "false", "MEMCTL_CACHE": str(tmp_path)}, RUN_A_DNC)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "False"
    assert again.stderr == ""


def test_parallel_processes_build_the_library_once(tmp_path: Path):
    env = {**os.environ, "MEMCTL_CACHE": str(tmp_path)}
    command = [sys.executable, "-c", RUN_A_DNC]
    runs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr.decode()
        assert stdout.decode().strip() == "True"
    built = list(tmp_path.rglob("*.so"))
    assert len(built) == 1
    assert sorted(p.name for p in built[0].parent.iterdir()) == ["build.lock", "dnc_access.so"]
