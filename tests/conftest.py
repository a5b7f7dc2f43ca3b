"""Markers that decide where a test runs; nothing here changes process-wide settings.

- ``interpreter``: Triton kernels on CPU tensors through Triton's interpreter. Runs only when the
  command that starts pytest sets ``TRITON_INTERPRET=1`` (``make test`` does), since the
  interpreter must be chosen before Triton is imported.
- ``gpu``: needs CUDA and compiled kernels: skipped without a GPU or under the interpreter.
"""

import os

import pytest
import torch

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    no_interp = pytest.mark.skip(reason="Triton interpreter tests: run with TRITON_INTERPRET=1")
    no_gpu = pytest.mark.skip(
        reason="needs CUDA"
        if not torch.cuda.is_available()
        else "GPU tests skip under TRITON_INTERPRET=1"
    )
    for item in items:
        if "interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(no_interp)
        if "gpu" in item.keywords and (INTERPRETER or not torch.cuda.is_available()):
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
