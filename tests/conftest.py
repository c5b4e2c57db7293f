"""Shared test set-up.

Triton kernels run on the CPU through Triton's interpreter, which must be switched on before
anything imports triton.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Fresh random inputs on every run, yet any failure reproduces: the seed is printed in the
# header and RBA_TEST_SEED=<seed> replays it.
SESSION_SEED = int(os.environ.get("RBA_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"rba test seed: {SESSION_SEED} (replay with RBA_TEST_SEED={SESSION_SEED})"


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws from its own stream of the session seed."""
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield
