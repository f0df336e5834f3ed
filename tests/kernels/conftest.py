"""Kernel tests run on CUDA when present, else on the host under the Triton interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` kernel is defined, so this module sets
it before the test modules import `kestrel.kernels`.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    _early = sorted(m for m in sys.modules if m.startswith("kestrel.kernels."))
    if _early:
        raise RuntimeError(
            f"{_early} were imported before TRITON_INTERPRET was set; set TRITON_INTERPRET=1 "
            "in the environment (or in tests/conftest.py) for CPU runs"
        )


def _patch_interpreter_scalar_index() -> None:
    """The Triton 3.6 interpreter turns scalar tensors (shape (1,) arrays) into loop bounds
    with int(array), which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed upstream
    after 3.6). Take the single element explicitly instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_kestrel_scalar_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._kestrel_scalar_index = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if not HAS_CUDA:
    _patch_interpreter_scalar_index()

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if str(item.path).startswith(_HERE) and "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")
