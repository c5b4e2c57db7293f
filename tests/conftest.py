"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
anything imports triton.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)
    yield
