import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops gain nothing from intra-op threads, and on a busy 2-core runner spinning threads
    slow every op down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
