"""Fixtures shared by the test files."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (pytest -n): one thread each, subprocesses too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from tests.nvae_support import nvae_imported, require_nvae


@pytest.fixture(scope="module")
def nvae():
    """NVAE's modules, imported in isolation with the shims on (see :func:`nvae_imported`); one
    thread, as tiny convolutions on 2 shared cores only contend. Skips without a clone."""
    path = require_nvae()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with nvae_imported(path) as modules:
            yield modules
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
