import os
import tempfile

import pytest

# Tests never read or write the user's teacher cache.
os.environ.setdefault("FEDDISTILL_CACHE", tempfile.mkdtemp(prefix="feddistill-cache-"))
# Flower must never try to install an app's dependencies at run time (there is no internet).
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread is several times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files marked ``e2e`` (real simulations, deployments, CLI processes: minutes) run first, so
    that the two xdist workers (one file each at a time) end together instead of one of them
    starting a long file when the other has nothing left."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: file order kept
