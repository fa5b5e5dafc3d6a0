"""The device a kernel test runs on: CPU, or inside ``torch.device("cuda")`` on a GPU (tests/kernels/conftest.py)."""

from __future__ import annotations

import pytest
import torch

VALUES_CHECKED_ON_CPU_ONLY = pytest.mark.cpu_only(
    "argument values are checked on CPU only: on a GPU that check would cost a host sync, and a bad label is a "
    "device-side assert that ends the CUDA context for every later test")
"""Marks a bad-input case whose error comes from reading a tensor's values (a label out of range, a negative
policy weight), which only the CPU raises as a ValueError."""


def on_test_device(value):
    """`value` moved to the device the test body runs on, if it is a tensor built outside the body (in a
    parametrize list, at collection: always on the CPU). Meta tensors, which test the device check, and other
    values are returned unchanged."""
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return value.to(torch.get_default_device())
    return value


def batch_size_invariant(backend: str) -> bool:
    """Whether a row's result is bitwise the same whatever the number of rows computed with it, on the device
    the test runs on. The Triton kernels give every row the same program whatever the grid; on the CPU the torch
    backend's BLAS and reductions sum a row in an order set by that row's length alone. On CUDA the torch backend
    is not: cuBLAS picks its GEMM kernel (tile shape, split-K) and torch its reduction layout from the whole
    shape, so a row's last bits depend on how many rows share the call. There, only a fixed shape gives bitwise
    equal rows (other rows' values or order changed), and the accuracy at every size is what the float64-oracle
    tests check."""
    return backend == "triton" or torch.get_default_device().type == "cpu"
