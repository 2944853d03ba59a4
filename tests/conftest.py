"""Shared test configuration: the devices tests run on, a one-thread CPU setting and the Agg backend.

The core tests use tiny tensors; with several intra-op threads on a busy machine every small op pays a
thread-synchronisation cost far larger than its work, so those tests run single-threaded.
"""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each test that takes ``device`` runs on the CPU and, when present, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module of tiny-tensor tests with one intra-op thread; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def agg_backend():
    """Use matplotlib's Agg in a test, then restore the previous backend (docs/testing.md, "Matplotlib backend")."""
    import matplotlib

    old = matplotlib.get_backend()
    matplotlib.use("Agg", force=True)
    yield
    matplotlib.use(old, force=True)
