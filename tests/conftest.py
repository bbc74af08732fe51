import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """Every fresh allocation filled with NaN for the test (helpers.poison_allocations)."""
    from tests.helpers import poison_allocations
    poison_allocations(monkeypatch)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
