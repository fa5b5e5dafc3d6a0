"""Kernel tests run where the kernels run (the `device` fixture of tests/conftest.py).

On CPU nothing changes: tensors are built on the CPU and the "triton" backend
runs under the interpreter. On CUDA every test body runs inside
``torch.device("cuda")``, so the tensors it builds (inputs, float64
references) live on the GPU and the "triton" backend runs the compiled
kernels; tests marked ``cpu_only`` are skipped there with their reason.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): the test only makes sense on CPU; skipped on CUDA")


@pytest.fixture(autouse=True)
def _on_kernel_device(request, device):
    if device.type == "cpu":
        yield
        return
    marker = request.node.get_closest_marker("cpu_only")
    if marker is not None:
        pytest.skip(f"CPU only: {marker.args[0] if marker.args else marker.kwargs.get('reason', '')}")
    with torch.device(device):
        yield
