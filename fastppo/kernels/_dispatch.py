"""Backend selection shared by every fused op.

Each op has a Triton implementation (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and a pure-PyTorch one (``torch_backend.py``). ``backend``
picks one per call; ``None`` means "triton on CUDA, torch elsewhere", and the
``FASTPPO_BACKEND`` environment variable replaces that default.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("triton", "torch")


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str | None, x: torch.Tensor, name: str) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose main input is ``x`` (the argument ``name``).

    Meta tensors (shapes without data) go through the torch backend as through any PyTorch op, giving meta
    results (the tests trace the GPU paths so); the Triton kernels need data."""
    source = "backend='triton'"
    if backend is None:
        env = os.environ.get("FASTPPO_BACKEND", "").strip().lower()
        if env in ("", "auto"):
            return "triton" if x.is_cuda else "torch"
        if env not in BACKENDS:
            raise ValueError(f"FASTPPO_BACKEND must be one of {BACKENDS} or 'auto', got {env!r}")
        backend, source = env, "FASTPPO_BACKEND=triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and x.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without data), which {source} cannot run: "
                         f"materialise it first (a model built on the meta device: to_empty(), then load its weights)")
    if backend == "triton" and not x.is_cuda and not triton_interpreter_enabled():
        raise ValueError(
            f"{source} needs CUDA tensors (or TRITON_INTERPRET=1 set before fastppo is imported, to run the "
            f"kernels on CPU); got {name} on {x.device}"
        )
    return backend


def empty_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs; NaN-filled when FASTPPO_POISON_OUTPUTS=1.

    The tests set the variable so that an element a kernel forgets to write
    shows up as NaN instead of passing by luck on recycled memory.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FASTPPO_POISON_OUTPUTS") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def on_device_of(x: torch.Tensor):
    """Context in which a Triton launch for ``x`` runs on x's GPU.

    Triton launches on the *current* CUDA device (and its current stream), not
    on the device of the pointers it is given: with ``cuda:1`` tensors and
    device 0 current, a bare launch runs on GPU 0 with GPU 1 addresses. Every
    launcher wraps its launch in this; for CPU tensors (the interpreter) it does
    nothing.
    """
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
