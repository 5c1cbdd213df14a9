"""Test setup: Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton is first imported. On a GPU machine
set GIFT_FAST_GPU_TESTS=1 to run the kernels compiled instead.
"""
import os

if os.environ.get("GIFT_FAST_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    """The device tests run on: CUDA when GPU tests are asked for, else the CPU."""
    if os.environ.get("GIFT_FAST_GPU_TESTS") == "1":
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
