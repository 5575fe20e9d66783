"""is_oom: by type, by one table of real messages, through __cause__/__context__."""

from __future__ import annotations

import pytest

from autoaccum import is_oom
from autoaccum.step.oom import OOM_TYPE, oom_kind, requested_bytes

REAL_OOM_MESSAGES = [
    # torch's CUDA caching allocator (torch 2.x)
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of "
    "which 1.02 GiB is free. Including non-PyTorch memory, this process has 78.07 GiB memory in "
    "use. Of the allocated memory 76.50 GiB is allocated by PyTorch, and 1.04 GiB is reserved by "
    "PyTorch but unallocated.",
    "HIP out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 63.98 GiB",
    "XPU out of memory. Tried to allocate 512.00 MiB (GPU 0; 15.56 GiB total capacity)",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other "
    "API call, so the stacktrace below might be incorrect.",
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "MPS backend out of memory (MPS allocated: 17.10 GB, other allocations: 1.20 GB, max allowed: "
    "18.13 GB). Tried to allocate 256.00 MB on private pool.",
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)",
]

NOT_OOM_MESSAGES = [
    "CUDA error: an illegal memory access was encountered",
    "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`",
    "CUDA error: misaligned address",
    "mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)",
    "Expected more than 1 value per channel when training, got input size torch.Size([1, 8])",
    "CUDA error: unspecified launch failure",
]


@pytest.mark.parametrize("message", REAL_OOM_MESSAGES)
def test_known_oom_messages(message: str) -> None:
    assert is_oom(RuntimeError(message))
    assert oom_kind(RuntimeError(message)) == "oom"


@pytest.mark.parametrize("message", NOT_OOM_MESSAGES)
def test_other_errors_are_not_oom(message: str) -> None:
    assert not is_oom(RuntimeError(message))


def test_by_type_whatever_the_message() -> None:
    assert is_oom(OOM_TYPE("anything"))
    assert is_oom(MemoryError())


def test_message_table_needs_a_runtime_error() -> None:
    assert not is_oom(ValueError("CUDA out of memory"))
    assert not is_oom(KeyError("out of memory"))


def test_cudnn_not_supported_is_a_size_limit() -> None:
    exc = RuntimeError(
        "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
        "non-contiguous input."
    )
    assert oom_kind(exc) == "size_limit"
    assert is_oom(exc)


def _raise_from(outer: Exception, inner: BaseException, *, explicit: bool) -> Exception:
    try:
        try:
            raise inner
        except BaseException as err:
            if explicit:
                raise outer from err
            raise outer  # noqa: B904 - implicit chaining through __context__ is the point
    except Exception as caught:
        return caught


@pytest.mark.parametrize("explicit", [True, False])
def test_follows_cause_and_context(explicit: bool) -> None:
    wrapped = _raise_from(
        ValueError("trial failed"), OOM_TYPE("CUDA out of memory"), explicit=explicit
    )
    assert is_oom(wrapped)


def test_sticky_error_anywhere_in_the_chain_wins() -> None:
    wrapped = _raise_from(
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        explicit=True,
    )
    assert not is_oom(wrapped)


def test_cyclic_chain_terminates() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_oom(a)


def _replaced(suppress: bool) -> BaseException:
    """An error raised while handling an OOM, with the OOM suppressed or kept as its cause."""
    try:
        try:
            raise OOM_TYPE("CUDA out of memory. Tried to allocate 2.00 MiB")
        except OOM_TYPE as oom:
            if suppress:
                raise ValueError("the loss found a bug") from None
            raise RuntimeError("wrapped") from oom
    except (ValueError, RuntimeError) as exc:
        return exc
    raise AssertionError("unreachable")


def test_an_error_raised_from_none_hides_the_oom_it_replaced() -> None:
    """``raise X from None`` says "not because of that": the OOM in the suppressed context
    does not make X an out-of-memory error (an explicit cause still does)."""
    assert not is_oom(_replaced(suppress=True))
    assert is_oom(_replaced(suppress=False))


def test_the_failed_allocation_is_read_from_the_message() -> None:
    assert (
        requested_bytes("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79 GiB)") == 2**31
    )
    assert requested_bytes("Tried to allocate 512.00 MiB") == 512 * 2**20
    assert requested_bytes("MPS backend out of memory") is None
