"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is
defined, so this runs before fastppo is imported.

Without CUDA the Triton kernels run in triton's CPU interpreter. With CUDA
(and TRITON_INTERPRET unset or 0) the kernel tests run the compiled kernels on
the GPU against the same float64 references (see tests/kernels/conftest.py);
TRITON_INTERPRET=1 forces the interpreter even there."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"
# Kernel outputs start as NaN, so an element a kernel forgets to write fails loudly.
os.environ.setdefault("FASTPPO_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
# transformers' logging binds its console handler to the sys.stderr of the moment it is first imported. Imported
# here, that is the session's; imported first inside a test (fastppo imports it lazily), it would be that test's
# captured stderr, closed when the test ends, and every later transformers warning would print
# "--- Logging error ---" into the stderr other tests check for a single error line.
import transformers.utils.logging  # noqa: E402,F401

from fastppo.kernels._dispatch import triton_interpreter_enabled  # noqa: E402


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


@pytest.fixture(scope="session")
def device():
    """Where the Triton kernels run: CUDA when available and the interpreter is off, else CPU."""
    if torch.cuda.is_available() and not triton_interpreter_enabled():
        return torch.device("cuda")
    return torch.device("cpu")
