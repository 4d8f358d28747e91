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
    """Files marked ``e2e`` (real simulations, deployments, CLI processes: minutes) run first, the
    longest first (``e2e(seconds=N)``), then the rest in file order. Each xdist worker takes the
    next file when it finishes one, so longest-first lets the two workers end together: a long
    file started last would leave the other worker idle."""

    def order(item: pytest.Item) -> float:
        marker = item.get_closest_marker("e2e")
        return 1.0 if marker is None else -float(marker.kwargs.get("seconds", 0))

    items.sort(key=order)  # stable: a file's tests, and files of equal weight, keep their order
