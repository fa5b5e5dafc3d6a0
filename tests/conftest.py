"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is
defined, so this runs before fastppo is imported. On a machine with CUDA, run
with TRITON_INTERPRET=0 to test the compiled kernels instead."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a kernel forgets to write fails loudly.
os.environ.setdefault("FASTPPO_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each run, reproducible from the printed seed on failure."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("FASTPPO_TEST_SEED") is None else int(os.environ["FASTPPO_TEST_SEED"])
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section(call.when, "seed", f"FASTPPO_TEST_SEED={value}")


@pytest.fixture
def device():
    """Kernels run on CUDA when available, else on CPU under the interpreter."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return torch.device("cuda")
    return torch.device("cpu")
