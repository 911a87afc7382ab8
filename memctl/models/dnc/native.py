"""The DNC as native CPU kernels (``csrc/dnc_access.cpp``), built on first use with the
machine's C++ compiler and loaded as ``torch.ops.memctl``: the ``native`` backend.

A DNC time step on small tensors is bound by the number of tensor ops, not by their
arithmetic: on the PyTorch path the memory access alone is about four hundred small ops
and eighty autograd nodes a step. ``dnc_sequence`` runs a whole sequence of a DNC with
one LSTM controller stack (controller, output clip, interface layer, memory access) in
one forward and one backward call, the time loop inside, each thread a block of the batch
from the first step to the last; ``dnc_access`` does one step's memory access alone, for
the other controllers. Both have one write head, run on the CPU, and compute
``addressing.py``'s maths (tested against it in float64, and gradchecked). When they
serve a model is ``backend.py``'s decision.

The library is compiled and cached by ``memctl.toolchain.shared_library`` (once per
source, compile command, torch version and CPU, under a file lock). Where no compiler is
found or the build fails, ``library()`` says why on stderr in one line and returns False,
and the DNC keeps its PyTorch path; the failure is recorded in the cache, so later
processes on the machine fall back without trying or printing. ``MEMCTL_NATIVE=0``
chooses the PyTorch path without trying.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from memctl.toolchain import BuildError, shared_library

SOURCE = Path(__file__).parent / "csrc" / "dnc_access.cpp"

# The native kernels keep every step's link matrices ([B, N, N]) for backward. Up to this
# many numbers per step (4 MiB in float32: N <= 362 at batch 8, 181 at batch 32) that is
# the faster choice; beyond it the PyTorch path, which keeps one in ten and recomputes the
# rest (fused.LinkWorkspace), saves memory where a step is long anyway.
MAX_LINK_ELEMENTS = 1 << 20


def _command(compiler: str, output: Path) -> list[str]:
    # torch's headers, as torch.utils.cpp_extension.include_paths() gives them (importing
    # that module costs a fifth of a second, and this runs on every first use).
    torch_lib = Path(torch.__file__).parent / "lib"
    headers = Path(torch.__file__).parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{headers}", f"-I{headers / 'torch' / 'csrc' / 'api' / 'include'}"]
    return [
        compiler,
        "-O3",
        "-march=native",
        "-fno-math-errno",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        str(SOURCE),
        "-o",
        str(output),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
    ]


@functools.cache
def library() -> bool:
    """Whether ``torch.ops.memctl.dnc_access_*`` are loaded (building them if needed).
    The first process to find them unavailable on a machine says so in one line."""
    announce = "memctl: building the DNC's native CPU kernel (once, 15-30 s)"
    try:
        torch.ops.load_library(str(shared_library(SOURCE, _command, announce)))
    except BuildError as error:
        if not error.cached:
            print(
                f"memctl: the DNC's native kernel is not available ({error}); using the "
                f"PyTorch path (slower); not tried again until {error.marker} is removed",
                file=sys.stderr,
            )
        return False
    except OSError as error:
        print(
            f"memctl: the DNC's native kernel is not available ({error}); "
            "using the PyTorch path (slower)",
            file=sys.stderr,
        )
        return False
    return True


def _require() -> None:
    if not library():
        raise RuntimeError("memctl's native DNC kernels could not be built (see above)")


class _Access(torch.autograd.Function):
    @staticmethod
    def forward(ctx, interface, *state):
        access = torch.ops.memctl.dnc_access_forward(interface, *state)
        # dnc_access_backward's saved: the interface, the previous state, then all of
        # dnc_access_forward's results but the read vectors (the next state, the rest).
        ctx.save_for_backward(interface, *state, *access[1:])
        ctx.mark_non_differentiable(access[7])
        return tuple(access[:8])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return tuple(torch.ops.memctl.dnc_access_backward(ctx.saved_tensors, grads[:7]))


def dnc_access(
    interface: torch.Tensor,
    memory: torch.Tensor,
    read_weights: torch.Tensor,
    write_weights: torch.Tensor,
    usage: torch.Tensor,
    link: torch.Tensor,
    precedence: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One memory access with one write head, as ``MemoryAccess.step``.

    interface: the interface layer's output before its activations ``[B, I]``; the
    previous state: memory ``[B, N, M]``, read_weights ``[B, R, N]``, write_weights
    ``[B, 1, N]``, usage ``[B, N]``, link ``[B, 1, N, N]``, precedence ``[B, 1, N]``
    -> (read vectors ``[B, R, M]``, the new state's six tensors in that order, the
    allocation weighting ``[B, 1, N]``, not differentiable).
    """
    _require()
    return _Access.apply(interface, memory, read_weights, write_weights, usage, link, precedence)


# dnc_sequence_forward's results: these first ones are the sequence's outputs (the last,
# the allocation weightings, not differentiable); the rest are kept for backward only.
_OUTPUTS = 11


class _Sequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, clip, projected, reads, hidden, cell, *tensors):
        state, params = tensors[:6], tensors[6:]
        results = torch.ops.memctl.dnc_sequence_forward(
            projected, reads, hidden, cell, params, clip, True, *state
        )
        ctx.clip, ctx.params = clip, len(params)
        ctx.set_materialize_grads(False)  # most of the states' gradients are None
        ctx.save_for_backward(*params, *results)
        ctx.mark_non_differentiable(results[_OUTPUTS - 1])
        return tuple(results[:_OUTPUTS])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        params, results = saved[: ctx.params], saved[ctx.params :]
        empty = results[0].new_empty(0)
        flowing = [empty if grad is None else grad for grad in grads[: _OUTPUTS - 1]]
        out = torch.ops.memctl.dnc_sequence_backward(params, results, flowing, ctx.clip)
        projected, reads, hidden, cell = out[:4]
        params, state = out[4:-6], out[-6:]
        return None, projected, reads, hidden, cell, *state, *params


def dnc_sequence(
    projected: torch.Tensor,
    reads: torch.Tensor,
    hidden: torch.Tensor,
    cell: torch.Tensor,
    clip: float,
    state: tuple[torch.Tensor, ...],
    params: tuple[torch.Tensor, ...],
    keep: bool = True,
) -> tuple[torch.Tensor, ...]:
    """A whole sequence of a DNC with one LSTM controller stack and one write head, the
    time loop inside one native call forward and one backward.

    projected: layer 0's input weights on the inputs, with the biases ``[T, B, 4H]``; the
    initial state: reads ``[B, R, M]``, hidden and cell ``[L, B, H]``, the memory's six
    tensors as in ``dnc_access``; clip: the controller output's clamp (``inf`` for none);
    params: ``DNCCore.native_parameters``'s
    -> (the clipped controller outputs ``[T, B, H]``, then every step's state, time major
    with the initial state at ``[0]``: reads ``[T+1, B, R, M]``, hidden and cell
    ``[T+1, L, B, H]``, the memory's six ``[T+1, B, ...]``; last the allocation
    weightings ``[T, B, 1, N]``, not differentiable).

    ``keep=False`` (no gradient wanted, no trace): hidden, cell and the memory's six have
    two steps taking turns, the final state at ``[T % 2]``, and the allocation weightings
    one step; the memory is O(1) in T but for the outputs and reads.
    """
    _require()
    if not keep:
        args = (projected, reads, hidden, cell, params, clip, False, *state)
        return tuple(torch.ops.memctl.dnc_sequence_forward(*args)[:_OUTPUTS])
    return _Sequence.apply(clip, projected, reads, hidden, cell, *state, *params)
